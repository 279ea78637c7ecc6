"""The model's one worker thread, and the queue in front of it: continuous batching.

HTTP handlers run on the asyncio event loop and must never wait on the model; the model runs
here, in one thread (torch releases the GIL inside its ops). Requests wait in a bounded FIFO
queue; between two decode steps the worker drops the rows of clients that left, admits waiting
requests while their rows fit in `max_concurrent`, prefills them together (one padded forward)
and lets them join the running batch (decode_batch.DecodeBatch), so a new request never waits for the
others to finish. Each step's tokens go back to their requests' asyncio queues through
loop.call_soon_threadsafe, before the next forward runs.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
import traceback
from collections import deque

import torch

from ..common import autocast, log
from ..decode_batch import DecodeBatch, GenRequest, RowEvent
from ..engine import Engine


class QueueFull(Exception):
    """The waiting queue is at max_queue: the request is answered 503."""


class Job:
    """One API request in flight. The worker puts lists of RowEvents on `events`: an exception if
    the engine failed, None if there was nothing to generate. `ended` holds the rows finished or
    dropped (worker side), so that a row ending both ways at once is counted once."""

    _ids = itertools.count()

    def __init__(self, req: GenRequest, loop: asyncio.AbstractEventLoop):
        req.key = self
        self.req, self.loop = req, loop
        self.id = next(self._ids)
        self.events: asyncio.Queue = asyncio.Queue()
        self.ended: set[int] = set()
        self.state = "queued"  # -> "running" -> "done"
        self.submitted = time.monotonic()

    def _send(self, item) -> None:  # worker thread -> event loop
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass


class Metrics:
    """Counters for GET /metrics, shared by the event loop and the worker (hence the lock)."""

    WINDOW = 10.0  # seconds of history behind tokens_per_s

    def __init__(self):
        self.lock = threading.Lock()
        self.started = time.time()
        self.counts = dict(requests_total=0, requests_rejected=0, requests_invalid=0, requests_cancelled=0,
                           requests_failed=0, requests_completed=0, tokens_generated=0, prompt_tokens=0,
                           engine_steps=0, prefills=0, clients_gone=0)
        self.active = 0
        self.last_rows = 0
        self.max_rows = 0
        self.row_steps = 0  # sum over steps of the rows decoded: mean batch = row_steps / steps
        self.recent: deque = deque()  # (time, tokens) per step, for tokens_per_s

    def add(self, **kw) -> None:
        with self.lock:
            for k, v in kw.items():
                self.counts[k] += v

    def step(self, rows: int) -> None:
        now = time.monotonic()
        with self.lock:
            self.counts["engine_steps"] += 1
            self.counts["tokens_generated"] += rows
            self.last_rows, self.max_rows = rows, max(self.max_rows, rows)
            self.row_steps += rows
            self.recent.append((now, rows))
            while self.recent and self.recent[0][0] < now - self.WINDOW:
                self.recent.popleft()

    def snapshot(self, queued: int) -> dict:
        now = time.monotonic()
        with self.lock:
            while self.recent and self.recent[0][0] < now - self.WINDOW:
                self.recent.popleft()
            steps = self.counts["engine_steps"]
            return {
                **self.counts,
                "requests_active": self.active,
                "requests_queued": queued,
                "queue_depth": queued,
                "tokens_per_s": round(sum(n for _, n in self.recent) / self.WINDOW, 2),
                "batch_rows_last": self.last_rows,
                "batch_rows_max": self.max_rows,
                "batch_rows_mean": round(self.row_steps / steps, 3) if steps else 0.0,
                "uptime_s": round(time.time() - self.started, 1),
            }


class Scheduler:
    def __init__(self, engine: Engine, max_concurrent: int = 8, max_queue: int = 64,
                 dtype: torch.dtype = torch.float32):
        self.engine, self.max_concurrent, self.max_queue, self.dtype = engine, max_concurrent, max_queue, dtype
        self.metrics = Metrics()
        self.cond = threading.Condition()
        self.waiting: deque[Job] = deque()  # guarded by cond
        self.drops: list[tuple[Job, int | None]] = []  # guarded by cond
        self.running: set[Job] = set()  # worker thread only
        self.batch = self._new_batch()
        self.stopping = False
        self.thread = threading.Thread(target=self._loop, name="picochat-engine", daemon=True)

    def _new_batch(self) -> DecodeBatch:
        return DecodeBatch(self.engine.model, self.engine.tokenizer, self.engine.stops)

    # ------------------------------------------------------------- event-loop side

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify()
        self.thread.join(timeout=10)

    def submit(self, req: GenRequest) -> Job:
        """Queue a request (from the event loop); QueueFull when max_queue requests already wait."""
        job = Job(req, asyncio.get_running_loop())
        with self.cond:
            if len(self.waiting) >= self.max_queue:
                self.metrics.add(requests_total=1, requests_rejected=1)
                raise QueueFull(f"the server is busy: {len(self.waiting)} requests already wait")
            self.waiting.append(job)
            self.metrics.add(requests_total=1, prompt_tokens=len(req.ids))
            self.cond.notify()
        return job

    def cancel(self, job: Job, index: int | None = None) -> None:
        """Stop a job (its client left), or one of its rows (a stop string ended it). Safe to call
        twice or after the job is done."""
        with self.cond:
            if job.state == "queued" and index is None and job in self.waiting:
                self.waiting.remove(job)
                job.state = "done"
                self.metrics.add(requests_cancelled=1)
                return
            if job.state != "done":
                self.drops.append((job, index))
                self.cond.notify()

    def queued(self) -> int:
        with self.cond:
            return len(self.waiting)

    def snapshot(self) -> dict:
        return self.metrics.snapshot(self.queued())

    # ------------------------------------------------------------- worker side

    def _loop(self) -> None:
        device = self.engine.device
        with torch.inference_mode(), autocast(device, self.dtype):
            while True:
                with self.cond:
                    while not (self.stopping or self.waiting or self.drops or len(self.batch)):
                        self.cond.wait()
                    if self.stopping:
                        break
                    drops, self.drops = self.drops, []
                try:
                    self._apply_drops(drops)
                    self._admit()
                    if len(self.batch):
                        self._step()
                except Exception as e:  # never let one bad step kill the worker: fail what ran, go on
                    log(f"serve: engine step failed: {e!r}\n{traceback.format_exc()}")
                    self._fail_all(e)
        self._fail_all(RuntimeError("the server is shutting down"))

    def _finish(self, job: Job, outcome: str) -> None:
        job.state = "done"
        self.running.discard(job)
        with self.metrics.lock:
            self.metrics.active -= 1
        self.metrics.add(**{f"requests_{outcome}": 1})

    def _apply_drops(self, drops) -> None:
        for job, index in drops:
            if job.state != "running":
                continue
            if index is None:
                self.batch.drop(job)
                self._finish(job, "cancelled")
            else:
                self.batch.drop(job, index)
                self._row_ended(job, index)
        self.batch.compact()

    def _admit(self) -> None:
        free = self.max_concurrent - self.batch.running
        admitted = []
        with self.cond:
            while self.waiting and self.waiting[0].req.n <= free:
                job = self.waiting.popleft()
                free -= job.req.n
                job.state = "running"
                admitted.append(job)
        if not admitted:
            return
        self.running.update(admitted)
        with self.metrics.lock:
            self.metrics.active += len(admitted)
        empty = self.batch.add([job.req for job in admitted])
        self.metrics.add(prefills=1)
        for req in empty:  # nothing to generate (the API layer prevents this; be safe anyway)
            self._finish(req.key, "completed")
            req.key._send(None)

    def _row_ended(self, job: Job, index: int) -> None:
        job.ended.add(index)
        if len(job.ended) >= job.req.n and job.state == "running":
            self._finish(job, "completed")

    def _step(self) -> None:
        events = self.batch.sample()
        per_job: dict[Job, list[RowEvent]] = {}
        for ev in events:
            per_job.setdefault(ev.key, []).append(ev)
        self.metrics.step(len(events))
        for job, evs in per_job.items():
            job._send(evs)
            for ev in evs:
                if ev.finish is not None:
                    self._row_ended(job, ev.index)
        self.batch.forward()

    def _fail_all(self, error: BaseException) -> None:
        for job in list(self.running):
            job._send(error)
            self._finish(job, "failed")
        self.batch = self._new_batch()
        if self.stopping:
            with self.cond:
                waiting, self.waiting = list(self.waiting), deque()
            for job in waiting:
                job.state = "done"
                job._send(error)
