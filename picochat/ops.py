"""The model's norm, rotary and ReLU^2 steps for training: autograd Functions that keep less for
the backward pass, and make fewer passes over memory, than PyTorch's own composites.

What autograd keeps per token decides how large a micro-batch fits, and on a CPU each elementwise
pass over the activations costs about as much as reading them from memory. Measured with
saved-tensor hooks at d20's width in bf16, PyTorch keeps for each RMSNorm an fp32 copy of its input
(4 bytes a value, beside the bf16 tensors around it), and for ReLU^2 both the ReLU's output and
its square (two hidden-width tensors, the widest in a block). Here:

- rms_norm keeps its output and one reciprocal RMS per row. The gradient only needs those:
  for y = x * r (r = 1 / rms(x)), dx = r * (dy - y * mean(dy * y)). The output is the tensor
  the next Linear keeps anyway, so a block's norm costs nothing more than its r.
- norm_rotary (queries and keys: QK-norm, rotary, the scale) keeps its output alone, which is what
  attention keeps too. A rotation preserves dot products, so mean(dy * y) is mean(g * out) and
  the backward pass rotates once, back: dx = r * R^T(s g - out * mean(g * out) / s).
- relu2_then (the MLP's ReLU^2 and its output projection) keeps the pre-activation a and
  rebuilds relu(a)^2 in the backward pass, an elementwise step, instead of keeping two
  hidden-width tensors.

Each is used only while autograd records (training), without autocast; elsewhere the model
takes the plain ops, which compute the same forward values.

torch.compile traces through them and partitions the graph itself, and its partitioner never
rebuilds a value the backward pass must materialize, such as relu(a)^2 for the weight's gradient:
it would keep a and relu(a)^2 again. Compiled, relu^2 is a checkpointed region instead, which the
partitioner always rebuilds. (Lifting the rule for the whole graph, torch._functorch.config's
ban_recompute_materialized_backward, rebuilt much more and cost 10% of a compiled CPU step.)
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .attention import apply_rotary
from .linear import Linear


def _fused_norm(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(RMSNorm of x over its last dimension, the fp32 reciprocal RMS per row): the kernel
    F.rms_norm runs without autograd, so that training and inference compute the same values;
    its own steps on a device without that kernel."""
    try:
        return torch.ops.aten._fused_rms_norm(x, [x.size(-1)], None, None)
    except NotImplementedError:  # the same steps: in fp32 (or wider), with that type's eps
        acc = torch.promote_types(x.dtype, torch.float32)
        rstd = torch.rsqrt(x.to(acc).square().mean(-1, keepdim=True) + torch.finfo(acc).eps)
        return (x.to(acc) * rstd).to(x.dtype), rstd


def _mean_dot(g: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """mean(g * y) over the last dimension, fp32, kept as a dimension of 1: one pass, no temporary."""
    return torch.linalg.vecdot(g, y).float().unsqueeze(-1) / y.size(-1)


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        y, rstd = _fused_norm(x)
        ctx.save_for_backward(y, rstd)
        return y

    @staticmethod
    def backward(ctx, g):
        y, rstd = ctx.saved_tensors  # dx = rstd (g - y mean(g y)), in fp32
        return torch.addcmul(g.float(), y.float(), _mean_dot(g, y), value=-1).mul_(rstd).to(y.dtype)


class _NormRotary(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin, scale: float):
        y, rstd = _fused_norm(x)
        out = apply_rotary(y, cos, sin)
        if scale != 1.0:
            out = out * scale
        ctx.save_for_backward(out, rstd, cos, sin)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, g):
        out, rstd, cos, sin = ctx.saved_tensors
        s = ctx.scale
        t = torch.addcmul(g.float() * s if s != 1.0 else g.float(), out.float(), _mean_dot(g, out), value=-1 / s)
        return apply_rotary(t, cos, -sin).mul_(rstd).to(out.dtype), None, None, None


def _relu2(a: torch.Tensor) -> torch.Tensor:
    return F.relu(a).square()


class _Relu2Linear(torch.autograd.Function):
    # relu^2 squared in place: no autograd records in here, and on a CPU a fresh hidden-width
    # tensor costs as much as the pass that fills it
    @staticmethod
    def forward(ctx, a, w):
        ctx.save_for_backward(a, w)
        r = F.relu(a)
        return F.linear(r.mul_(r), w)

    @staticmethod
    def backward(ctx, g):
        a, w = ctx.saved_tensors
        r = F.relu(a)
        ga = (g @ w).mul_(r).mul_(2) if ctx.needs_input_grad[0] else None
        gw = g.reshape(-1, g.size(-1)).mT @ r.mul_(r).reshape(-1, r.size(-1)) if ctx.needs_input_grad[1] else None
        return ga, gw


def _recording(x: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and x.requires_grad and not torch.is_autocast_enabled(x.device.type)


def rms_norm(x: torch.Tensor) -> torch.Tensor:
    """RMSNorm over the last dimension, no weight."""
    return _RMSNorm.apply(x) if _recording(x) else F.rms_norm(x, (x.size(-1),))


def norm_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """QK-norm, then the rotary embedding, then `scale`: x (B, T, H, D)."""
    if _recording(x):
        return _NormRotary.apply(x, cos, sin, scale)
    out = apply_rotary(F.rms_norm(x, (x.size(-1),)), cos, sin)
    return out * scale if scale != 1.0 else out


def relu2_then(a: torch.Tensor, proj: nn.Module) -> torch.Tensor:
    """proj(relu(a)^2). In training, for a plain Linear, keeping only a (and the weight) for the
    backward pass; an FP8 or LoRA-hooked layer (fp8.py, lora.py) and inference (Linear's decode
    paths) take the module call."""
    if _recording(a) and type(proj) is Linear and not (proj._forward_hooks or proj._forward_pre_hooks):
        w = proj.weight
        w = w if w.dtype == a.dtype else w.to(a.dtype)
        if torch.compiler.is_compiling():  # marked for the partitioner to rebuild (see above)
            return F.linear(checkpoint(_relu2, a, use_reentrant=False), w)
        return _Relu2Linear.apply(a, w)
    return proj(_relu2(a))
