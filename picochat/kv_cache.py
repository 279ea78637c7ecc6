"""KV caches: what a decoding model keeps of the keys and values it has seen.

The model talks to a cache only through the KVCache protocol. Two caches implement it:
- DynamicKVCache: its position is a Python int; rings of `window` slots for sliding-window
  layers; left-padded batches whose rows join, leave and move (continuous batching);
- StaticKVCache: a DynamicKVCache's buffers at a position held in a tensor, so that a compiled
  one-token decode step has the same shapes at every position.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

from .attention import apply_rotary, rotary_tables
from .config import ModelConfig


class KVCache(Protocol):
    """What the model asks of a KV cache during a forward of T new tokens per row."""

    max_len: int  # positions it holds at most: the model's rotary tables must reach as far
    pos: int | torch.Tensor  # the position of the first new token (a 1-element tensor in a static cache)

    def positions(self, T: int) -> slice | torch.Tensor:
        """The new tokens' positions, as an index into the rotary tables."""

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Store k, v (B, Hkv, T, D); return the keys and values the new queries may attend to and
        the position of the first of them."""

    def key_valid(self, layer: int, n_keys: int, k_start: int, T: int) -> torch.Tensor | None:
        """(B, n_keys) bool, False at keys no query may see (left padding, unwritten slots), or None."""

    def advance(self, T: int) -> None:
        """Move past the T tokens just written (after every layer has stored them)."""

    def previous(self, x: torch.Tensor) -> torch.Tensor:
        """For smear: each new token's predecessor's embedding (B, T, D), zeros where a row has none
        (its first token, or left padding); the last of x is kept for the next call."""


class DynamicKVCache:
    """Keys and values of every layer for a batch of sequences, preallocated.

    Full-attention layers keep all max_len positions. A sliding-window layer only ever looks at
    its last `window` keys, so it keeps a ring buffer of `window` slots (position p lives in slot
    p % window): at depth 4 with the 1/4-context window that is 44% of the full cache's memory.
    Both store n_kv_head heads, not n_head (GQA). Allocated (zero-filled) on first use with the
    dtype and device of the keys, so it follows autocast.

    update() returns, per layer, the keys and values the new queries may attend to plus the
    position of the first one (meaningful when they are in order; a one-token decode gets the
    ring in rotated order, which attention over a set of keys does not mind).

    Rows of different lengths (a DecodeBatch's: the engine's and the server's) share one
    position counter: shorter rows are LEFT-padded, and `start` (B,) holds each row's first real
    position. RoPE is relative, so a constant offset per row changes nothing between its real
    tokens; only the pad keys must be masked (key_valid). start=None (the default) is the
    unpadded hot path, untouched. The padded-batch operations (index_rows, cat, relabel) let a
    batch drop finished rows and take in new ones between decode steps."""

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int, start: torch.Tensor | None = None):
        self.config, self.batch_size, self.max_len = config, batch_size, max_len
        self.windows = config.layer_windows()
        # a ring never needs more slots than positions it will see
        self.slots = [min(w, max_len) if w else max_len for w in self.windows]
        self.k: list[torch.Tensor] | None = None
        self.v: list[torch.Tensor] | None = None
        self.pos = 0
        self.start = start
        self.last: torch.Tensor | None = None  # (B, 1, D): each row's last embedding (smear)
        self._valid: dict = {}  # key_valid per (layer kind, keys) for the current step

    def _allocate(self, like: torch.Tensor) -> None:
        c = self.config
        shapes = [(self.batch_size, c.n_kv_head, n, c.head_dim) for n in self.slots]
        # zeros, not torch.empty: padded rows and StaticKVCache mask slots that must hold finite
        # numbers (see attention)
        self.k = [torch.zeros(s, dtype=like.dtype, device=like.device) for s in shapes]
        self.v = [torch.zeros(s, dtype=like.dtype, device=like.device) for s in shapes]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store k, v (B, Hkv, T, D) at the current position; return (keys, values, first_pos)."""
        if self.k is None:
            self._allocate(k)
        pos, T = self.pos, k.size(2)
        end = pos + T
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} > {self.max_len} positions")
        ck, cv, window, n = self.k[layer], self.v[layer], self.windows[layer], self.slots[layer]
        if not window:
            ck[:, :, pos:end] = k
            cv[:, :, pos:end] = v
            return ck[:, :, :end], cv[:, :, :end], 0
        if T == 1:  # the decode hot path: one write into the ring, no copies
            slot = pos % n
            ck[:, :, slot:slot + 1] = k
            cv[:, :, slot:slot + 1] = v
            return ck[:, :, :min(end, n)], cv[:, :, :min(end, n)], max(0, end - window)
        # a chunk: its queries need the cached keys of the window before it, in order
        first = max(0, pos - window + 1)
        if first < pos:
            idx = torch.arange(first, pos, device=k.device) % n
            k_all = torch.cat([ck.index_select(2, idx), k], dim=2)
            v_all = torch.cat([cv.index_select(2, idx), v], dim=2)
        else:
            k_all, v_all = k, v
        keep = min(T, n)  # only the chunk's last `window` keys can be seen later
        idx = torch.arange(end - keep, end, device=k.device) % n
        ck.index_copy_(2, idx, k[:, :, T - keep:])
        cv.index_copy_(2, idx, v[:, :, T - keep:])
        return k_all, v_all, first

    def key_valid(self, layer: int, n_keys: int, k_start: int, T: int) -> torch.Tensor | None:
        """(B, n_keys) bool, False at pad keys, for the keys update() just returned; None when no
        row is padded. Only a one-token decode of a ring layer gets keys out of position order:
        slot s then holds the latest position p <= pos with p = s (mod slots)."""
        if self.start is None:
            return None
        n = self.slots[layer]
        ring = bool(self.windows[layer]) and T == 1
        key = (ring, n_keys, k_start, n if ring else 0)
        if key not in self._valid:
            kpos = torch.arange(n_keys, device=self.start.device)
            if ring:
                last = self.pos  # the position just written
                kpos = kpos + n * torch.div(last - kpos, n, rounding_mode="floor")
            else:
                kpos = kpos + k_start
            self._valid[key] = kpos[None, :] >= self.start[:, None]
        return self._valid[key]

    def positions(self, T: int) -> slice:
        return slice(self.pos, self.pos + T)

    def previous(self, x: torch.Tensor) -> torch.Tensor:
        prev = F.pad(x[:, :-1], (0, 0, 1, 0))
        if self.last is not None:
            prev[:, :1] = self.last
        if self.start is not None:  # a left-padded row's first real token follows a pad: none
            before = self.pos - 1 + torch.arange(x.size(1), device=x.device)
            prev = prev * (before[None, :] >= self.start[:, None].to(x.device)).unsqueeze(-1).to(prev.dtype)
        self.last = x[:, -1:]
        return prev

    def advance(self, n: int) -> None:
        self.pos += n
        self._valid.clear()

    # ------------------------------------------------------------- padded-batch operations

    def index_rows(self, idx: torch.Tensor) -> None:
        """Keep the rows idx, in that order (repeats allowed: one prompt, n samples)."""
        if self.k is not None:
            self.k = [t.index_select(0, idx) for t in self.k]
            self.v = [t.index_select(0, idx) for t in self.v]
        if self.last is not None:
            self.last = self.last.index_select(0, idx.to(self.last.device))
        if self.start is not None:
            self.start = self.start.index_select(0, idx.to(self.start.device))
        self.batch_size = idx.numel()
        self._valid.clear()

    def cat(self, other: DynamicKVCache) -> None:
        """Append other's rows. Both must be at the same position with the same max_len."""
        if other.pos != self.pos or other.max_len != self.max_len:
            raise ValueError("cat needs caches at the same position and of the same length")
        n = self.batch_size
        if other.k is not None:
            self.k = [torch.cat([a, b]) for a, b in zip(self.k, other.k)]
            self.v = [torch.cat([a, b]) for a, b in zip(self.v, other.v)]
        if self.last is not None or other.last is not None:  # both prefilled: both have it
            self.last = torch.cat([self.last, other.last])
        device = self.k[0].device if self.k is not None else "cpu"
        starts = [s if s is not None else torch.zeros(m, dtype=torch.long, device=device)
                  for s, m in ((self.start, n), (other.start, other.batch_size))]
        self.start = torch.cat([s.to(device) for s in starts])
        self.batch_size = n + other.batch_size
        self._valid.clear()

    def relabel(self, delta: int, max_len: int) -> None:
        """Move every row by `delta` positions (more left padding if > 0, less if < 0, which
        needs every row's start >= -delta) and resize to max_len positions. Cached keys carry
        their RoPE rotation, so they are rotated by delta too: rotations compose, and a key
        rotated for p then for delta is the key for p + delta. Values carry no position."""
        if self.start is None:
            self.start = torch.zeros(self.batch_size, dtype=torch.long,
                                     device=self.k[0].device if self.k is not None else "cpu")
        if delta < 0 and int(self.start.min()) < -delta:
            raise ValueError(f"relabel by {delta} would cut real positions")
        if max_len < self.pos + delta or any(w and min(w, max_len) != n
                                             for w, n in zip(self.windows, self.slots)):
            raise ValueError("relabel cannot shrink below the current position or resize a ring")
        if self.k is not None and (delta or max_len != self.max_len):
            cos, sin = rotary_tables(self.config.head_dim, self.config.rope_base,
                                     torch.tensor(float(delta), device=self.k[0].device))
            lo = max(0, -delta)  # first old position kept
            for layer, (w, n) in enumerate(zip(self.windows, self.slots)):
                k, v = self.k[layer], self.v[layer]
                if delta:  # apply_rotary's layout is (..., D) with cos over the last half: any shape fits
                    k = apply_rotary(k, cos, sin)
                if w:  # position p lives in slot p % n: the ring rolls with the labels
                    if self.pos < n:  # slots never written would roll into view: keep them zero
                        k[:, :, self.pos:] = 0
                        v[:, :, self.pos:] = 0
                    self.k[layer], self.v[layer] = k.roll(delta, 2), v.roll(delta, 2)
                    continue
                nk = k.new_zeros(k.size(0), k.size(1), max_len, k.size(3))
                nv = v.new_zeros(v.size(0), v.size(1), max_len, v.size(3))
                nk[:, :, lo + delta:self.pos + delta] = k[:, :, lo:self.pos]
                nv[:, :, lo + delta:self.pos + delta] = v[:, :, lo:self.pos]
                self.k[layer], self.v[layer] = nk, nv
        self.slots = [n if w else max_len for w, n in zip(self.windows, self.slots)]
        self.max_len = max_len
        self.pos += delta
        self.start = self.start + delta
        self._valid.clear()

    def repeat_rows(self, n: int) -> None:
        """Turn a batch-1 cache into n identical rows (prefill once, then sample n continuations)."""
        if self.batch_size != 1:
            raise ValueError("repeat_rows needs a batch-1 cache")
        if self.k is not None:
            self.k = [t.expand(n, -1, -1, -1).contiguous() for t in self.k]
            self.v = [t.expand(n, -1, -1, -1).contiguous() for t in self.v]
        if self.last is not None:
            self.last = self.last.expand(n, -1, -1).contiguous()
        self.batch_size = n


class StaticKVCache:
    """A DynamicKVCache's buffers, written and read at a position held in a tensor, for one-token
    decode steps only: no Python int changes from one step to the next, so torch.compile traces
    the step once for every position (and on CUDA can replay it as a graph).

    Every step attends over all the slots of every layer, the unwritten ones (and a padded row's
    pad keys) masked. That reads the whole cache instead of the filled part, which costs little:
    with GQA the cache of a depth-8 model at context 1024 is 1/40 of its weights. (Masked slots
    must hold finite numbers, see attention: DynamicKVCache allocates zeros.)"""

    def __init__(self, cache: DynamicKVCache):
        if cache.k is None:
            raise ValueError("StaticKVCache wraps a cache that has been prefilled")
        device = cache.k[0].device
        self.k, self.v, self.windows, self.slots = cache.k, cache.v, cache.windows, cache.slots
        self.max_len, self.start = cache.max_len, cache.start
        self.pos = torch.tensor([cache.pos], device=device)
        self.slot_index = [torch.arange(n, device=device) for n in self.slots]
        self.last = cache.last.clone() if cache.last is not None else None
        if device.type == "cuda":  # a CUDA graph replays fixed addresses: say that these stay put
            for t in (*self.k, *self.v, self.pos, *self.slot_index, *([self.last] if self.last is not None else [])):
                torch._dynamo.mark_static_address(t)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        n = self.slots[layer]
        slot = self.pos % n
        self.k[layer].index_copy_(2, slot, k)
        self.v[layer].index_copy_(2, slot, v)
        return self.k[layer], self.v[layer], 0

    def key_valid(self, layer: int, n_keys: int, k_start: int, T: int) -> torch.Tensor:
        """Slot s holds the latest position p <= pos with p = s (mod slots), negative if none."""
        s, n = self.slot_index[layer], self.slots[layer]
        kpos = s + n * torch.div(self.pos - s, n, rounding_mode="floor")
        if self.start is None:
            return (kpos >= 0)[None, :]
        return kpos[None, :] >= self.start[:, None].clamp(min=0)

    def positions(self, T: int) -> torch.Tensor:
        return self.pos

    def previous(self, x: torch.Tensor) -> torch.Tensor:
        prev = self.last.clone()  # one token per row, after a prefill: always a real predecessor
        self.last.copy_(x)
        return prev

    def advance(self, n: int) -> None:
        self.pos.add_(n)
