"""The head and its loss, a chunk of rows at a time, so that a micro-batch's fp32 logits never
exist at once.

The head is the widest product of a small model: at vocab 65,536 its fp32 logits, their softcap
and their gradient are about 1 MiB a token, 64 GiB for one 32 x 2,048 micro-batch, more than the
rest of a depth-20 model's activations together. Here a chunk of rows at a time goes through the
head, the softcap (cap tanh(z / cap), in fp32) and the cross-entropy:
- for a loss that is one number (reduction "sum" or "mean", what training asks for), the
  gradients with respect to the chunk's inputs and the head's weight are computed in the forward
  pass, while its logits exist, and kept: d values a token and one weight-sized buffer, in place
  of 4 x vocab. The backward pass only scales them by the upstream gradient. No FLOP is spent
  twice: the forward, input-gradient and weight-gradient products are the ones autograd would do.
- for a loss per token (reduction "none": RL weighs each token's log-probability by its own
  advantage), the upstream gradient is only known in the backward pass, which recomputes each
  chunk's logits from the kept inputs and log-normalizers: one more head product.
The products run in the autocast dtype where autocast is on (bf16: the logits are cast up to fp32
before the softcap, as the unchunked path does), else in the inputs' dtype.
"""

from __future__ import annotations

import torch


def chunk_rows(vocab_size: int) -> int:
    """Tokens per chunk: about 32M logits (128 MB in fp32) at a time."""
    return max(128, (1 << 25) // vocab_size)


def softcap(z: torch.Tensor, vocab_size: int, cap: float) -> torch.Tensor:
    """The head's output cut to the vocabulary (padding rows are never tokens), soft-capped in fp32."""
    return cap * torch.tanh(z[..., :vocab_size].float() / cap)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    kind = x.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype


# exp of a soft-capped logit is at most e^cap: below this cap a row's sum of them cannot overflow
# fp32 at any vocabulary, so the log-normalizer needs no max taken first
DIRECT_LSE_CAP = 60.0


def _chunk(x, w, targets, vocab: int, cap: float, grads=None, scale=None, lse=None):
    """One chunk of rows: (losses, log-normalizers), fp32. With `grads` = (the chunk's rows of the
    input gradient, the weight gradient), its gradients go there, each row's times `scale`. Its
    logits live only in here, so one chunk's exist at a time.

    Each step over the (rows, vocab) logits is a pass over memory, and on a CPU those passes cost
    a third of the head's time: it makes eight, the tanh in place over the product, the softmax
    from one exp (cap bounds the logits, so no max is subtracted first), the row scales and the
    softcap's derivative 1 - tanh^2 applied in place."""
    t = (x @ w.t())[:, :vocab].float().div_(cap).tanh_()  # the soft-capped logits, over cap
    valid, index = targets != -1, targets.clamp(min=0)
    target = cap * t.gather(1, index.unsqueeze(1)).squeeze(1)
    if lse is None and cap <= DIRECT_LSE_CAP:
        p = t.mul(cap).exp_()  # the softmax times each row's sum, which the row scales divide out below
        unnormalized = p.sum(1)
        lse = unnormalized.log()
    else:
        p = t.mul(cap)
        if lse is None:
            lse = torch.logsumexp(p, dim=-1)
        p.sub_(lse.unsqueeze(1)).exp_()
        unnormalized = None
    loss = torch.where(valid, lse - target, 0.0)
    if grads is not None:
        # d loss / d head output: softmax minus the target, each row times `scale` (0 where the
        # target is ignored), through the softcap (times 1 - tanh^2)
        row = torch.where(valid, scale, 0.0)
        p.mul_((row if unnormalized is None else row / unnormalized).unsqueeze(1))
        p[torch.arange(len(targets), device=p.device), index] -= row
        dz = p.addcmul_(p, t.square_(), value=-1).to(x.dtype)
        gx, gw = grads
        gx.copy_(dz @ w[:vocab])
        if gw.dtype == x.dtype:  # no weight-sized temporary
            gw[:vocab].addmm_(dz.t(), x)
        else:
            gw[:vocab] += dz.t() @ x
    return loss, lse


class _HeadLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, targets, vocab: int, cap: float, per_token: bool, n: int):
        dtype = _compute_dtype(x)
        ctx.meta = (vocab, cap, per_token, dtype, weight.dtype, n)
        grads_now = not per_token and any(ctx.needs_input_grad[:2])
        with torch.autocast(x.device.type, enabled=False):
            xc, w = x.to(dtype), weight.to(dtype)
            gx = torch.empty_like(x) if grads_now else None
            gw = torch.zeros(weight.shape, dtype=torch.float32, device=x.device) if grads_now else None
            losses, lses = [], []
            for start in range(0, len(x), n):
                rows = slice(start, start + n)
                loss, lse = _chunk(xc[rows], w, targets[rows], vocab, cap, (gx[rows], gw) if grads_now else None,
                                   torch.ones((), device=x.device))
                losses.append(loss)
                lses.append(lse)
        if per_token:
            ctx.save_for_backward(x, weight, targets, torch.cat(lses))
            return torch.cat(losses)
        ctx.grads = (gx, gw)
        return torch.cat(losses).sum()

    @staticmethod
    def backward(ctx, grad):
        vocab, cap, per_token, dtype, weight_dtype, n = ctx.meta
        if not per_token:  # scaled in place: the gradients made in the forward pass serve one backward
            if ctx.grads is None:
                raise RuntimeError("head_loss: a second backward pass through a loss made for one")
            (gx, gw), ctx.grads = ctx.grads, None
            return gx.mul_(grad), gw.mul_(grad).to(weight_dtype), None, None, None, None, None
        x, weight, targets, lse = ctx.saved_tensors
        with torch.autocast(x.device.type, enabled=False):
            xc, w = x.to(dtype), weight.to(dtype)
            gx = torch.empty_like(x)
            gw = torch.zeros(weight.shape, dtype=torch.float32, device=x.device)
            for start in range(0, len(x), n):
                rows = slice(start, start + n)
                _chunk(xc[rows], w, targets[rows], vocab, cap, (gx[rows], gw), grad[rows].float(), lse[rows])
        return gx, gw.to(weight_dtype), None, None, None, None, None


# Traced by torch.compile, the loss keeps fp32 logits of the whole micro-batch (one full copy at
# d20's shape, measured with the compiled graph's saved tensors: tests/test_loss.py). Where they would take more
# than this, the loss runs eagerly after a graph break; below it, compiling through is faster
# (depth 4, vocab 8,192, 2,048 rows a micro-batch, fp32: 2,504 tok/s against 2,061).
COMPILED_LOGITS_BYTES = 1 << 28


def traced_when_compiled(tokens: int, vocab_size: int) -> bool:
    """Whether torch.compile traces the loss of a `tokens` micro-batch through (else: a graph break)."""
    return 4 * tokens * vocab_size <= COMPILED_LOGITS_BYTES


def head_loss(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, vocab_size: int, cap: float,
              reduction: str = "mean", chunk: int | None = None) -> torch.Tensor:
    """Cross-entropy of softcap(x @ weight.T) against targets (-1: ignored), as
    F.cross_entropy(..., ignore_index=-1, reduction=reduction) on the soft-capped fp32 logits.
    x (..., d), targets (...); "none" gives one loss per row of x, flattened. `chunk`: rows at a
    time (default chunk_rows(vocab_size))."""
    if torch.compiler.is_compiling() and not traced_when_compiled(targets.numel(), vocab_size):
        return _eager_head_loss(x, weight, targets, vocab_size, cap, reduction, chunk)
    x, targets = x.reshape(-1, x.size(-1)), targets.reshape(-1)
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"head_loss: reduction must be mean, sum or none, not {reduction!r}")
    out = _HeadLoss.apply(x, weight, targets, vocab_size, cap, reduction == "none",
                          chunk or chunk_rows(vocab_size))
    return out / (targets != -1).sum() if reduction == "mean" else out


_eager_head_loss = torch.compiler.disable(head_loss)
