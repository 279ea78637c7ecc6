"""INT8 weight-only quantization: 1 byte per weight instead of 4, for inference.

Every linear layer (attention q/k/v/o and its value-embedding gate, the MLP, the lm_head) becomes
an Int8Linear: an int8 weight (out, in) and one fp32 scale per output channel, symmetric, scale =
absmax(row) / 127, so w ~= weight_int8 * scale[:, None]. Optionally (embeddings=True) the token
embedding and the value embeddings become Int8Embeddings with one scale per row (per token).
Activations stay in floating point; nothing is calibrated. The norms, the per-layer scalars, the
smear gate and the rotary tables stay fp32.

The kernel, measured on the reference CPU (AVX2, torch 2.13, 1 thread, a shared and busy machine;
`python bench/bench_quant.py` prints the table), microseconds per call at one row:
- `torch._weight_int8pack_mm(x, w_int8, scales)` reads the int8 weight directly. Its fp32 (and
  fp16) path is a scalar fallback here: 768x768 812 us vs 62 for the fp32 F.linear, lm_head
  32768x384 18.8 ms vs 5.7. Its bf16 path is vectorized: 768x768 61 vs 62 (a tie: that matrix
  sits in cache), 3072x768 198 vs 270, lm_head 32768x384 2.1 ms vs 5.7, 32768x768 5.8 vs 9.1;
  at 8 rows still 1.3-2.2x faster than fp32. It is a matrix-vector kernel: at 64 rows it is
  1.4-2.3x slower than fp32 sgemm.
- Dequantize-on-the-fly, `F.linear(x, w_int8.float()) * scale`, writes and re-reads a whole fp32
  copy of the weight every call: 2x slower than plain fp32 at one row (10x for the lm_head, whose
  50 MB temporary is fresh pages each time); at hundreds of rows (prefill, bpb) the conversion is
  amortized and sgemm does the work.
So forward() takes the int8 kernel in bf16 for up to INT8_MM_MAX_ROWS rows (decode, batched
decode), with the fp32 scales applied to its output in fp32 (bf16 rounds only the activations
and the dot products, about 0.2%, well under the int8 rounding itself), and dequantizes for more
rows and on other devices (CUDA/MPS dequantize for almost nothing). Nothing is cached: a cached
fp32 copy would give the 4x memory back.
The kernel also needs the inner dimension to be a multiple of 8 (others crash the process in
torch 2.13), so a layer that is not takes the dequantize path.

API:
    quantize_model(model, embeddings=False) -> model   (in place: swaps modules, frees fp32 weights)
    quantization_of(model) -> dict | None             (what config.json records)
`picochat quantize` (quantize.py) writes a quantized copy of a run dir.
A quantized model is for inference only: its param_groups() raises a PicochatError, so every
training stage refuses it with a clear message.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .common import PicochatError

METHOD = "int8-weight-only"
INT8_MM_MAX_ROWS = 16  # at 16 rows the int8 kernel still matched or beat fp32 sgemm; at 32 it lost
_HAS_KERNEL = hasattr(torch, "_weight_int8pack_mm")  # a private op: without it, dequantize


def quant_meta(embeddings: bool) -> dict:
    return {"method": METHOD, "per": "output-channel", "embeddings": bool(embeddings)}


@torch.no_grad()
def quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: (q int8 (N, K), scale fp32 (N,)) with w ~= q * scale[:, None].
    An all-zero row gets scale 0 (and q 0), so it dequantizes to exactly zero."""
    w = w.detach().float()
    scale = w.abs().amax(dim=1) / 127.0
    q = torch.round(w / torch.where(scale > 0, scale, 1.0)[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def _int8_param(shape, device) -> nn.Parameter:
    # a Parameter (not a buffer) so that num_params(), .to(device) and next(parameters()) see it
    return nn.Parameter(torch.empty(shape, dtype=torch.int8, device=device), requires_grad=False)


class Int8Linear(nn.Module):
    """y = x @ (weight * scale[:, None]).T with an int8 weight and fp32 per-output-channel scales."""

    def __init__(self, in_features: int, out_features: int, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = _int8_param((out_features, in_features), device)
        self.register_buffer("scale", torch.empty(out_features, dtype=torch.float32, device=device))
        # the kernel's own scales: ones, so that the real scales multiply in fp32 afterwards
        self.register_buffer("_ones", torch.ones(out_features, dtype=torch.bfloat16, device=device),
                             persistent=False)
        self._kernel_ok = _HAS_KERNEL and in_features % 8 == 0

    @classmethod
    def from_linear(cls, lin: nn.Linear) -> Int8Linear:
        if lin.bias is not None:
            raise PicochatError("int8 quantization: linear layers with a bias are not supported")
        m = cls(lin.in_features, lin.out_features, device=lin.weight.device)
        q, s = quantize_weight(lin.weight)
        m.weight.data, m.scale = q, s
        return m

    def _reset_ones(self) -> None:  # after to_empty() the non-persistent buffer is garbage
        self._ones = torch.ones(self.out_features, dtype=torch.bfloat16, device=self.weight.device)

    def dequantize(self) -> torch.Tensor:
        return self.weight.float() * self.scale[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if x.device.type == "cpu" and rows <= INT8_MM_MAX_ROWS and self._kernel_ok:
            x2 = x.reshape(rows, self.in_features).to(torch.bfloat16)
            y = torch._weight_int8pack_mm(x2, self.weight, self._ones) * self.scale  # bf16 * fp32 -> fp32
            if x.dtype != torch.float32:
                y = y.to(x.dtype)
            return y.view(*x.shape[:-1], self.out_features)
        y = F.linear(x, self.weight.to(x.dtype))  # under autocast F.linear runs in the autocast dtype
        return y * self.scale.to(y.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


class Int8Embedding(nn.Module):
    """A token embedding with int8 rows and one fp32 scale per row."""

    def __init__(self, num_embeddings: int, embedding_dim: int, device=None):
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.weight = _int8_param((num_embeddings, embedding_dim), device)
        self.register_buffer("scale", torch.empty(num_embeddings, dtype=torch.float32, device=device))

    @classmethod
    def from_embedding(cls, emb: nn.Embedding) -> Int8Embedding:
        m = cls(emb.num_embeddings, emb.embedding_dim, device=emb.weight.device)
        q, s = quantize_weight(emb.weight)
        m.weight.data, m.scale = q, s
        return m

    def dequantize(self) -> torch.Tensor:
        return self.weight.float() * self.scale[:, None]

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return F.embedding(idx, self.weight).float() * self.scale[idx].unsqueeze(-1)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8"


def _not_trainable(*_args, **_kw):
    raise PicochatError("this model is INT8-quantized (inference only) and cannot be trained: "
                        "train from the float run dir it was quantized from")


def _linears(model: nn.Module):
    """(parent, attribute name) of every linear layer quantization covers."""
    for block in model.blocks:
        for parent in (block.attn, block.mlp):
            for name, child in parent.named_children():
                if isinstance(child, (nn.Linear, Int8Linear)):
                    yield parent, name
    yield model, "lm_head"


def _swap(model: nn.Module, embeddings: bool, make_linear, make_embedding) -> nn.Module:
    for parent, name in _linears(model):
        child = getattr(parent, name)
        if isinstance(child, nn.Linear):
            setattr(parent, name, make_linear(child))
    if embeddings and isinstance(model.wte, nn.Embedding):
        model.wte = make_embedding(model.wte)
        for name, ve in model.value_embeds.items():  # value embeddings are token embeddings too
            model.value_embeds[name] = make_embedding(ve)
    embeddings = embeddings or isinstance(model.wte, Int8Embedding)
    model.quantization = quant_meta(embeddings)
    model.param_groups = _not_trainable  # instance attribute: every trainer asks for these first
    return model


@torch.no_grad()
def quantize_model(model: nn.Module, embeddings: bool = False) -> nn.Module:
    """Quantize a GPT in place: every linear layer (and the token embedding with embeddings=True)
    becomes int8; the fp32 weights are dropped. Returns the model, now for inference only."""
    return _swap(model, embeddings, Int8Linear.from_linear, Int8Embedding.from_embedding)


def quantized_skeleton(model: nn.Module, embeddings: bool) -> nn.Module:
    """Swap in empty int8 modules (on the model's device, typically meta) for load_state_dict."""
    return _swap(model, embeddings,
                 lambda lin: Int8Linear(lin.in_features, lin.out_features, device=lin.weight.device),
                 lambda emb: Int8Embedding(emb.num_embeddings, emb.embedding_dim, device=emb.weight.device))


def finish_loading(model: nn.Module) -> None:
    """Rebuild what to_empty() left uninitialized (the int8 kernel's constant scales)."""
    for m in model.modules():
        if isinstance(m, Int8Linear):
            m._reset_ones()


def quantization_of(model: nn.Module) -> dict | None:
    return getattr(model, "quantization", None)
