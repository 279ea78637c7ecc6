"""Attention kernels: rotary embeddings, and causal attention over (B, H, T, D) queries and keys.

- flash_attention: flash-attn's kernel on CUDA where the package is installed (GQA and sliding
  windows natively), None where it cannot run;
- banded_attention: a sliding window at O(T x window) cost (SDPA with a window mask costs as much
  as full attention);
- attention: the dispatcher the model calls, for training, prefill and KV-cache decoding
  (PyTorch SDPA by default).

To add a kernel: a function with attention()'s arguments that returns None where it cannot run,
tried first in attention()'s no-cache branch, with a test against SDPA (tests/test_model.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .common import first_line, log


def rotary_tables(head_dim: int, base: float, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotary angles at `positions` (float, any shape P): (*P, head_dim / 2).
    Pair i of a head turns by position x base^(-2i / head_dim): fast near the front, slow at the
    back, so that both near and far offsets are told apart."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim)
    angles = positions.float()[..., None] * inv_freq
    return angles.cos(), angles.sin()


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


def _band_mask(n_blocks: int, block: int, window: int, group: int, dtype, device) -> torch.Tensor:
    """Additive mask for banded attention: (1, n_blocks, group*block, block+window), 0 where a query
    may attend, -inf where not. Four dimensions: SDPA on a CPU takes its flash kernel (which keeps
    only q, k, v, the output and the log-normalizers for backward) for a 2-D or 4-D mask, but its
    math path for a 3-D one (which keeps two fp32 score matrices, the inputs cast to fp32 besides).
    In the queries' dtype, and kept here: SDPA would turn a bool mask into such a tensor at every
    call, and keep that copy for the backward pass, one per layer.

    Block b holds queries at b*block + i; its keys start `window` positions earlier, so key j sits
    at b*block - window + j. Allowed: key <= query, query - key < window, key >= 0."""
    key = (n_blocks, block, window, group, dtype, str(device))
    if key not in _band_masks:
        i = torch.arange(block, device=device).view(1, block, 1)
        j = torch.arange(block + window, device=device).view(1, 1, -1)
        b = torch.arange(n_blocks, device=device).view(-1, 1, 1)
        allowed = (j > i) & (j <= i + window) & (j >= window - b * block)
        mask = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(~allowed, float("-inf"))
        _band_masks[key] = mask.repeat(1, group, 1).unsqueeze(0)
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
    mask = _band_mask(n_blocks, block, window, group, q.dtype, q.device)
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

    key_valid (B, Tk), only for a batch of left-padded rows (DynamicKVCache.start): False marks a pad key,
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
