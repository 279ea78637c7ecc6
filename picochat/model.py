"""The GPT, in one file.

A decoder-only transformer in the nanochat family:
- token embedding, then a parameter-free RMSNorm (also before the head and inside each block);
- rotary position embeddings and QK-norm; grouped-query attention (n_kv_head divides n_head);
- sliding-window attention on the layers the pattern marks `S`, full causal attention on `L`;
- ReLU^2 MLP (4x), no biases anywhere, untied input and output embeddings;
- two learnable scalars per layer: one scales the residual stream, one mixes back the first
  embedding x0 (a cheap skip connection that helps small models);
- logits soft-capped with tanh, in fp32.

Attention is PyTorch SDPA, plus banded_attention for sliding windows; on CUDA, flash-attn's kernel
where the package is installed (flash_attention, with SDPA as the fallback).

forward(idx, targets=None, kv_cache=None): with targets it returns the loss; without, the logits.
With a KVCache it attends over the cached prefix and appends the new keys and values, so a prefill
followed by one-token decodes gives the same logits as one full forward.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from torch.utils.weak import WeakIdKeyDictionary

from .common import first_line, log
from .config import ModelConfig


def norm(x: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x, (x.size(-1),))


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x1[i], x2[i]) of each head by a position-dependent angle. x: (B, T, H, D)."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)


# ----------------------------------------------------------------------------- attention kernels

def _find_flash_attn():
    """flash_attn_func of the flash-attn package (`pip install flash-attn`, CUDA only), or None.
    Looked up once, at import, and only where CUDA is."""
    if not torch.cuda.is_available():
        return None
    try:
        from flash_attn import flash_attn_func
    except Exception:  # not installed, or built for another CUDA or torch
        return None
    return flash_attn_func


FLASH_ATTN = _find_flash_attn()


def flash_attention(q, k, v, window: int) -> torch.Tensor | None:
    """Causal attention by flash-attn's kernel, which takes GQA and the sliding window natively
    (query i sees keys i - window + 1 .. i), so banded_attention's blocks are not needed. Returns
    None where it cannot run (not installed, a GPU older than it supports, fp32...): the caller
    then takes SDPA. Its layout is (B, T, H, D): a transpose of ours, a view, no copy."""
    global FLASH_ATTN
    if FLASH_ATTN is None or not q.is_cuda:
        return None
    dtype = q.dtype
    if dtype == torch.float32 and torch.is_autocast_enabled("cuda"):
        # autocast runs the norms in fp32 and leaves q, k fp32; SDPA is on its list of ops cast
        # down, flash-attn (a custom function) is not, so cast here as autocast would
        dtype = torch.get_autocast_dtype("cuda")
    if dtype not in (torch.float16, torch.bfloat16):
        return None
    try:
        y = FLASH_ATTN(q.transpose(1, 2).to(dtype), k.transpose(1, 2).to(dtype), v.transpose(1, 2).to(dtype),
                       causal=True, window_size=(window - 1, 0) if window else (-1, -1))
    except RuntimeError as e:  # e.g. "FlashAttention only supports Ampere GPUs or newer"
        log(f"flash-attn failed ({first_line(e)}); using PyTorch SDPA from now on")
        FLASH_ATTN = None
        return None
    return y.transpose(1, 2)


_band_masks: dict = {}


def _band_mask(n_blocks: int, block: int, window: int, group: int, device) -> torch.Tensor:
    """Mask for banded attention: (n_blocks, group*block, block+window), True = may attend.

    Block b holds queries at b*block + i; its keys start `window` positions earlier, so key j sits
    at b*block - window + j. Allowed: key <= query, query - key < window, key >= 0."""
    key = (n_blocks, block, window, group, str(device))
    if key not in _band_masks:
        i = torch.arange(block, device=device).view(1, block, 1)
        j = torch.arange(block + window, device=device).view(1, 1, -1)
        b = torch.arange(n_blocks, device=device).view(-1, 1, 1)
        mask = (j > i) & (j <= i + window) & (j >= window - b * block)
        _band_masks[key] = mask.repeat(1, group, 1)
    return _band_masks[key]


def banded_attention(q, k, v, window: int) -> torch.Tensor:
    """Causal attention limited to the last `window` keys, at a cost of O(T * window).

    A mask on full attention would cost as much as full attention (SDPA kernels cannot skip
    arbitrary masked blocks), so the sequence is cut into query blocks that each see only their
    own keys and the `window` before them. Queries that share a kv head (GQA) are stacked into one
    block, so keys are never copied per query head. q: (B, H, T, D); k, v: (B, Hkv, T, D)."""
    B, H, T, D = q.shape
    Hkv = k.size(1)
    group = H // Hkv
    block = window // 2 if window % 2 == 0 else window  # keys per block: 1.5 windows
    n_blocks = -(-T // block)
    pad = n_blocks * block - T
    q = F.pad(q, (0, 0, 0, pad))
    # left-pad keys by one window so every block sees a full-length span, then view the spans
    k = F.pad(k, (0, 0, window, pad)).unfold(2, block + window, block).transpose(-1, -2)
    v = F.pad(v, (0, 0, window, pad)).unfold(2, block + window, block).transpose(-1, -2)
    k = k.reshape(B * Hkv, n_blocks, block + window, D)
    v = v.reshape(B * Hkv, n_blocks, block + window, D)
    q = q.view(B, Hkv, group, n_blocks, block, D).transpose(2, 3)
    q = q.reshape(B * Hkv, n_blocks, group * block, D)
    mask = _band_mask(n_blocks, block, window, group, q.device)
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    y = y.view(B, Hkv, n_blocks, group, block, D).transpose(2, 3)
    return y.reshape(B, H, n_blocks * block, D)[:, :, :T]


def attention(q, k, v, window: int, q_start: int = 0, k_start: int = 0,
              key_valid: torch.Tensor | None = None) -> torch.Tensor:
    """q: (B, H, Tq, D) at positions q_start..; k, v: (B, Hkv, Tk, D) at positions k_start...

    With a KV cache the cache has already cut the keys down to those the queries may see (the
    last `window` for a sliding-window layer), so a one-token decode needs no mask at all; its
    keys may even come out of a ring buffer in rotated order, which softmax does not care about
    (RoPE was applied before caching, so each key carries its own position).

    key_valid (B, Tk), only for a batch of left-padded rows (KVCache.start): False marks a pad key,
    which no query may see. A pad query still sees itself, so that no row of the mask is empty
    (an all-masked softmax is NaN, and a NaN in a pad's cached value would leak through the
    zero weight the real queries give it: 0 * NaN = NaN)."""
    Tq, Tk = q.size(2), k.size(2)
    gqa = q.size(1) != k.size(1)
    if key_valid is not None:
        mask = key_valid[:, None, None, :]
        if Tq > 1:  # keys are in position order here (only a one-token decode reads a rotated ring)
            qpos = torch.arange(q_start, q_start + Tq, device=q.device).view(-1, 1)
            kpos = torch.arange(k_start, k_start + Tk, device=q.device).view(1, -1)
            causal = kpos <= qpos
            if window:
                causal &= qpos - kpos < window
            mask = (mask & causal) | (kpos == qpos)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
    if Tq == Tk and q_start == k_start:  # no cached prefix: training, or the first prefill
        y = flash_attention(q, k, v, window)
        if y is not None:
            return y
        if window and window < Tq:
            return banded_attention(q, k, v, window)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    if Tq == 1:  # one-token decode sees every key it is given
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
    # a chunk after a prefix: SDPA's is_causal aligns top-left, so build the mask explicitly
    qpos = torch.arange(q_start, q_start + Tq, device=q.device).view(-1, 1)
    kpos = torch.arange(k_start, k_start + Tk, device=q.device).view(1, -1)
    mask = kpos <= qpos
    if window:
        mask &= qpos - kpos < window
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


class KVCache:
    """Keys and values of every layer for a batch of sequences, preallocated.

    Full-attention layers keep all max_len positions. A sliding-window layer only ever looks at
    its last `window` keys, so it keeps a ring buffer of `window` slots (position p lives in slot
    p % window): at depth 4 with the 1/4-context window that is 44% of the full cache's memory.
    Both store n_kv_head heads, not n_head (GQA). Allocated on first use with the dtype and device
    of the keys, so it follows autocast.

    update() returns, per layer, the keys and values the new queries may attend to plus the
    position of the first one (meaningful when they are in order; a one-token decode gets the
    ring in rotated order, which attention over a set of keys does not mind).

    Rows of different lengths (the engine's generate_many and the server's batches) share one
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

    def advance(self, n: int) -> None:
        self.pos += n
        self._valid.clear()

    # ------------------------------------------------------------- padded-batch operations

    def index_rows(self, idx: torch.Tensor) -> None:
        """Keep the rows idx, in that order (repeats allowed: one prompt, n samples)."""
        if self.k is not None:
            self.k = [t.index_select(0, idx) for t in self.k]
            self.v = [t.index_select(0, idx) for t in self.v]
        if self.start is not None:
            self.start = self.start.index_select(0, idx.to(self.start.device))
        self.batch_size = idx.numel()
        self._valid.clear()

    def cat(self, other: KVCache) -> None:
        """Append other's rows. Both must be at the same position with the same max_len."""
        if other.pos != self.pos or other.max_len != self.max_len:
            raise ValueError("cat needs caches at the same position and of the same length")
        n = self.batch_size
        if other.k is not None:
            self.k = [torch.cat([a, b]) for a, b in zip(self.k, other.k)]
            self.v = [torch.cat([a, b]) for a, b in zip(self.v, other.v)]
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
            c = self.config
            d = c.head_dim
            inv_freq = c.rope_base ** (-torch.arange(0, d, 2, dtype=torch.float32, device=self.k[0].device) / d)
            angle = delta * inv_freq
            cos, sin = angle.cos(), angle.sin()
            lo = max(0, -delta)  # first old position kept
            for layer, (w, n) in enumerate(zip(self.windows, self.slots)):
                k, v = self.k[layer], self.v[layer]
                if delta:  # apply_rotary's layout is (..., D) with cos over the last half: any shape fits
                    k = apply_rotary(k, cos, sin)
                if w:  # position p lives in slot p % n: the ring rolls with the labels
                    if self.pos < n:  # slots never written (torch.empty) would roll into view
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
        self.batch_size = n


class StaticKVCache:
    """A KVCache's buffers, written and read at a position held in a tensor, for one-token decode
    steps only: no Python int changes from one step to the next, so torch.compile traces the step
    once for every position (and on CUDA can replay it as a graph).

    Every step attends over all the slots of every layer, the unwritten ones (and a padded row's
    pad keys) masked. That reads the whole cache instead of the filled part, which costs little:
    with GQA the cache of a depth-8 model at context 1024 is 1/40 of its weights. (Masked slots
    must hold finite numbers, see attention: KVCache allocates zeros.)"""

    def __init__(self, cache: KVCache):
        if cache.k is None:
            raise ValueError("StaticKVCache wraps a cache that has been prefilled")
        device = cache.k[0].device
        self.k, self.v, self.windows, self.slots = cache.k, cache.v, cache.windows, cache.slots
        self.max_len, self.start = cache.max_len, cache.start
        self.pos = torch.tensor([cache.pos], device=device)
        self.slot_index = [torch.arange(n, device=device) for n in self.slots]
        if device.type == "cuda":  # a CUDA graph replays fixed addresses: say that these stay put
            for t in (*self.k, *self.v, self.pos, *self.slot_index):
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

    def advance(self, n: int) -> None:
        self.pos.add_(n)


# ----------------------------------------------------------------------------- the network

def loss_chunk_rows(vocab_size: int) -> int:
    """Tokens per chunk of the checkpointed loss: about 32M logits (128 MB in fp32) at a time."""
    return max(128, (1 << 25) // vocab_size)


# oneDNN's linear on a weight packed ahead of time (the op inductor uses for frozen CPU models).
# The packed copies live here, not on the modules, so that a model still deep-copies and pickles.
_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
PACKED_WEIGHTS = WeakIdKeyDictionary()  # weight -> ((data_ptr, version), packed weight)


class Linear(nn.Linear):
    """nn.Linear (no bias), with faster paths for inference on CPU, where BLAS is slow at the
    few-row products of decoding.

    Decoding is a matrix times a few vectors per layer (one per sequence of the batch), bound by
    reading the weights from memory. BLAS reads them slowly for so few rows: a one-row product
    runs on one thread at about half the memory bandwidth, and 2 to 16 rows are slower still
    (measured: the depth-4 head, 32768 x 384, 4.2 ms for 1 row = 12 GB/s, 10.3 ms for 2).
    - One row (or up to 16 on a smaller weight): cut into 2 or 4 row blocks, the product is a
      batched matmul whose blocks run on every core: 2.2 ms.
    - 2 to 256 rows, weights of 2^18 elements or more: oneDNN's linear on a copy of the weight
      packed for it, repacked when the weight changes (its version counter moves on every in-place
      update). At 8 rows 1.4x (the head) to 3x (a depth-8 MLP matrix) faster than BLAS, and 2x on
      the head at 32 to 64 rows (a prompt's prefill); at 512 rows it is no better, so BLAS keeps
      the bigger products (evals, training).
      The packed copy costs the weight's memory once more (the trainer frees it at each step).
    Small weights, which stay in cache, and training (autograd on) take F.linear. Under
    torch.compile the row blocks are what inductor turns into fused kernels of its own (F.linear
    would stay a BLAS call). bench/bench_decode.py measures the whole step."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if x.device.type != "cpu" or (torch.is_grad_enabled() and (w.requires_grad or x.requires_grad)):
            return F.linear(x, w)
        rows = x.numel() // max(x.size(-1), 1)
        if 2 <= rows <= 256 and w.numel() >= 1 << 18 and _ONEDNN and x.dtype == w.dtype == torch.float32 \
                and not torch.compiler.is_compiling():
            key = (w.data_ptr(), w._version)
            packed_key, packed = PACKED_WEIGHTS.get(w, (None, None))
            if packed_key != key:
                # packed for 8 rows: measured as good as a packing for 1 at 1 to 16 rows, better above
                packed = torch.ops.mkldnn._reorder_linear_weight(w.detach(), 8)
                PACKED_WEIGHTS[w] = (key, packed)
            y = torch.ops.mkldnn._linear_pointwise(x.reshape(rows, -1), packed, None, "none", [], "")
            return y.view(*x.shape[:-1], w.size(0))
        k = 4 if w.numel() >= 1 << 23 else 2
        if rows <= 16 and w.numel() >= 1 << 16 and w.size(0) % k == 0:
            # the rows as columns whose layout reads as transposed, (k, in, rows) with strides
            # (0, 1, in): a plain reshape's layout sends BLAS down a path 5x slower
            xs = x.reshape(1, rows, -1).expand(k, rows, -1).mT
            y = torch.bmm(w.view(k, -1, w.size(1)), xs)  # (k, out / k, rows)
            return y.permute(2, 0, 1).reshape(*x.shape[:-1], w.size(0))
        return F.linear(x, w)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        d, kv = config.n_embd, config.n_kv_head * config.head_dim
        self.c_q = Linear(d, d, bias=False)
        self.c_k = Linear(d, kv, bias=False)
        self.c_v = Linear(d, kv, bias=False)
        self.c_proj = Linear(d, d, bias=False)

    def forward(self, x, cos, sin, window: int, kv_cache: KVCache | None):
        B, T, _ = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        # QK-norm keeps attention logits bounded whatever the weights do; RMSNorm commutes with the
        # rotation (it preserves the norm), so the order of the two does not matter
        q, k = apply_rotary(norm(q), cos, sin), apply_rotary(norm(k), cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        q_start = k_start = 0
        valid = None
        if kv_cache is not None:
            q_start = kv_cache.pos
            k, v, k_start = kv_cache.update(self.layer, k, v)
            valid = kv_cache.key_valid(self.layer, k.size(2), k_start, T)
        y = attention(q, k, v, window, q_start, k_start, valid)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.c_fc = Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.attn = Attention(config, layer)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, window, kv_cache):
        x = x + self.attn(norm(x), cos, sin, window, kv_cache)
        return x + self.mlp(norm(x))


class GPT(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.windows = config.layer_windows()
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.lm_head = Linear(config.n_embd, config.vocab_size, bias=False)
        self.resid_lambdas = nn.Parameter(torch.ones(config.n_layer))
        self.x0_lambdas = nn.Parameter(torch.zeros(config.n_layer))
        # recompute each block's activations in the backward pass instead of keeping them: a
        # training setting (--grad-checkpoint), not part of the saved config
        self.grad_checkpoint = False
        self._rotary_len = 0
        self._set_rotary(2 * config.sequence_len)
        self.init_weights()

    def _set_rotary(self, length: int, device=None) -> None:
        d = self.config.head_dim
        inv_freq = self.config.rope_base ** (-torch.arange(0, d, 2, dtype=torch.float32, device=device) / d)
        angles = torch.outer(torch.arange(length, dtype=torch.float32, device=device), inv_freq)
        # (T, 1, D/2): broadcasts over batch in front and heads behind
        self.register_buffer("rope_cos", angles.cos()[:, None, :], persistent=False)
        self.register_buffer("rope_sin", angles.sin()[:, None, :], persistent=False)
        self._rotary_len = length

    @torch.no_grad()
    def init_weights(self) -> None:
        """Input projections ~ U(-a, a) with std 1/sqrt(d); output projections zero, so every block
        starts as the identity and depth cannot blow the residual stream up; a near-zero head so
        the first loss is log(vocab)."""
        d = self.config.n_embd
        bound = math.sqrt(3.0 / d)
        nn.init.normal_(self.wte.weight, std=1.0)
        nn.init.normal_(self.lm_head.weight, std=0.001)
        for block in self.blocks:
            for lin in (block.attn.c_q, block.attn.c_k, block.attn.c_v, block.mlp.c_fc):
                nn.init.uniform_(lin.weight, -bound, bound)
            nn.init.zeros_(block.attn.c_proj.weight)
            nn.init.zeros_(block.mlp.c_proj.weight)
        self.resid_lambdas.fill_(1.0)
        self.x0_lambdas.fill_(0.0)

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Which optimizer each parameter belongs to: Muon for hidden matrices, AdamW for the rest."""
        return {
            "matrix": [p for p in self.blocks.parameters()],
            "embedding": [self.wte.weight],
            "head": [self.lm_head.weight],
            "scalar": [self.resid_lambdas, self.x0_lambdas],
        }

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx, targets=None, kv_cache: KVCache | None = None, loss_reduction: str = "mean",
                where: torch.Tensor | None = None):
        """Logits (B, T, vocab), or the loss against targets (-1 = ignored). `where`, a (B, T) bool
        mask, asks for the logits at those positions only, as (N, vocab): evals score a few
        positions per sequence, and the head is the biggest matmul of a small model."""
        B, T = idx.shape
        start = kv_cache.pos if kv_cache is not None else 0
        if isinstance(start, torch.Tensor):  # a StaticKVCache: one token at a position held in a tensor
            cos, sin = self.rope_cos[start], self.rope_sin[start]
        else:
            if start + T > self._rotary_len:
                self._set_rotary(2 * (start + T), device=idx.device)
            cos, sin = self.rope_cos[start:start + T], self.rope_sin[start:start + T]

        x = norm(self.wte(idx))
        x0 = x
        recompute = self.grad_checkpoint and kv_cache is None and torch.is_grad_enabled()
        for i, block in enumerate(self.blocks):
            x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            if recompute:  # only the block's input is kept; its insides are rebuilt for backward
                x = checkpoint(block, x, cos, sin, self.windows[i], None, use_reentrant=False)
            else:
                x = block(x, cos, sin, self.windows[i], kv_cache)
        if kv_cache is not None:
            kv_cache.advance(T)
        x = norm(x)
        if where is not None:
            if targets is not None:
                raise ValueError("forward: `where` selects logits; it cannot be combined with targets")
            x = x[where]

        if targets is not None and recompute:
            return self._chunked_loss(x, targets, loss_reduction)
        logits = self._logits(x)
        if targets is None:
            return logits
        # targets of -1 (padding, masked turns) contribute nothing
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1),
                               ignore_index=-1, reduction=loss_reduction)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(x).float()
        cap = self.config.softcap
        return cap * torch.tanh(logits / cap)

    def _chunked_loss(self, x: torch.Tensor, targets: torch.Tensor, reduction: str) -> torch.Tensor:
        """The loss a few rows of logits at a time, each chunk recomputed in the backward pass: with
        --grad-checkpoint the fp32 logits (4 x vocab values per token kept or in flight) would
        otherwise be most of the memory left."""
        x, targets = x.reshape(-1, x.size(-1)), targets.reshape(-1)
        rows = loss_chunk_rows(self.config.vocab_size)

        def part(xc, tc):
            return F.cross_entropy(self._logits(xc), tc, ignore_index=-1, reduction="none")
        losses = torch.cat([checkpoint(part, xc, tc, use_reentrant=False)
                            for xc, tc in zip(x.split(rows), targets.split(rows))])
        if reduction == "none":
            return losses
        total = losses.sum()
        return total if reduction == "sum" else total / (targets != -1).sum()
