"""The GPT, in one file.

A decoder-only transformer in the nanochat family:
- token embedding, then a parameter-free RMSNorm (also before the head and inside each block);
- rotary position embeddings and QK-norm; grouped-query attention (n_kv_head divides n_head);
- sliding-window attention on the layers the pattern marks `S`, full causal attention on `L`;
- ReLU^2 MLP (4x), no biases anywhere, untied input and output embeddings;
- two learnable scalars per layer: one scales the residual stream, one mixes back the first
  embedding x0 (a cheap skip connection that helps small models);
- logits soft-capped with tanh, in fp32.

forward(idx, targets=None, kv_cache=None): with targets it returns the loss; without, the logits.
With a KVCache it attends over the cached prefix and appends the new keys and values, so a prefill
followed by one-token decodes gives the same logits as one full forward.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig


def norm(x: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x, (x.size(-1),))


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x1[i], x2[i]) of each head by a position-dependent angle. x: (B, T, H, D)."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)


# ----------------------------------------------------------------------------- attention kernels

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


def attention(q, k, v, window: int, q_start: int) -> torch.Tensor:
    """q: (B, H, Tq, D) at positions q_start..q_start+Tq-1; k, v: (B, Hkv, Tk, D) at 0..Tk-1."""
    Tq, Tk = q.size(2), k.size(2)
    gqa = q.size(1) != k.size(1)
    if Tq == Tk:  # no cached prefix: training, or the first prefill
        if window and window < Tq:
            return banded_attention(q, k, v, window)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    if window:  # only the last `window` keys can be seen by any of these queries
        first = max(0, q_start - window + 1)
        k, v = k[:, :, first:], v[:, :, first:]
    else:
        first = 0
    if Tq == 1:  # one-token decode sees every key left
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
    # a chunk after a prefix: SDPA's is_causal aligns top-left, so build the mask explicitly
    qpos = torch.arange(q_start, q_start + Tq, device=q.device).view(-1, 1)
    kpos = torch.arange(first, Tk, device=q.device).view(1, -1)
    mask = kpos <= qpos
    if window:
        mask &= qpos - kpos < window
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


class KVCache:
    """Keys and values of every layer for a batch of sequences, preallocated to max_len.

    Allocated on first use with the dtype and device of the keys, so it follows autocast."""

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int):
        self.config, self.batch_size, self.max_len = config, batch_size, max_len
        self.k = self.v = None
        self.pos = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store k, v (B, Hkv, T, D) at the current position; return all keys and values so far."""
        if self.k is None:
            c = self.config
            shape = (c.n_layer, self.batch_size, c.n_kv_head, self.max_len, c.head_dim)
            self.k = torch.empty(shape, dtype=k.dtype, device=k.device)
            self.v = torch.empty(shape, dtype=v.dtype, device=v.device)
        end = self.pos + k.size(2)
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} > {self.max_len} positions")
        self.k[layer, :, :, self.pos:end] = k
        self.v[layer, :, :, self.pos:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def advance(self, n: int) -> None:
        self.pos += n


# ----------------------------------------------------------------------------- the network

class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        d, kv = config.n_embd, config.n_kv_head * config.head_dim
        self.c_q = nn.Linear(d, d, bias=False)
        self.c_k = nn.Linear(d, kv, bias=False)
        self.c_v = nn.Linear(d, kv, bias=False)
        self.c_proj = nn.Linear(d, d, bias=False)

    def forward(self, x, cos, sin, window: int, kv_cache: KVCache | None):
        B, T, _ = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        # QK-norm keeps attention logits bounded whatever the weights do; RMSNorm commutes with the
        # rotation (it preserves the norm), so the order of the two does not matter
        q, k = apply_rotary(norm(q), cos, sin), apply_rotary(norm(k), cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        q_start = 0
        if kv_cache is not None:
            q_start = kv_cache.pos
            k, v = kv_cache.update(self.layer, k, v)
        y = attention(q, k, v, window, q_start)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

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
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.resid_lambdas = nn.Parameter(torch.ones(config.n_layer))
        self.x0_lambdas = nn.Parameter(torch.zeros(config.n_layer))
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

    def forward(self, idx, targets=None, kv_cache: KVCache | None = None, loss_reduction: str = "mean"):
        B, T = idx.shape
        start = kv_cache.pos if kv_cache is not None else 0
        if start + T > self._rotary_len:
            self._set_rotary(2 * (start + T), device=idx.device)
        cos, sin = self.rope_cos[start:start + T], self.rope_sin[start:start + T]

        x = norm(self.wte(idx))
        x0 = x
        for i, block in enumerate(self.blocks):
            x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            x = block(x, cos, sin, self.windows[i], kv_cache)
        if kv_cache is not None:
            kv_cache.advance(T)
        x = norm(x)

        logits = self.lm_head(x).float()
        cap = self.config.softcap
        logits = cap * torch.tanh(logits / cap)
        if targets is None:
            return logits
        # targets of -1 (padding, masked turns) contribute nothing
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1),
                               ignore_index=-1, reduction=loss_reduction)
