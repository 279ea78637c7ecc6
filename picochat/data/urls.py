"""Downloads over plain HTTP(S), for what is not on the Hugging Face Hub (the CORE eval bundle, the
word list) and for shards at a URL pattern of your own (`picochat data download --base-url`).

Standard library only (urllib). Each shard is fetched into `<name>.part`; an interrupted download
resumes from where it stopped with an HTTP Range request, errors and timeouts are retried with
exponential backoff, the size is checked against Content-Length/Content-Range, and only then is
the file fsynced and renamed to its final name. A final name therefore always means a complete
shard, and shards that are already there are skipped.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from picochat.common import PicochatError, fsync, log

# Status codes that will not get better by asking again.
_FATAL_STATUS = {400, 401, 403, 404, 405, 410, 451}
_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")
_CHUNK = 1 << 20


def shard_url(base_url: str, index: int) -> str:
    """`base_url` is a pattern with {index}; a plain directory URL gets /shard_{index:05d}.parquet."""
    if "{" not in base_url:
        base_url = base_url.rstrip("/") + "/shard_{index:05d}.parquet"
    return base_url.format(index=index)


class _Redirect(urllib.request.HTTPRedirectHandler):
    """Follow redirects, but never carry a token to another host (the Hub sends downloads to its CDN)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None and urllib.parse.urlsplit(newurl).netloc != urllib.parse.urlsplit(req.full_url).netloc:
            new.remove_header("Authorization")
        return new


_OPENER = urllib.request.build_opener(_Redirect)


def _fetch_once(url: str, part: Path, timeout: float, headers: dict, on_bytes) -> None:
    """One attempt: append to (or restart) `part`. Raises on any error or short body."""
    have = part.stat().st_size if part.exists() else 0
    req = urllib.request.Request(url, headers={"User-Agent": "picochat", **headers})
    if have:
        req.add_header("Range", f"bytes={have}-")
    try:
        resp = _OPENER.open(req, timeout=timeout)
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
                if on_bytes is not None:
                    on_bytes(len(chunk))
            f.flush()
            os.fsync(f.fileno())
    size = part.stat().st_size
    if total is not None and size != total:
        raise OSError(f"incomplete download: {size} of {total} bytes")


def _unreachable(e: Exception) -> bool:
    """Nothing answers at that address (no network, no such host, nothing listening): asking again
    in a few seconds will not change that."""
    reason = getattr(e, "reason", None)
    return isinstance(reason, (ConnectionRefusedError, socket.gaierror))


def download_file(url: str, dest: Path, retries: int = 5, timeout: float = 30, backoff: float = 1.0,
                  headers: dict | None = None, sha256: str | None = None, on_bytes=None,
                  hint: str = "") -> Path:
    """Download `url` to `dest`: resumable (a `.part` file that a later call continues with a
    Range request), retried with backoff, checked (the size the server promised; `sha256` when
    given) and atomic (renamed into place only when whole). `on_bytes(n)` is told of each chunk;
    `hint` ends the error when the server cannot be reached (how to point elsewhere)."""
    dest = Path(dest)
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    last: Exception | None = None
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(min(backoff * 2 ** (attempt - 1), 60.0))
        try:
            _fetch_once(url, part, timeout, headers or {}, on_bytes)
            if dest.suffix == ".parquet":
                with open(part, "rb") as f:
                    f.seek(-4, os.SEEK_END)
                    if f.read(4) != b"PAR1":
                        part.unlink()  # e.g. an HTML error page served with status 200
                        raise OSError("downloaded file is not a parquet file")
            if sha256 and sha256_of(part) != sha256:
                part.unlink()
                raise PicochatError(f"download of {url} does not match its sha256: removed; run the command "
                                    "again to fetch it anew")
            os.replace(part, dest)
            fsync(dest.parent)
            return dest
        except urllib.error.HTTPError as e:
            if e.code in _FATAL_STATUS:
                raise PicochatError(f"download failed: HTTP {e.code} {e.reason} for {url}") from None
            last = e
        except (urllib.error.URLError, http.client.HTTPException, OSError, TimeoutError) as e:
            if _unreachable(e):
                raise PicochatError(f"cannot download {url}: {e.reason}{hint}") from None
            last = e
        log(f"download {url}: attempt {attempt + 1}/{retries + 1} failed ({last}); retrying")
    raise PicochatError(f"download failed after {retries + 1} attempts: {url} ({last}){hint}")


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def download_shards(out_dir: str | Path, num_shards: int, base_url: str,
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
