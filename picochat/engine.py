"""The Engine: generation for sampling, chat, evals and RL, and the text a reply reads as.

- Every call is a decode_batch.DecodeBatch: a prompt is prefilled ONCE and its KV cache copied to
  its `num_samples` rows, which decode together, one batched forward per step; different prompts
  (generate_many, complete) decode side by side, left-padded. The cache (kv_cache.KVCache) stores
  the n_kv_head heads of GQA, and only a ring of `window` slots for sliding-window layers.
- Sampling (sampling.py): temperature, top-k, top-p; greedy at temperature 0; a seeded
  torch.Generator on the model's device, so the same call gives the same tokens.
- A row ends at a stop token (`<|assistant_end|>`, `<|bos|>`, plus the caller's) or when it runs
  out of room: `max_tokens`, or the model's context length. Generation never runs past the
  context. A prompt already at or beyond the context is cut from the left (its leading `<|bos|>`
  kept) to leave room for min(max_tokens, context // 2) new tokens, and the cut is logged.
- The calculator (tool_use.py): a row's `<|python_start|>expr<|python_end|>` is answered with
  `<|output_start|>result<|output_end|>`, fed one token per step in place of sampling and marked
  forced, for a loss mask in RL.
- compile=True: one request at a time through a torch.compile'd step on a static cache (below).

API:
    engine = Engine(model, tokenizer, compile=False)
    engine.generate(ids, num_samples=1, max_tokens=256, temperature=1.0, top_k=None, top_p=None,
                    seed=None, stop=(), tools=True)
        -> iterator, one item per step: a list with, per row, (token_id, forced) or None once the
           row has finished. A row's stop token IS yielded (RL wants <|assistant_end|> in the
           sequence it trains on); after it the row yields None.
    engine.generate_batch(ids, **same) -> list[Completion]  (tokens without the stop token,
           forced flags, finish_reason "stop" | "length", readable text)
    engine.generate_many(prompts, max_tokens, temperature, top_k, top_p, seeds, stop, tools)
        -> iterator, one item per step: a list of RowEvent(key=prompt index, index, token, forced,
           finish) for the rows still running. Different prompts, left-padded, batched per step.
    engine.generate_many_batch(prompts, **same) -> list[Completion], one per prompt
    engine.complete(requests, max_rows) -> (key, Completions) as requests finish (continuous batching)
    engine.stream(ids, **same) -> iterator of StreamEvent(token, forced, text, part), row 0
    engine.stream_text(ids, **same) -> iterator of str pieces, row 0, whole UTF-8 characters only
    render_text(tokenizer, tokens) -> str, the readable rendering stream_text produces
    generate(model, ids, max_tokens, ...) -> list[int], the plain sampler pretraining uses

Tool calls read as "[calc: 1+2] = 3": see TextStream.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from .common import PicochatError, first_line, log
from .decode_batch import DecodeBatch, GenRequest, RowEvent, default_stops, fit_prompt, new_generator
from .kv_cache import KVCache, StaticKVCache
from .sampling import sample_next
from .tool_use import RowState, ToolTokens

# How special tokens read in text. The tool markers become a plain-text rendering of the call;
# every other special (stops, turn markers) reads as nothing.
SPECIAL_TEXT = {
    "<|python_start|>": "[calc: ",
    "<|python_end|>": "]",
    "<|output_start|>": " = ",
    "<|output_end|>": "",
}
NO_SPACE_BEFORE = tuple(".,;:!?)]}'\"\n\t ")  # after a tool's output, words get a space, these do not


# ----------------------------------------------------------------------------- text rendering

@dataclass
class StreamEvent:
    token: int
    forced: bool  # fed in by the engine (tool output), not sampled
    text: str  # readable text this token completes ("" while a UTF-8 character is incomplete)
    part: str  # "text", "call" (the calculator expression and its markers) or "output"


class TextStream:
    """Token ids in, readable text out, only ever whole UTF-8 characters.

    A token can end in the middle of a multi-byte character (byte-level BPE), so the bytes go
    through an incremental UTF-8 decoder, which returns the longest complete prefix and holds
    the incomplete tail back until the next token completes it. Special tokens render through
    SPECIAL_TEXT. `part` tracks whether we are inside a tool call or its output, for UIs that
    style them differently.

    A call's text is held back until it closes and then comes out whole, "[calc: 1+2]"; one that
    never closes (the reply ended inside it) comes out at the end as the plain words it was. The
    words after a tool's output are set off by a space unless they start with one (or with
    punctuation): "= 3 ok", not "= 3ok"."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.special = {sid: SPECIAL_TEXT.get(name, "") for name, sid in tokenizer.special_tokens.items()}
        self.names = {sid: name for name, sid in tokenizer.special_tokens.items()}
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.part = "text"
        self.call: str | None = None  # the open call's text so far
        self.space = False  # the next words follow a tool's output

    def push(self, token: int) -> str:
        """The text that `token` completes."""
        if token not in self.special:
            text = self.decoder.decode(self.tokenizer.token_bytes(token))
            if self.call is not None:
                self.call += text
                return ""
            return self._spaced(text)
        text = self._drain()  # bytes pending before a special can never be completed: as U+FFFD
        if self.call is not None:
            self.call, text = self.call + text, ""
        name = self.names[token]
        if name == "<|python_start|>":  # (a call still open is abandoned: its words read as words)
            text = self._unclosed() + text
            self.part, self.call = "call", self.special[token]
            return self._spaced(text)
        if name == "<|python_end|>" and self.call is not None:
            text, self.call = self.call + self.special[token], None
            self.part = "text"
            return text
        if name == "<|output_start|>":
            self.part = "output"
        elif name == "<|output_end|>":
            self.part, self.space = "text", True
        return self._spaced(text) + self.special[token]

    def _spaced(self, text: str) -> str:
        if self.space and text:
            self.space = False
            return text if text.startswith(NO_SPACE_BEFORE) else " " + text
        return text

    def _drain(self) -> str:
        text = self.decoder.decode(b"", final=True)
        self.decoder.reset()
        return text

    def flush(self) -> str:
        """Whatever is still pending, at the end of a stream (then in part "text")."""
        text = self._unclosed() + self._drain()
        self.part = "text"
        return self._spaced(text)

    def _unclosed(self) -> str:
        """The words of a call that never closed, without its marker ("" when none is open)."""
        words, self.call = (self.call or "").removeprefix(SPECIAL_TEXT["<|python_start|>"]), None
        return words


def render_text(tokenizer, tokens: Iterable[int]) -> str:
    """Readable text for generated tokens: what stream_text yields, all at once."""
    stream = TextStream(tokenizer)
    return "".join(stream.push(t) for t in tokens) + stream.flush()


# ----------------------------------------------------------------------------- the engine

@dataclass
class Completion:
    tokens: list[int]  # generated ids, tool calls and forced outputs included, stop token not
    forced: list[bool]  # per token: True where the engine forced it (tool output)
    finish_reason: str  # "stop" (a stop token) or "length" (max_tokens or the context)
    text: str  # render_text(tokens)


class Engine:
    """Generation for a GPT. `tokenizer` may be None: then there are no default stop tokens and
    no tool use, only the caller's stop ids (how the module-level generate() runs it).

    compile=True runs generate()'s one-token steps through torch.compile, on a StaticKVCache of
    the whole context so that one graph (per batch size) serves every step of every call; on CUDA
    as a CUDA graph ("reduce-overhead"). The first call pays the compile (about 20 s for a small
    model on a laptop CPU; a later process reuses inductor's on-disk cache). Should compiling fail
    (no C++ compiler, say), the engine logs it and decodes the same static cache eagerly. The
    other calls (generate_many, complete) always decode eagerly."""

    def __init__(self, model, tokenizer=None, compile: bool = False):
        self.model = model
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        self.context = model.config.sequence_len
        self.decode_step = None
        if compile:
            mode = "reduce-overhead" if self.device.type == "cuda" else None
            self.decode_step = torch.compile(model, dynamic=False, mode=mode)
        self.default_stops = default_stops(tokenizer)  # RL narrows them to <|assistant_end|>
        self.tools = ToolTokens(tokenizer) if tokenizer is not None else None

    def fit_prompt(self, ids: list[int], max_tokens: int) -> list[int]:
        """The prompt as it will be fed (decode_batch.fit_prompt): cut from the left if it leaves no room."""
        return fit_prompt(ids, max_tokens, self.context, self.tokenizer.bos_id if self.tokenizer else None)

    def batch(self) -> DecodeBatch:
        """An empty DecodeBatch with this engine's model, tokenizer and stops."""
        return DecodeBatch(self.model, self.tokenizer, self.default_stops)

    def generate(self, ids: list[int], num_samples: int = 1, max_tokens: int = 256, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                 stop: Iterable[int] = (), tools: bool = True) -> Iterator[list[tuple[int, bool] | None]]:
        """Yield, per step, [(token_id, forced) or None for each of the num_samples rows]. Argument
        errors raise here, at the call, not at the first next()."""
        req = GenRequest(list(ids), num_samples, max_tokens, temperature, top_k, top_p, seed, tuple(stop), tools)
        if self.decode_step is not None:
            return self._generate_static(req)
        batch = self.batch()
        if batch.add([req]):  # nothing to generate: max_tokens <= 0, or no room in the context
            return iter(())
        return self._rows_of(batch, num_samples)

    @staticmethod
    def _rows_of(batch: DecodeBatch, n: int) -> Iterator[list[tuple[int, bool] | None]]:
        for events in Engine._run_batch(batch):
            step: list[tuple[int, bool] | None] = [None] * n  # None: the row has finished
            for ev in events:
                step[ev.index] = (ev.token, ev.forced)
            yield step

    # ------------------------------------------------------------------ the compiled path

    def _generate_static(self, req: GenRequest) -> Iterator[list[tuple[int, bool] | None]]:
        ids = list(req.ids)
        if not ids:
            raise PicochatError("generate needs a prompt of at least one token (e.g. <|bos|>)")
        if req.n < 1:
            raise PicochatError(f"num_samples must be at least 1, not {req.n}")
        ids = self.fit_prompt(ids, req.max_tokens)
        steps = min(req.max_tokens, self.context - len(ids))
        if steps <= 0:
            return iter(())
        tools = self.tools if req.tools else None
        rows = [RowState(tools, self.default_stops | frozenset(req.stop), steps) for _ in range(req.n)]
        return self._static_steps(ids, rows, req)

    # a generator function of its own (not _generate_static) so that errors raise at the call;
    # inference_mode wraps each resumption, not the caller
    @torch.inference_mode()
    def _static_steps(self, ids: list[int], rows: list[RowState], req: GenRequest):
        """The compiled decode step on a StaticKVCache of the whole context, so that its shapes
        never change: the prompt is prefilled with batch 1, its cache copied to the rows."""
        model, B = self.model, len(rows)
        gen = new_generator(self.device, req.seed) if req.temperature > 0 else None
        cache = KVCache(model.config, 1, self.context)
        logits = model(torch.tensor([ids], device=self.device), kv_cache=cache)[:, -1]
        if B > 1:
            cache.repeat_rows(B)
            logits = logits.expand(B, -1)
        cache = StaticKVCache(cache)
        while True:
            sampled = sample_next(logits, req.temperature, req.top_k, req.top_p, gen)
            toks = sampled.tolist()  # the one device->host sync per step
            events: list[tuple[int, bool] | None] = []
            forced_any = False
            for r, row in enumerate(rows):
                if row.done:
                    events.append(None)
                    continue
                tok, forced, _ = row.step(toks[r])
                toks[r] = tok
                forced_any |= forced
                events.append((tok, forced))
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

    # ------------------------------------------------------------------ whole completions

    def generate_batch(self, ids: list[int], num_samples: int = 1, **kw) -> list[Completion]:
        """Run generate() to the end; one Completion per row."""
        stops = self.default_stops | frozenset(kw.get("stop", ()))
        tokens: list[list[int]] = [[] for _ in range(num_samples)]
        forced: list[list[bool]] = [[] for _ in range(num_samples)]
        for events in self.generate(ids, num_samples=num_samples, **kw):
            for r, ev in enumerate(events):
                if ev is not None:
                    tokens[r].append(ev[0])
                    forced[r].append(ev[1])
        out = []
        for toks, frc in zip(tokens, forced):
            reason = "length"
            if toks and not frc[-1] and toks[-1] in stops:
                toks, frc, reason = toks[:-1], frc[:-1], "stop"
            text = render_text(self.tokenizer, toks) if self.tokenizer is not None else ""
            out.append(Completion(toks, frc, reason, text))
        return out

    def generate_many(self, prompts: list[list[int]], max_tokens: int = 256,
                      temperature: float | list[float] = 1.0, top_k: int | None | list = None,
                      top_p: float | None | list = None, seeds: list[int | None] | int | None = None,
                      stop: Iterable[int] = (), tools: bool = True) -> Iterator[list[RowEvent]]:
        """Different prompts decoded together (left-padded, one batched forward per step). Yields,
        per step, a RowEvent for each row still running, its key the prompt's index; a row's last
        event has finish set and it is not reported after. temperature, top_k and top_p may be
        per-prompt lists. seeds: one per prompt, or an int s giving prompt i the seed s + i; a
        seeded prompt gets the same tokens as generate(seed=...) alone, whatever it is batched with."""
        n = len(prompts)
        temps, ks, ps = (_per_row(v, n, name) for v, name in
                         ((temperature, "temperature"), (top_k, "top_k"), (top_p, "top_p")))
        seeds = [seeds + i for i in range(n)] if isinstance(seeds, int) else _per_row(seeds, n, "seeds")
        batch = self.batch()
        batch.add([GenRequest(list(p), 1, max_tokens, temps[i], ks[i], ps[i], seeds[i], tuple(stop), tools, key=i)
                   for i, p in enumerate(prompts)])  # errors raise here, at the call
        return self._run_batch(batch)

    @staticmethod
    def _run_batch(batch: DecodeBatch) -> Iterator[list[RowEvent]]:
        while len(batch):
            events = batch.sample()
            if events:
                yield events
            batch.forward()

    def generate_many_batch(self, prompts: list[list[int]], **kw) -> list[Completion]:
        """Run generate_many() to the end; one Completion per prompt, in order."""
        n = len(prompts)
        tokens: list[list[int]] = [[] for _ in range(n)]
        forced: list[list[bool]] = [[] for _ in range(n)]
        reasons = ["length"] * n
        for events in self.generate_many(prompts, **kw):
            for ev in events:
                tokens[ev.key].append(ev.token)
                forced[ev.key].append(ev.forced)
                if ev.finish:
                    reasons[ev.key] = ev.finish
        return [self._completion(*row) for row in zip(tokens, forced, reasons)]

    def _completion(self, toks: list[int], frc: list[bool], reason: str) -> Completion:
        if reason == "stop":  # the stop token is not part of the completion
            toks, frc = toks[:-1], frc[:-1]
        return Completion(toks, frc, reason, render_text(self.tokenizer, toks) if self.tokenizer is not None else "")

    def complete(self, requests: Iterable[GenRequest], max_rows: int = 16) -> Iterator[tuple[object, list[Completion]]]:
        """Continuous batching over a stream of requests (evals, RL rollouts): up to max_rows rows
        decode together and the next request joins as soon as rows free up, so short answers do
        not wait for long ones. Yields (key, one Completion per row) as each request finishes."""
        batch = self.batch()
        todo = iter(requests)
        waiting = next(todo, None)
        state: dict = {}  # key -> [tokens per row, forced per row, reasons, rows left]
        while waiting is not None or len(batch):
            admit, rows = [], batch.running
            while waiting is not None and (rows + waiting.n <= max_rows or rows == 0):
                admit.append(waiting)
                rows += waiting.n
                state[waiting.key] = [[[] for _ in range(waiting.n)], [[] for _ in range(waiting.n)],
                                      ["length"] * waiting.n, waiting.n]
                waiting = next(todo, None)
            for req in batch.add(admit) if admit else ():  # nothing to generate (no room left)
                yield req.key, [self._completion([], [], "length") for _ in range(req.n)]
                del state[req.key]
            for ev in batch.sample() if len(batch) else ():
                st = state[ev.key]
                st[0][ev.index].append(ev.token)
                st[1][ev.index].append(ev.forced)
                if ev.finish:
                    st[2][ev.index] = ev.finish
                    st[3] -= 1
                    if not st[3]:
                        yield ev.key, [self._completion(*row) for row in zip(*st[:3])]
                        del state[ev.key]
            if len(batch):
                batch.forward()

    def stream(self, ids: list[int], **kw) -> Iterator[StreamEvent]:
        """Row 0's tokens as they arrive, each with the readable text it completes (the raw
        events, for UIs that style tool calls). Ignores num_samples: one row is generated."""
        if self.tokenizer is None:
            raise PicochatError("streaming text needs an Engine with a tokenizer")
        kw["num_samples"] = 1
        text = TextStream(self.tokenizer)
        last = None
        for events in self.generate(ids, **kw):
            tok, forced = events[0]
            before = text.part
            piece = text.push(tok)
            # a start marker belongs to the part it opens, an end marker to the part it closes
            part = text.part if text.part != "text" else before
            last = StreamEvent(tok, forced, piece, part)
            yield last
        tail = text.flush()
        if tail and last is not None:  # an incomplete character, or a call that never closed
            yield StreamEvent(last.token, last.forced, tail, text.part)

    def stream_text(self, ids: list[int], **kw) -> Iterator[str]:
        """Row 0's readable text, in pieces of whole characters, as tokens arrive."""
        for ev in self.stream(ids, **kw):
            if ev.text:
                yield ev.text


def _per_row(value, n: int, name: str) -> list:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise PicochatError(f"{name}: {len(value)} values for {n} prompts")
        return list(value)
    return [value] * n


def generate(model, ids: list[int], max_tokens: int, temperature: float = 1.0, top_k: int | None = None,
             seed: int | None = None, stop: Iterable[int] = (), top_p: float | None = None) -> list[int]:
    """Sample up to max_tokens new ids after `ids` (greedy at temperature 0); stops at a stop id
    (not returned) or at the model's context length. No tools, no default stops."""
    c = Engine(model).generate_batch(ids, max_tokens=max_tokens, temperature=temperature, top_k=top_k,
                                     top_p=top_p, seed=seed, stop=stop)[0]
    return c.tokens
