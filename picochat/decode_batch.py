"""DecodeBatch: rows of different prompts decoding together, joining and leaving between steps.

All of the Engine's eager generation runs through it (every request: chat, evals, RL rollouts),
and so does the server's continuous batching. GenRequest is what a caller asks for; RowEvent is
what a step gives back, per row.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from .common import PicochatError, log
from .kv_cache import DynamicKVCache
from .sampling import sample_next
from .tokenizer import ASSISTANT_END, BOS
from .tool_use import RowState, ToolTokens

DEFAULT_STOPS = (ASSISTANT_END, BOS)


def fit_prompt(ids: list[int], max_tokens: int, context: int, bos: int | None) -> list[int]:
    """The prompt as it will be fed: unchanged unless it leaves no room in the context; then cut
    from the left, keeping a leading <|bos|>, to leave room for min(max_tokens, context // 2) new
    tokens, and the cut is logged. (A prompt that fits but leaves less room than max_tokens is kept
    whole; its rows end with "length" when the context fills.)"""
    if len(ids) < context:
        return ids
    room = max(1, min(max_tokens, context // 2))
    keep = max(1, context - room)
    head = [ids[0]] if bos is not None and ids[0] == bos and keep > 1 else []
    cut = ids[:len(head)] + ids[len(ids) - (keep - len(head)):]
    log(f"engine: prompt of {len(ids)} tokens reaches the context ({context}); kept its last {len(cut)}")
    return cut


def prepare(req: GenRequest, context: int, bos: int | None) -> tuple[list[int], int]:
    """(the prompt as it will be fed, the steps its rows may take): the one check of a request.
    Steps <= 0: nothing to generate (max_tokens <= 0, or no room left in the context)."""
    if not req.ids:
        raise PicochatError("generate needs a prompt of at least one token (e.g. <|bos|>)")
    if req.n < 1:
        raise PicochatError(f"num_samples must be at least 1, not {req.n}")
    ids = fit_prompt(list(req.ids), req.max_tokens, context, bos)
    return ids, min(req.max_tokens, context - len(ids))


def default_stops(tokenizer) -> frozenset[int]:
    """Where a reply ends unless the caller says otherwise: <|assistant_end|> and <|bos|>."""
    return frozenset(tokenizer.special_id(name) for name in DEFAULT_STOPS) if tokenizer is not None else frozenset()


def new_generator(device, seed: int | None) -> torch.Generator:
    """A sampling generator on `device`: seeded, or (None) from fresh entropy."""
    gen = torch.Generator(device=device)
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    return gen


@dataclass
class GenRequest:
    """One prompt to generate from: `n` rows that share it (prefilled once) and one seeded
    generator, so that its rows draw the same tokens whatever else decodes beside them."""
    ids: list[int]
    n: int = 1
    max_tokens: int = 256
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: Iterable[int] = ()
    tools: bool = True
    key: object = None  # the caller's handle for this request; its events carry it


@dataclass
class RowEvent:
    key: object  # the GenRequest's key
    index: int  # the row within its request, 0..n-1
    token: int
    forced: bool  # fed in by the engine (tool output), not sampled
    finish: str | None  # on a row's last event: "stop" (a stop token, yielded) or "length"


class _Group:
    """What the rows of one request share: its key, size and generator."""

    def __init__(self, req: GenRequest, gen: torch.Generator | None):
        self.key, self.n, self.gen = req.key, req.n, gen


class _Row(RowState):
    __slots__ = ("group", "index", "temperature", "top_k", "top_p")

    def __init__(self, group: _Group, index: int, req: GenRequest, steps: int, stops: frozenset,
                 tools: ToolTokens | None):
        super().__init__(tools, stops, steps)
        self.group, self.index = group, index
        self.temperature, self.top_k, self.top_p = req.temperature, req.top_k, req.top_p


class DecodeBatch:
    """Rows of DIFFERENT prompts decoding together, one batched forward per step, and rows that
    join (add) or leave (drop, or finish) between steps: continuous batching.

    All rows share one position counter; shorter prompts are left-padded and their pad keys masked
    (DynamicKVCache.start). Newcomers are prefilled together, padded to their longest prompt, so that
    their prompts end exactly where the running rows are; if they are longer than the running
    rows' position, the running rows are moved right first (DynamicKVCache.relabel: RoPE is relative,
    so moving a row's every key and query by the same offset changes nothing). Leading positions
    that no row uses any more are dropped at the same time, so the cache stays as short as the
    live rows need. A step is split in two so that a server can hand tokens out before the next
    forward: sample() -> events, then forward()."""

    def __init__(self, model, tokenizer=None, stops: frozenset[int] | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.device = next(model.parameters()).device
        self.context = model.config.sequence_len
        self.tools = ToolTokens(tokenizer) if tokenizer is not None else None
        self.bos = tokenizer.bos_id if tokenizer is not None else None
        self.stops = default_stops(tokenizer) if stops is None else stops
        self.min_len = max(self.model.config.layer_windows())  # keeps every ring at its window size
        self.cache: DynamicKVCache | None = None
        self.rows: list[_Row] = []
        self.logits: torch.Tensor | None = None  # next-token logits of every row, between forward and sample
        self.next: list[int] | None = None  # tokens to feed, between sample and forward
        self._plan = None  # sampling layout, rebuilt when the rows change

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def pos(self) -> int:
        return self.cache.pos if self.cache is not None else 0

    @torch.inference_mode()
    def add(self, requests: list[GenRequest]) -> list[GenRequest]:
        """Prefill the requests (one padded forward) and make their rows part of the batch; call
        between forward() and sample(). Returns the requests with nothing to generate
        (max_tokens <= 0), which get no events."""
        if self.next is not None:
            raise RuntimeError("DecodeBatch.add between sample() and forward(): call forward() first")
        new, empty = [], []
        for req in requests:
            ids, steps = prepare(req, self.context, self.bos)
            (new if steps > 0 else empty).append((req, ids, steps))
        if not new:
            return [r for r, _, _ in empty]
        self.compact()
        lens = [len(ids) for _, ids, _ in new]
        longest = max(lens)
        pos, first = self.pos, 0
        if self.cache is not None and self.cache.start is not None:
            first = int(self.cache.start.min())
        target = max(pos - first, longest)  # the shared position after the prefill
        need = max([target + r.left - 1 for r in self.rows] + [target + s - 1 for _, _, s in new]
                   + [self.min_len, target + 1])
        if self.cache is not None:
            self.cache.relabel(target - pos, need)
        padded = any(n != longest for n in lens) or target != longest or self.cache is not None
        start = torch.tensor([target - n for n in lens], device=self.device) if padded else None
        cache = DynamicKVCache(self.model.config, len(new), need, start=start)
        cache.pos = target - longest
        # pad with each row's first token: any id works, pad keys are masked
        idx = torch.tensor([[ids[0]] * (longest - len(ids)) + ids for _, ids, _ in new], device=self.device)
        logits = self.model(idx, kv_cache=cache)[:, -1]
        rep = [i for i, (req, _, _) in enumerate(new) for _ in range(req.n)]
        if len(rep) != len(new):  # n rows per prompt: copy its cache rows instead of recomputing
            rep_t = torch.tensor(rep, device=self.device)
            cache.index_rows(rep_t)
            logits = logits.index_select(0, rep_t)
        if self.cache is None:
            self.cache, self.logits = cache, logits
        else:
            self.cache.cat(cache)
            self.logits = torch.cat([self.logits, logits])
        for req, _, steps in new:
            group = _Group(req, new_generator(self.device, req.seed) if req.temperature > 0 else None)
            tools = self.tools if req.tools else None
            stops = self.stops | frozenset(req.stop)
            self.rows += [_Row(group, i, req, steps, stops, tools) for i in range(req.n)]
        self._plan = None
        return [r for r, _, _ in empty]

    @property
    def running(self) -> int:
        """Rows still decoding (len() also counts dropped ones until the next compact)."""
        return sum(not r.done for r in self.rows)

    def drop(self, key, index: int | None = None) -> None:
        """Stop decoding a request's rows (all, or one): they leave at the next sample/forward."""
        for row in self.rows:
            if row.group.key == key and (index is None or row.index == index):
                row.done = True

    def compact(self) -> None:
        """Remove finished and dropped rows from the cache and whatever is pending."""
        keep = [i for i, r in enumerate(self.rows) if not r.done]
        if len(keep) == len(self.rows):
            return
        if not keep:
            self.cache, self.rows, self.logits, self.next, self._plan = None, [], None, None, None
            return
        idx = torch.tensor(keep, device=self.device)
        self.cache.index_rows(idx)
        if self.logits is not None:
            self.logits = self.logits.index_select(0, idx)
        if self.next is not None:
            self.next = [self.next[i] for i in keep]
        self.rows = [self.rows[i] for i in keep]
        self._plan = None

    def _sampling_plan(self):
        """Rows by sampling settings: greedy ones, and buckets of (top_k, top_p) with per-row
        temperatures as a (B, 1) tensor (a number when they are all the same, so that sampling at
        temperature 1 divides nothing). Rebuilt only when the rows change."""
        if self._plan is None:
            buckets: dict = {}
            for i, row in enumerate(self.rows):
                if row.temperature > 0:
                    buckets.setdefault((row.top_k, row.top_p), []).append(i)
            plan = []
            for (top_k, top_p), idx in buckets.items():
                temps = [self.rows[i].temperature for i in idx]
                temps = temps[0] if len(set(temps)) == 1 else torch.tensor([[t] for t in temps], device=self.device)
                every = len(idx) == len(self.rows)
                plan.append((top_k, top_p, idx, None if every else torch.tensor(idx, device=self.device), temps))
            self._plan = plan
        return self._plan

    @torch.inference_mode()
    def sample(self) -> list[RowEvent]:
        """One token for every row (sampled, or forced by a tool), as events. Rows that finish
        here (a stop token, or out of room) leave before the next forward."""
        self.compact()
        if not self.rows:
            return []
        logits, plan = self.logits, self._sampling_plan()
        self.logits = None
        if not plan:
            sampled = logits.argmax(-1)
        else:
            # every group draws one uniform per row per step, whichever of its rows are still
            # running: the same seed gives the same tokens alone or batched
            draws = {}
            for row in self.rows:
                g = row.group
                if g.gen is not None and g not in draws:
                    draws[g] = torch.rand(g.n, 1, generator=g.gen, device=self.device)
            sampled = None
            if len(plan) > 1 or plan[0][3] is not None:  # some rows in another bucket or greedy
                sampled = logits.argmax(-1)
            for top_k, top_p, idx, sel, temps in plan:
                only = next(iter(draws)) if sel is None and len(draws) == 1 else None
                if only is not None and only.n == len(self.rows):  # one request, all its rows running
                    u = draws[only]
                else:
                    u = torch.cat([draws[self.rows[i].group][self.rows[i].index].view(1, 1) for i in idx])
                sub = logits if sel is None else logits.index_select(0, sel)
                toks = sample_next(sub, temps, top_k, top_p, u=u)
                if sel is None:
                    sampled = toks
                else:
                    sampled[sel] = toks
        toks = sampled.tolist()  # the one device->host sync per step
        events = []
        for i, row in enumerate(self.rows):
            tok, forced, finish = row.step(toks[i])
            toks[i] = tok
            events.append(RowEvent(row.group.key, row.index, tok, forced, finish))
        self.next = toks
        return events

    @torch.inference_mode()
    def forward(self) -> None:
        """Feed every running row its token of the last sample(): next-token logits for all."""
        self.compact()
        if not self.rows:
            return
        nxt = torch.tensor(self.next, device=self.device).view(-1, 1)
        self.next = None
        self.logits = self.model(nxt, kv_cache=self.cache)[:, -1]
