"""Download pretraining shards (by default nanochat's FineWeb-Edu 100B shuffled parquet shards).

Standard library only (urllib). Each shard is fetched into `<name>.part`; an interrupted download
resumes from where it stopped with an HTTP Range request, errors and timeouts are retried with
exponential backoff, the size is checked against Content-Length/Content-Range, and only then is
the file fsynced and renamed to its final name. A final name therefore always means a complete
shard, and shards that are already there are skipped.
"""

from __future__ import annotations

import http.client
import os
import re
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from picochat.common import PicochatError, fsync, log
from picochat.settings import check, setting

FINEWEB_EDU_URL = ("https://huggingface.co/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main/"
                   "shard_{index:05d}.parquet")
FINEWEB_EDU_NUM_SHARDS = 1823  # shard_00000 .. shard_01822; nanochat keeps the last one for val

# Status codes that will not get better by asking again.
_FATAL_STATUS = {400, 401, 403, 404, 405, 410, 451}
_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")
_CHUNK = 1 << 20


def shard_url(base_url: str, index: int) -> str:
    """`base_url` is a pattern with {index}; a plain directory URL gets /shard_{index:05d}.parquet."""
    if "{" not in base_url:
        base_url = base_url.rstrip("/") + "/shard_{index:05d}.parquet"
    return base_url.format(index=index)


def _fetch_once(url: str, part: Path, timeout: float) -> None:
    """One attempt: append to (or restart) `part`. Raises on any error or short body."""
    have = part.stat().st_size if part.exists() else 0
    req = urllib.request.Request(url, headers={"User-Agent": "picochat"})
    if have:
        req.add_header("Range", f"bytes={have}-")
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:
            # "range not satisfiable": either the .part is already complete (a crash between the
            # last byte and the rename) or it is longer than the file (file changed): start over
            if (e.headers.get("Content-Range") or "").strip() == f"bytes */{have}":
                return
            part.unlink()
        raise
    with resp:
        if have and resp.status == 206:
            m = _CONTENT_RANGE.match(resp.headers.get("Content-Range", ""))
            if not m or int(m.group(1)) != have:
                part.unlink()  # a range we did not ask for: do not splice it in
                raise OSError(f"unexpected Content-Range {resp.headers.get('Content-Range')!r}")
            total = int(m.group(3)) if m.group(3) != "*" else None
            mode = "ab"
        else:
            # 200: the server sent the whole file (it ignored or does not support Range)
            length = resp.headers.get("Content-Length")
            total = int(length) if length is not None else None
            mode = "wb"
        # whatever arrives is kept on disk even if the connection drops, so the retry resumes
        with open(part, mode) as f:
            while chunk := resp.read(_CHUNK):
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
    size = part.stat().st_size
    if total is not None and size != total:
        raise OSError(f"incomplete download: {size} of {total} bytes")


def download_file(url: str, dest: Path, retries: int = 5, timeout: float = 30,
                  backoff: float = 1.0) -> Path:
    """Download `url` to `dest` (resumable, retried, verified, atomic)."""
    dest = Path(dest)
    if dest.exists():
        return dest
    part = dest.with_name(dest.name + ".part")
    last: Exception | None = None
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(min(backoff * 2 ** (attempt - 1), 60.0))
        try:
            _fetch_once(url, part, timeout)
            if dest.suffix == ".parquet":
                with open(part, "rb") as f:
                    f.seek(-4, os.SEEK_END)
                    if f.read(4) != b"PAR1":
                        part.unlink()  # e.g. an HTML error page served with status 200
                        raise OSError("downloaded file is not a parquet file")
            os.replace(part, dest)
            fsync(dest.parent)
            return dest
        except urllib.error.HTTPError as e:
            if e.code in _FATAL_STATUS:
                raise PicochatError(f"download failed: HTTP {e.code} {e.reason} for {url}") from None
            last = e
        except (urllib.error.URLError, http.client.HTTPException, OSError, TimeoutError) as e:
            last = e
        log(f"download {url}: attempt {attempt + 1}/{retries + 1} failed ({last}); retrying")
    raise PicochatError(f"download failed after {retries + 1} attempts: {url} ({last})")


def download_shards(out_dir: str | Path, num_shards: int, base_url: str = FINEWEB_EDU_URL,
                    start: int = 0, retries: int = 5, timeout: float = 30, backoff: float = 1.0,
                    workers: int = 4) -> list[Path]:
    """Download shards start .. start+num_shards-1 into out_dir; returns their paths in order.

    A few downloads run at once (threads: the work is network-bound)."""
    if num_shards <= 0:
        raise PicochatError(f"num_shards must be positive, got {num_shards}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    indices = range(start, start + num_shards)
    dests = [out_dir / f"shard_{i:05d}.parquet" for i in indices]
    todo = [(shard_url(base_url, i), d) for i, d in zip(indices, dests) if not d.exists()]
    if len(todo) < len(dests):
        log(f"{len(dests) - len(todo)} of {len(dests)} shards already in {out_dir}")
    t0 = time.perf_counter()

    def one(job: tuple[str, Path]) -> Path:
        url, dest = job
        path = download_file(url, dest, retries=retries, timeout=timeout, backoff=backoff)
        log(f"downloaded {dest.name} ({dest.stat().st_size / 1e6:.1f} MB)")
        return path

    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(todo) or 1))) as pool:
        list(pool.map(one, todo))  # re-raises the first error
    if todo:
        mb = sum(d.stat().st_size for _, d in todo) / 1e6
        log(f"downloaded {len(todo)} shard(s), {mb:.1f} MB in {time.perf_counter() - t0:.1f}s to {out_dir}")
    return dests


@dataclass
class DownloadConfig:
    save: str = setting(help="output directory")
    num_shards: int = setting(8, "how many shards", low=1)
    start: int = setting(0, "the first shard's number", low=0)
    base_url: str | None = setting(None, "URL pattern with {index} (default: FineWeb-Edu 100B shuffled)")


def download(cfg: DownloadConfig) -> list[Path]:
    """`picochat data download`."""
    check(cfg)
    return download_shards(cfg.save, cfg.num_shards, start=cfg.start, base_url=cfg.base_url or FINEWEB_EDU_URL)
