"""The Engine: generation for sampling, chat, evals and RL, with one way in.

    engine = Engine(model, tokenizer, compile=False, stops=None)
    engine.generate(requests, max_rows=16) -> iterator, one item per step: a RowEvent for each row
        that decoded a token in it (key, index, token, forced, finish)
    engine.complete(requests, max_rows=16) -> iterator of (key, [Completion per row]), as each
        request finishes: generate(), collected

A request (decode_batch.GenRequest) is a prompt, how many rows sample from it, and how: its
max_tokens, temperature, top-k, top-p, seed, extra stop ids, and whether the calculator is on.
- Requests decode together in one decode_batch.DecodeBatch: a prompt is prefilled ONCE and its KV
  cache copied to its rows; different prompts decode side by side, left-padded, one batched
  forward per step; at most `max_rows` rows at once, the next request joining as soon as rows free
  up (continuous batching), so short answers do not wait for long ones.
- Sampling (sampling.py): temperature, top-k, top-p; greedy at temperature 0. A request's seed
  gives it the same tokens whatever it is batched with.
- A row ends at a stop token (the engine's `stops`, by default `<|assistant_end|>` and `<|bos|>`,
  plus the request's) or when it runs out of room: `max_tokens`, or the model's context. A row's
  last event says why, in `finish`: "stop" (its token is the stop token, which a Completion drops)
  or "length". That is the one rule; a Completion's finish_reason is it.
- The calculator (tool_use.py): a row's `<|python_start|>expr<|python_end|>` is answered with
  `<|output_start|>result<|output_end|>`, fed one token per step in place of sampling and marked
  forced, for a loss mask in RL.
- compile=True: a single request decodes through a torch.compile'd step on a static cache.

Readable text (a Completion's `text`, the chat CLI's stream) is reply_text.py's.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from .common import first_line, log
from .decode_batch import DecodeBatch, GenRequest, RowEvent, default_stops, fit_prompt, new_generator, prepare
from .kv_cache import DynamicKVCache, StaticKVCache
from .reply_text import render_text
from .sampling import sample_next
from .tool_use import RowState, ToolTokens


@dataclass
class Completion:
    tokens: list[int]  # generated ids, tool calls and forced outputs included, stop token not
    forced: list[bool]  # per token: True where the engine forced it (tool output)
    finish_reason: str  # "stop" (a stop token) or "length" (max_tokens or the context)
    text: str  # reply_text.render_text(tokens)


class Engine:
    """Generation for a GPT. `tokenizer` may be None: then there are no default stop tokens and
    no tool use, only the requests' stop ids. `stops`: the ids a reply ends at (default:
    `<|assistant_end|>` and `<|bos|>`; RL's rollouts end at `<|assistant_end|>` alone).

    compile=True runs a lone request's one-token steps through torch.compile, on a StaticKVCache
    of the whole context so that one graph (per batch size) serves every step of every call; on
    CUDA as a CUDA graph ("reduce-overhead"). The first call pays the compile (about 20 s for a
    small model on a laptop CPU; a later process reuses inductor's on-disk cache). Should
    compiling fail (no C++ compiler, say), the engine logs it and decodes the same static cache
    eagerly. Several requests at once always decode eagerly, in a DecodeBatch."""

    def __init__(self, model, tokenizer=None, compile: bool = False, stops: Iterable[int] | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        self.context = model.config.sequence_len
        self.decode_step = None
        if compile:
            mode = "reduce-overhead" if self.device.type == "cuda" else None
            self.decode_step = torch.compile(model, dynamic=False, mode=mode)
        self.stops = default_stops(tokenizer) if stops is None else frozenset(stops)
        self.tools = ToolTokens(tokenizer) if tokenizer is not None else None
        self.bos = tokenizer.bos_id if tokenizer is not None else None

    def fit_prompt(self, ids: list[int], max_tokens: int) -> list[int]:
        """The prompt as it will be fed (decode_batch.fit_prompt): cut from the left if it leaves no room."""
        return fit_prompt(ids, max_tokens, self.context, self.bos)

    def generate(self, requests: Iterable[GenRequest], max_rows: int = 16) -> Iterator[list[RowEvent]]:
        """Every step's events, for the rows that decoded a token in it; a row's last event has
        `finish` set. A request with nothing to generate (max_tokens <= 0) gets none. Bad
        requests raise here, at the call, not at the first next()."""
        return (item for item in self._start(requests, max_rows) if isinstance(item, list))

    def complete(self, requests: Iterable[GenRequest], max_rows: int = 16) -> Iterator[tuple[object, list[Completion]]]:
        """(key, one Completion per row) as each request finishes: generate's events, collected. A
        request with nothing to generate finishes at once, with empty completions."""
        size: dict = {}

        def noted(reqs):
            for req in reqs:
                size[req.key] = req.n
                yield req

        running: dict = {}  # (key, row) -> (tokens, forced)
        finished: dict = {}  # key -> {row: Completion}
        for item in self._start(noted(requests), max_rows):
            if isinstance(item, GenRequest):
                yield item.key, [self._completion([], [], "length") for _ in range(item.n)]
                continue
            for ev in item:
                tokens, forced = running.setdefault((ev.key, ev.index), ([], []))
                tokens.append(ev.token)
                forced.append(ev.forced)
                if ev.finish:
                    del running[ev.key, ev.index]
                    rows = finished.setdefault(ev.key, {})
                    rows[ev.index] = self._completion(tokens, forced, ev.finish)
                    if len(rows) == size[ev.key]:
                        del finished[ev.key]
                        yield ev.key, [rows[i] for i in range(size.pop(ev.key))]

    # ------------------------------------------------------------------ the one loop

    def _start(self, requests: Iterable[GenRequest], max_rows: int) -> Iterator[list[RowEvent] | GenRequest]:
        """What generate and complete run: per step, a list of RowEvents, and each request with
        nothing to generate, as it is met. The first requests are admitted here, eagerly, so that
        their errors raise at the call."""
        requests = iter(requests)
        first = next(requests, None)
        if first is None:
            return iter(())
        second = next(requests, None)
        if self.decode_step is not None and second is None:
            ids, steps = prepare(first, self.context, self.bos)
            return self._static_steps(first, ids, steps) if steps > 0 else iter([first])
        todo = itertools.chain([first] if second is None else [first, second], requests)
        batch = DecodeBatch(self.model, self.tokenizer, self.stops)
        waiting, empty = self._admit(batch, next(todo), todo, max_rows)
        return itertools.chain(empty, self._steps(batch, waiting, todo, max_rows))

    def _steps(self, batch: DecodeBatch, waiting: GenRequest | None, todo: Iterator,
               max_rows: int) -> Iterator[list[RowEvent] | GenRequest]:
        while waiting is not None or len(batch):
            events = batch.sample() if len(batch) else []
            if events:
                yield events
            if len(batch):
                batch.forward()
            waiting, empty = self._admit(batch, waiting, todo, max_rows)
            yield from empty

    @staticmethod
    def _admit(batch: DecodeBatch, waiting: GenRequest | None, todo: Iterator,
               max_rows: int) -> tuple[GenRequest | None, list[GenRequest]]:
        """Add waiting requests while their rows fit (one at least, when none run); returns the next
        one to wait and those with nothing to generate."""
        admit, rows = [], batch.running
        while waiting is not None and (rows + waiting.n <= max_rows or rows == 0):
            admit.append(waiting)
            rows += waiting.n
            waiting = next(todo, None)
        return waiting, (batch.add(admit) if admit else [])

    def _completion(self, tokens: list[int], forced: list[bool], reason: str) -> Completion:
        if reason == "stop":  # the stop token is not part of the completion
            tokens, forced = tokens[:-1], forced[:-1]
        return Completion(tokens, forced, reason, render_text(self.tokenizer, tokens) if self.tokenizer else "")

    # ------------------------------------------------------------------ the compiled path

    # a generator of its own (not generate) so that errors raise at the call; inference_mode
    # wraps each resumption, not the caller
    @torch.inference_mode()
    def _static_steps(self, req: GenRequest, ids: list[int], steps: int) -> Iterator[list[RowEvent]]:
        """The compiled decode step on a StaticKVCache of the whole context, so that its shapes
        never change: the prompt is prefilled with batch 1, its cache copied to the rows."""
        model, B = self.model, req.n
        tools = self.tools if req.tools else None
        rows = [RowState(tools, self.stops | frozenset(req.stop), steps) for _ in range(B)]
        gen = new_generator(self.device, req.seed) if req.temperature > 0 else None
        cache = DynamicKVCache(model.config, 1, self.context)
        logits = model(torch.tensor([ids], device=self.device), kv_cache=cache)[:, -1]
        if B > 1:
            cache.repeat_rows(B)
            logits = logits.expand(B, -1)
        cache = StaticKVCache(cache)
        while True:
            sampled = sample_next(logits, req.temperature, req.top_k, req.top_p, gen)
            toks = sampled.tolist()  # the one device->host sync per step
            events: list[RowEvent] = []
            forced_any = False
            for r, row in enumerate(rows):
                if row.done:
                    continue
                tok, forced, finish = row.step(toks[r])
                toks[r] = tok
                forced_any |= forced
                events.append(RowEvent(req.key, r, tok, forced, finish))
            yield events
            if all(row.done for row in rows):
                return
            nxt = torch.tensor(toks, device=self.device) if forced_any else sampled
            logits = self._decode(nxt.view(B, 1), cache)

    def _decode(self, tokens: torch.Tensor, cache) -> torch.Tensor:
        """Next-token logits (B, vocab) after one token per row, through the compiled step."""
        if self.decode_step is not None:
            if self.device.type == "cuda":  # a new CUDA-graph iteration: the last step's output is spent
                torch.compiler.cudagraph_mark_step_begin()
            try:
                return self.decode_step(tokens, kv_cache=cache)[:, -1]
            except Exception as e:  # raised while compiling, before the step touched the cache
                log(f"engine: torch.compile of the decode step failed ({type(e).__name__}: {first_line(e)}); "
                    "decoding without it")
                self.decode_step = None
        return self.model(tokens, kv_cache=cache)[:, -1]
