"""The GPT, in one file.

A decoder-only transformer in the nanochat family:
- token embedding, then a parameter-free RMSNorm (also before the head and inside each block);
- rotary position embeddings and QK-norm; grouped-query attention (n_kv_head divides n_head);
- sliding-window attention on the layers the pattern marks `S`, full causal attention on `L`;
- ReLU^2 MLP (config.mlp_hidden wide), no biases anywhere, untied input and output embeddings;
- two learnable scalars per layer: one scales the residual stream, one mixes back the first
  embedding x0 (a cheap skip connection that helps small models);
- logits soft-capped with tanh, in fp32; with targets, the head and the loss run a chunk of rows
  at a time (loss.py), so a micro-batch's logits never exist at once.
And, each switched on by a ModelFeatures setting (config.py; all on in nanochat at HEAD):
- value embeddings (ResFormer): on alternating layers, the last included, a per-token embedding
  is added to the values, through a gate per kv head, 3 sigmoid(W x[:12]) of the block's input;
- smear: each token's embedding gets the previous token's, through a gate, lambda sigmoid(W x[:24])
  (a cheap bigram; the KV cache remembers the last embedding of each row for the next step);
- backout: a learned multiple of the residual stream after the middle layer is subtracted before
  the final norm, taking low-level features out of what the head sees;
- queries and keys scaled after QK-norm, a rotary base, init scales, and the vocabulary padded to
  a multiple (the logits are cut back to the vocabulary).

Attention kernels live in attention.py, the KV caches in kv_cache.py, the Linear layer's CPU
inference paths in linear.py: this file is the network itself.

forward(idx, targets=None, kv_cache=None): with targets it returns the loss; without, the logits.
With a KV cache (kv_cache.KVCache) it attends over the cached prefix and appends the new keys and
values, so a prefill followed by one-token decodes gives the same logits as one full forward.

The model is also its own description: param_counts and flops_per_token count a model of a config
built on the meta device (no memory, no time), so every count — the plan's, the memory estimate's,
MFU's — is the model's own.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .attention import attention, rotary_tables
from .config import SMEAR_CHANNELS, VE_GATE_CHANNELS, ModelConfig
from .kv_cache import KVCache
from .linear import Linear
from .loss import head_loss, softcap
from .ops import norm_rotary, relu2_then
from .ops import rms_norm as norm


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        self.qk_scale = config.qk_scale
        d, kv = config.n_embd, config.n_kv_head * config.head_dim
        self.c_q = Linear(d, d)
        self.c_k = Linear(d, kv)
        self.c_v = Linear(d, kv)
        self.c_proj = Linear(d, d)
        self.ve_gate = Linear(VE_GATE_CHANNELS, config.n_kv_head) if config.has_value_embed(layer) else None

    def forward(self, x, ve, cos, sin, window: int, kv_cache: KVCache | None):
        B, T, _ = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        if ve is not None:  # the token's value embedding, gated per kv head in (0, 3)
            gate = 3 * torch.sigmoid(self.ve_gate(x[..., :VE_GATE_CHANNELS]))
            v = v + gate.unsqueeze(-1) * ve.view(B, T, self.n_kv_head, self.head_dim)
        # QK-norm keeps attention logits bounded whatever the weights do; RMSNorm commutes with the
        # rotation (it preserves the norm), so the order of the two does not matter
        # (qk_scale: sharper attention, the scale split between queries and keys)
        q, k = norm_rotary(q, cos, sin, self.qk_scale), norm_rotary(k, cos, sin, self.qk_scale)
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
        self.c_fc = Linear(config.n_embd, config.mlp_hidden)
        self.c_proj = Linear(config.mlp_hidden, config.n_embd)

    def forward(self, x):
        return relu2_then(self.c_fc(x), self.c_proj)


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.attn = Attention(config, layer)
        self.mlp = MLP(config)

    def forward(self, x, ve, cos, sin, window, kv_cache):
        x = x + self.attn(norm(x), ve, cos, sin, window, kv_cache)
        return x + self.mlp(norm(x))


class GPT(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.windows = config.layer_windows()
        rows, kv = config.padded_vocab, config.n_kv_head * config.head_dim
        self.wte = nn.Embedding(rows, config.n_embd)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.lm_head = Linear(config.n_embd, rows)
        self.resid_lambdas = nn.Parameter(torch.ones(config.n_layer))
        self.x0_lambdas = nn.Parameter(torch.zeros(config.n_layer))
        self.value_embeds = nn.ModuleDict({str(i): nn.Embedding(rows, kv) for i in range(config.n_layer)
                                           if config.has_value_embed(i)})
        if config.smear:
            self.smear_gate = Linear(SMEAR_CHANNELS, 1)
            self.smear_lambda = nn.Parameter(torch.zeros(1))
        if config.backout:
            self.backout_lambda = nn.Parameter(torch.zeros(1))
        # recompute each block's activations in the backward pass instead of keeping them: a
        # training setting (--grad-checkpoint), not part of the saved config
        self.grad_checkpoint = False
        # the dtype activations take in training (computing_in); None: the weights' own
        self.compute_dtype: torch.dtype | None = None
        # LoRA (lora.py): the head's weight as the loss reads it, with the rows it trains; None: lm_head's
        self.head_rows = None
        self.set_rotary(2 * config.sequence_len)
        self.init_weights()

    def set_rotary(self, length: int, device=None) -> None:
        """(Re)build the rotary tables for positions 0..length-1 on `device` (they are buffers that
        are not saved: a model loaded on the meta device, then moved, builds them here)."""
        cos, sin = rotary_tables(self.config.head_dim, self.config.rope_base,
                                 torch.arange(length, dtype=torch.float32, device=device))
        # (T, 1, D/2): broadcasts over batch in front and heads behind
        self.register_buffer("rope_cos", cos[:, None, :], persistent=False)
        self.register_buffer("rope_sin", sin[:, None, :], persistent=False)

    @torch.no_grad()
    def init_weights(self) -> None:
        """Input projections ~ U(-a, a) with std 1/sqrt(d) (the MLP's times fc_init); output
        projections zero, so every block starts as the identity and depth cannot blow the residual
        stream up; a near-zero head so the first loss is log(vocab); value embeddings like the
        values; gates small and positive, so they start a little above neutral."""
        c = self.config
        bound = math.sqrt(3.0 / c.n_embd)
        nn.init.normal_(self.wte.weight, std=c.embed_std)
        nn.init.normal_(self.lm_head.weight, std=0.001)
        for block in self.blocks:
            for lin in (block.attn.c_q, block.attn.c_k, block.attn.c_v):
                nn.init.uniform_(lin.weight, -bound, bound)
            nn.init.uniform_(block.mlp.c_fc.weight, -bound * c.fc_init, bound * c.fc_init)
            nn.init.zeros_(block.attn.c_proj.weight)
            nn.init.zeros_(block.mlp.c_proj.weight)
            if block.attn.ve_gate is not None:
                nn.init.uniform_(block.attn.ve_gate.weight, 0.0, 0.02)
        for ve in self.value_embeds.values():
            nn.init.uniform_(ve.weight, -bound, bound)
        if c.scalar_init == "ramp":  # stronger residual and more x0 early, less deep down
            depth = torch.arange(c.n_layer, dtype=torch.float32) / max(c.n_layer - 1, 1)
            self.resid_lambdas.copy_(1.15 - 0.10 * depth)
            self.x0_lambdas.copy_(0.20 - 0.15 * depth)
        else:
            self.resid_lambdas.fill_(1.0)
            self.x0_lambdas.fill_(0.0)
        if c.smear:
            nn.init.uniform_(self.smear_gate.weight, 0.0, 0.02)
            self.smear_lambda.zero_()
        if c.backout:
            self.backout_lambda.fill_(0.2)

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Which optimizer each parameter belongs to: Muon for hidden matrices, AdamW for the rest."""
        groups = {
            "matrix": [p for p in self.blocks.parameters()],
            "embedding": [self.wte.weight],
            "head": [self.lm_head.weight],
            "resid": [self.resid_lambdas],
            "x0": [self.x0_lambdas],
        }
        if self.value_embeds:
            groups["value_embed"] = [ve.weight for ve in self.value_embeds.values()]
        gates = [self.smear_gate.weight, self.smear_lambda] if self.config.smear else []
        gates += [self.backout_lambda] if self.config.backout else []
        if gates:
            groups["gate"] = gates
        return groups

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @contextlib.contextmanager
    def computing_in(self, dtype: torch.dtype):
        """Forward passes in `dtype` while inside: the embeddings are cast to it, so the residual
        stream, the norms and every product run in it, each weight cast as a Linear uses it; the
        fp32 weights stay the optimizer's masters and receive fp32 gradients. Training's bf16 (the
        trainer's forward and backward): unlike autocast, which keeps the residual stream and the
        norms' saved inputs in fp32, it keeps bf16 activations (about 2 bytes a value, not 3.5)."""
        before, self.compute_dtype = self.compute_dtype, None if dtype == torch.float32 else dtype
        try:
            yield
        finally:
            self.compute_dtype = before

    def forward(self, idx, targets=None, kv_cache: KVCache | None = None, loss_reduction: str = "mean",
                where: torch.Tensor | None = None):
        """Logits (B, T, vocab), or the loss against targets (-1 = ignored). `where`, a (B, T) bool
        mask, asks for the logits at those positions only, as (N, vocab): evals score a few
        positions per sequence, and the head is the biggest matmul of a small model."""
        B, T = idx.shape
        end = kv_cache.max_len if kv_cache is not None else T
        if end > self.rope_cos.size(0):
            self.set_rotary(2 * end, device=idx.device)
        at = kv_cache.positions(T) if kv_cache is not None else slice(0, T)
        cos, sin = self.rope_cos[at], self.rope_sin[at]

        x = self.wte(idx)
        x = norm(x if self.compute_dtype is None else x.to(self.compute_dtype))
        if self.config.smear:
            x = self._smear(x, kv_cache)
        x0 = x
        recompute = self.grad_checkpoint and kv_cache is None and torch.is_grad_enabled()
        mid = None
        for i, block in enumerate(self.blocks):
            x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            ve = self.value_embeds[str(i)](idx).to(x.dtype) if block.attn.ve_gate is not None else None
            if recompute:  # only the block's input is kept; its insides are rebuilt for backward
                x = checkpoint(block, x, ve, cos, sin, self.windows[i], None, use_reentrant=False)
            else:
                x = block(x, ve, cos, sin, self.windows[i], kv_cache)
            if i == self.config.backout_layer:
                mid = x
        if kv_cache is not None:
            kv_cache.advance(T)
        if mid is not None:  # backout: take the middle layer's low-level features out again
            x = x - self.backout_lambda.to(x.dtype) * mid
        x = norm(x)
        if where is not None:
            if targets is not None:
                raise ValueError("forward: `where` selects logits; it cannot be combined with targets")
            x = x[where]

        if targets is None:
            return self._logits(x)
        if isinstance(self.lm_head, nn.Linear):  # the head and the loss a chunk of rows at a time (loss.py)
            w = self.lm_head.weight if self.head_rows is None else self.head_rows(self.lm_head.weight)
            return head_loss(x, w, targets, self.config.vocab_size, self.config.softcap, loss_reduction)
        # a quantized head (int8.py) is only ever evaluated; targets of -1 contribute nothing
        return F.cross_entropy(self._logits(x).flatten(0, -2), targets.reshape(-1), ignore_index=-1,
                               reduction=loss_reduction)

    def _smear(self, x: torch.Tensor, kv_cache: KVCache | None) -> torch.Tensor:
        """Each token's embedding plus its predecessor's, through a gate. A row's first token has
        none; with a KV cache the first new token's is the cache's (KVCache.previous)."""
        gate = self.smear_lambda.to(x.dtype) * torch.sigmoid(self.smear_gate(x[..., :SMEAR_CHANNELS]))
        prev = kv_cache.previous(x) if kv_cache is not None else F.pad(x[:, :-1], (0, 0, 1, 0))
        return x + gate * prev

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        return softcap(self.lm_head(x), self.config.vocab_size, self.config.softcap)


# ----------------------------------------------------------------------------- the model's own description

def vocab_rows(name: str) -> bool:
    """Whether the weight `name` has one row per token (the embeddings and the head)."""
    return name in ("wte.weight", "lm_head.weight") or name.startswith("value_embeds.")


def _meta(config: ModelConfig) -> GPT:
    with torch.device("meta"):
        return GPT(config)


def param_counts(config: ModelConfig) -> dict[str, int]:
    """Parameters per optimizer group (GPT.param_groups) of a model of `config`, counted on one
    built on the meta device: the only parameter count there is."""
    return {group: sum(p.numel() for p in params) for group, params in _meta(config).param_groups().items()}


def num_params(config: ModelConfig) -> int:
    return sum(param_counts(config).values())


def flops_per_token(config: ModelConfig) -> float:
    """Training FLOPs per token (forward + backward): 6 per weight of every matmul (every Linear:
    the blocks, the gates, the head; embeddings are lookups), plus attention's score and value
    products, PaLM's convention (no discount for the causal mask)."""
    matmul = sum(m.weight.numel() for m in _meta(config).modules() if isinstance(m, Linear))
    attn = sum(12 * config.n_head * config.head_dim * (min(w, config.sequence_len) or config.sequence_len)
               for w in config.layer_windows())
    return 6 * matmul + attn
