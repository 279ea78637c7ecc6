"""`picochat data download NAME...`: fetch datasets into the data dir (datasets.py says which).

Hub datasets come from their parquet export (or nanochat's shard repos) through the Hub's client
(hub.py); the CORE bundle and the word list from their URLs (urls.py). Either way a file appears
under its final name only when whole and verified (size; sha256 where the Hub gives one), files
already there are skipped, several download at once, and an interrupted run (Ctrl-C, a lost
connection) continues where it stopped when run again.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from ..common import PicochatError, format_duration, log
from ..settings import check, setting
from . import hub
from .datasets import DATASETS, GROUPS, HubParquet, HubShards, Url, data_dir
from .urls import download_file, download_shards


@dataclass
class DownloadConfig:
    names: list[str] = setting(help=f"what to fetch: {', '.join([*DATASETS, *GROUPS])} (chat: every chat and eval "
                                    "set)", positional=True)
    data_dir: str | None = setting(None, "where datasets live (default: $PICOCHAT_DATA, else ~/.cache/picochat/data)")
    num_shards: int = setting(8, "pretraining shards to fetch (fineweb-edu, climbmix), from the first", low=1)
    workers: int = setting(4, "files downloading at once", low=1)
    timeout: float = setting(30.0, "seconds without a byte before a download is retried", low=0.1)
    retries: int = setting(5, "retries of a failed download, with backoff", low=0)
    base_url: str | None = setting(None, "shards from a URL pattern with {index} instead of the Hub (fineweb-edu, "
                                         "climbmix; default: the Hub)")


def expand(names: list[str]) -> list[str]:
    """Dataset names, groups expanded, in order, each once; an unknown name is an error."""
    out = []
    for name in names:
        if name not in DATASETS and name not in GROUPS:
            raise PicochatError(f"unknown dataset {name!r} (choose from {', '.join([*DATASETS, *GROUPS])})")
        out += [n for n in GROUPS.get(name, (name,)) if n not in out]
    return out


class _Tally:
    """The whole job's progress: bytes as they arrive (a line every few seconds, with rate and
    ETA when the total is known) and files as they land."""

    def __init__(self, files: int, total_bytes: int | None):
        self.files, self.total, self.done, self.bytes = files, total_bytes, 0, 0
        self.t0 = self.shown = time.perf_counter()
        self.lock = threading.Lock()

    def arrived(self, n: int) -> None:
        with self.lock:
            self.bytes += n
            now = time.perf_counter()
            if now - self.shown >= 5:
                self.shown = now
                log(self._line(now))

    def landed(self, path: Path) -> None:
        with self.lock:
            self.done += 1
            log(f"{self._line(time.perf_counter())} | {path}")

    def _line(self, now: float) -> str:
        dt = max(now - self.t0, 1e-9)
        rate = self.bytes / dt
        of = f" of {self.total / 1e6:,.1f}" if self.total else ""
        eta = f", eta {format_duration((self.total - self.bytes) / rate)}" if self.total and rate > 0 else ""
        return (f"download: {self.done}/{self.files} files, {self.bytes / 1e6:,.1f}{of} MB at "
                f"{rate / 1e6:.1f} MB/s{eta}")


def download(cfg: DownloadConfig) -> list[Path]:
    """Fetch each named dataset into the data dir; returns where each lives."""
    check(cfg)
    names = expand(cfg.names)
    root = data_dir(cfg.data_dir)
    root.mkdir(parents=True, exist_ok=True)
    log(f"download: {', '.join(names)} into {root} (Hub: {hub.endpoint()})")
    jobs: list[tuple] = []  # (name, what to fetch, destination)
    for name in names:
        d = DATASETS[name]
        dest = root / d.place
        src = d.source
        if isinstance(src, HubShards):
            if cfg.base_url:
                jobs.append((name, ("pattern", cfg.base_url), dest))
                continue
            listed = {f.path: f for f in hub.list_files(src.repo)}
            for i in range(min(cfg.num_shards, src.count)):
                shard = f"shard_{i:05d}.parquet"
                if shard not in listed:
                    raise PicochatError(f"not found on the Hub: {shard} in {src.repo} ({hub.endpoint()})")
                jobs.append((name, listed[shard], dest / shard))
        elif isinstance(src, HubParquet):
            for config, splits in src.configs:
                for split in splits:
                    files = hub.list_parquet(src.repo, config, split)
                    place = dest / config if src.by_config else dest
                    jobs += [(name, f, place / f"{split}-{k:05d}-of-{len(files):05d}.parquet")
                             for k, f in enumerate(files)]
        else:
            jobs.append((name, src, dest))
    todo = [j for j in jobs if not _present(j)]
    if len(todo) < len(jobs):
        log(f"download: {len(jobs) - len(todo)} of {len(jobs)} files already in place")
    sizes = [j[1].size for j in todo if isinstance(j[1], hub.RemoteFile)]
    tally = _Tally(len(todo), sum(sizes) if sizes and None not in sizes and len(sizes) == len(todo) else None)
    for path in _in_threads(lambda job: _fetch(job, cfg, tally), todo, cfg.workers):
        tally.landed(path)
    log(f"download: done; {root} holds {', '.join(names)}. Next: picochat speedrun --preset <name> "
        f"(or --eval-data {root} for the evals)")
    return [root / DATASETS[n].place for n in names]


def _in_threads(fn, jobs: list, workers: int):
    """fn(job) for every job, `workers` at a time, yielding results as they come; the first error
    is raised. Daemon threads: Ctrl-C (or an error) ends the process at once, not after the files
    in flight (the Hub client keeps what they got for the next run)."""
    todo, done = queue.Queue(), queue.Queue()
    for job in jobs:
        todo.put(job)

    def work():
        while True:
            try:
                job = todo.get_nowait()
            except queue.Empty:
                return
            try:
                done.put((None, fn(job)))
            except BaseException as e:  # handed to the main thread, which raises it
                done.put((e, None))

    for _ in range(max(1, min(workers, len(jobs)))):
        threading.Thread(target=work, daemon=True, name="picochat-download").start()
    for _ in jobs:
        error, result = done.get()
        if error is not None:
            raise error
        yield result


def _present(job) -> bool:
    _, what, dest = job
    if isinstance(what, tuple):  # a URL pattern: download_shards skips what is there itself
        return False
    if isinstance(what, Url) and what.unzip:
        return (dest / "core.yaml").is_file()
    return dest.is_file()


def _fetch(job, cfg: DownloadConfig, tally: _Tally) -> Path:
    _, what, dest = job
    if isinstance(what, hub.RemoteFile):
        return hub.fetch(what, dest, cfg.timeout, cfg.retries, tally.arrived)
    if isinstance(what, tuple):  # shards at the user's URL pattern
        download_shards(dest, cfg.num_shards, base_url=what[1], workers=cfg.workers, timeout=cfg.timeout,
                        retries=cfg.retries)
        return dest
    if what.unzip:
        from ..evals.core import resolve_bundle
        return resolve_bundle(what.resolved(), cache_dir=str(dest))
    return download_file(what.resolved(), dest, retries=cfg.retries, timeout=cfg.timeout, on_bytes=tally.arrived,
                         hint=". Without a network, set PICOCHAT_FILES_URL to a mirror, or put the file in the data "
                              "dir yourself (--data-dir or $PICOCHAT_DATA)")
