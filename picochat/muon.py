"""Muon: momentum, orthogonalized, for the transformer's 2-D hidden matrices (optim.py pairs it with
AdamW for the rest).

Per step, for each matrix W with gradient G:
    buf <- m * buf + (1 - m) * G                    (momentum, EMA form)
    U   <- (1 - m) * G + m * buf                    (Nesterov look-ahead)
    U   <- equilibrate(U)                           (MuonEq, optional)
    U   <- orthogonalize(U)                         (Newton-Schulz, or Polar Express)
    U   <- U * sqrt(min(rows, cols)) / ||U||_F      (Muon+, optional)
    U   <- normalize(U)                             (NorMuon, optional)
    W   <- W - lr * s * (U + wd * W [* mask])       (s = sqrt(max(1, rows/cols)); cautious: mask)
Each option is nanochat's at HEAD, off by default (picochat's recipe is plain Muon):
- Polar Express (Amsel et al. 2025) replaces Keller Jordan's fixed quintic with per-iteration
  coefficients that converge closer to orthogonal in the same 5 matmul rounds.
- MuonEq rescales each row to the mean row norm before orthogonalizing: a better conditioned
  spectrum going in.
- Muon+ snaps the update's Frobenius norm to that of an exactly semi-orthogonal matrix,
  correcting what the 5 iterations leave.
- NorMuon keeps a second moment per neuron (per entry of the matrix's larger dimension) and
  scales the update by its inverse square root, renormalized to keep the update's norm: an
  Adam-like per-neuron step size on top of the orthogonal direction.
- Cautious weight decay decays only where the update and the weight agree in sign.

Speed. On CPU the optimizer step is a large share of a small model's training step, and much of it
is Python and dispatch overhead. So matrices are grouped by shape (a tall matrix counts as its
transpose: the iterations work on the wide orientation anyway) and each group runs as ONE stacked
3-D tensor: one momentum update, batched matmuls for the orthogonalization, one foreach add back
into the parameters. A depth-8 model has 3 such groups, whatever its depth. (MuonEq's rows and
NorMuon's neurons are those of each matrix as it is, whichever way it is stored.)

Distributed (torchrun), ZeRO-2: each rank owns a slice of the matrices of every stacked group
(rows [lo, hi) of the stack, distributed.shard_bounds). The gradients are reduce-scattered, so a
rank receives the sum over ranks of its own matrices' gradients only; it keeps the momentum (and
NorMuon's second moment) of those only, orthogonalizes and applies their updates, and the updated
matrices are all-gathered. Each rank holds 1/N of the state and does 1/N of the work, with the
same numbers as one process. state_dict() gathers the slices, so a checkpoint is the one-process
state whatever the number of ranks, and load_state_dict() takes each rank's slice of it.
"""

from __future__ import annotations

import torch
from torch import nn

from . import distributed

ORTHOGONALIZERS = ("newton-schulz", "polar-express")

# Quintic Newton–Schulz coefficients from Keller Jordan's Muon: chosen to push every singular
# value in (0, 1] up towards 1 as fast as possible, at the price of not converging exactly — after
# 5 steps the singular values land roughly in [0.7, 1.2], which works as well as exact
# orthogonalization for training and costs 5 iterations instead of dozens.
NS_COEFFS = (3.4445, -4.7750, 2.0315)
# Polar Express (arXiv 2505.16932), one (a, b, c) per iteration, computed for 5 iterations with a
# safety factor of 2e-2 and cushion 2: the values nanochat uses
POLAR_EXPRESS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)


def ns_dtype_for(device: torch.device, name: str = "auto") -> torch.dtype:
    """The dtype the orthogonalization runs in (see OptimConfig.ns_dtype)."""
    if name == "fp32":
        return torch.float32
    if name == "bf16":
        return torch.bfloat16
    if name != "auto":
        raise ValueError(f"ns_dtype must be auto, fp32 or bf16, not {name!r}")
    if device.type == "cuda":
        return torch.bfloat16
    if device.type == "cpu":
        from picochat.common import cpu_has_fast_bf16

        return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32
    return torch.float32


def orthogonalize(stacked: torch.Tensor, steps: int = 5, dtype: torch.dtype | None = None,
                  method: str = "newton-schulz") -> torch.Tensor:
    """Approximately replace each matrix of a (n, rows, cols) stack by U V^T of its SVD U S V^T.

    A 2-D input is treated as a stack of one. Returned in the input's dtype and shape.
    The quintic iteration X <- aX + (bA + cA^2)X with A = XX^T maps each singular value s to
    p(s) = as + bs^3 + cs^5 while keeping the singular vectors; it needs all s <= 1 to start, which
    dividing by the Frobenius norm guarantees (||X||_F >= the largest singular value). Newton-Schulz
    uses one (a, b, c) for every iteration; Polar Express its own per iteration (and a 1% margin
    in the normalization, as it was computed with)."""
    squeeze = stacked.ndim == 2
    X = stacked.unsqueeze(0) if squeeze else stacked
    assert X.ndim == 3, f"orthogonalize wants a 2-D or 3-D tensor, got shape {tuple(stacked.shape)}"
    dtype = dtype or X.dtype
    # Work on the wide orientation: XX^T is then (rows x rows), the smaller Gram matrix.
    transposed = X.size(-2) > X.size(-1)
    if transposed:
        X = X.mT
    if method == "polar-express":
        X = X.to(dtype)
        X = X / (X.norm(dim=(-2, -1), keepdim=True) * 1.01 + 1e-6)
        coeffs = POLAR_EXPRESS[:steps]
    else:
        # Normalize in the input precision (fp32), then drop to the working dtype.
        X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)
        X = X.to(dtype)
        coeffs = (NS_COEFFS,) * steps
    for a, b, c in coeffs:
        A = X @ X.mT
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)  # b*A + c*A@A, one kernel
        X = torch.baddbmm(X, B, X, beta=a)  # a*X + B@X
    if transposed:
        X = X.mT
    X = X.to(stacked.dtype)
    return X.squeeze(0) if squeeze else X


class Muon(torch.optim.Optimizer):
    """Muon for 2-D weights only (the module's docstring has the maths and the options).

    Parameters are grouped by shape (tall ones transposed): each torch param group is one shape
    group, and its momentum (and NorMuon's second moment) is ONE stacked tensor, kept in the wide
    orientation and stored in the state of the group's first parameter (so the standard torch
    state_dict / load_state_dict round-trip it). `group_by_shape=False` puts every matrix in its
    own group (same maths; for benchmarks and tests).
    """

    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95, weight_decay: float = 0.0,
                 ns_steps: int = 5, ns_dtype: str = "auto", group_by_shape: bool = True,
                 orthogonalizer: str = "newton-schulz", beta2: float = 0.0, equilibrate: bool = False,
                 renormalize: bool = False, cautious: bool = False):
        params = [p for p in params]
        for p in params:
            if p.ndim != 2:
                raise ValueError(f"Muon only takes 2-D parameters, got shape {tuple(p.shape)}")
        if orthogonalizer not in ORTHOGONALIZERS:
            raise ValueError(f"orthogonalizer must be one of {ORTHOGONALIZERS}, not {orthogonalizer!r}")
        # Group key: the matrix in its wide orientation. dict keeps first-seen order, so the
        # grouping (hence the state_dict layout) is deterministic for a given model.
        buckets: dict[object, list[nn.Parameter]] = {}
        for i, p in enumerate(params):
            key = (min(p.shape), max(p.shape)) if group_by_shape else i
            buckets.setdefault(key, []).append(p)
        groups = []
        for members in buckets.values():
            groups.append(
                dict(
                    params=members,
                    # Plain Python lists so they survive state_dict(): static per-member facts.
                    transposed=[p.size(0) > p.size(1) for p in members],
                    lr_scale=[max(1.0, p.size(0) / p.size(1)) ** 0.5 for p in members],
                )
            )
        defaults = dict(lr=lr, initial_lr=lr, momentum=momentum, weight_decay=weight_decay, ns_steps=ns_steps)
        super().__init__(groups, defaults)
        self.ns_dtype, self.orthogonalizer, self.beta2 = ns_dtype, orthogonalizer, beta2
        self.equilibrate, self.renormalize, self.cautious = equilibrate, renormalize, cautious

    def _stacked_grads(self, group) -> torch.Tensor:
        # One copy of all gradients into a (n, small, large) stack. A missing gradient counts as
        # zero (the momentum still decays and is applied), matching a frozen-input step.
        grads = []
        for p, t in zip(group["params"], group["transposed"]):
            g = p.grad if p.grad is not None else torch.zeros_like(p)
            grads.append(g.mT if t else g)
        return torch.stack(grads)

    def _nesterov_momentum(self, group, g: torch.Tensor, mine: slice) -> torch.Tensor:
        """Update the momentum of the group's matrices `mine` (all, or this rank's share) with
        their gradients g; returns the (n, small, large) Nesterov look-ahead, each matrix's rows
        equilibrated when asked."""
        state = self.state[group["params"][0]]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(g)
        buf = state["momentum_buffer"]
        m = group["momentum"]
        buf.lerp_(g, 1 - m)
        g = g.lerp_(buf, m)  # Nesterov: g <- (1 - m) g + m buf
        return self._equilibrated(group["transposed"][mine], g) if self.equilibrate else g

    @staticmethod
    def _equilibrated(transposed: list[bool], g: torch.Tensor) -> torch.Tensor:
        """MuonEq: each matrix's rows (as the matrix is, not as it is stored) rescaled to the mean
        row norm, ||G||_F / sqrt(rows)."""
        frob = g.float().norm(dim=(-2, -1), keepdim=True)
        out = []
        for x, f, t in zip(g, frob, transposed):
            dim = -2 if t else -1  # a stored-transposed matrix's rows are its stored columns
            rows = x.size(-1) if t else x.size(-2)
            row_norm = x.float().norm(dim=dim, keepdim=True).clamp_min(1e-6)
            out.append(x * (f / rows ** 0.5 / row_norm).to(x.dtype))
        return torch.stack(out)

    def _orthogonal(self, group, g: torch.Tensor) -> torch.Tensor:
        return orthogonalize(g, group["ns_steps"], ns_dtype_for(g.device, self.ns_dtype), self.orthogonalizer)

    def _finished(self, group, u: torch.Tensor, mine: slice) -> torch.Tensor:
        """The orthogonalized stack, renormalized (Muon+) and scaled per neuron (NorMuon) when asked,
        then times each matrix's shape factor: the update before the learning rate."""
        if self.renormalize:  # the Frobenius norm of an exact semi-orthogonal matrix
            norm = u.float().norm(dim=(-2, -1), keepdim=True).clamp_min(1e-6)
            u = u * (min(u.shape[-2:]) ** 0.5 / norm).to(u.dtype)
        if self.beta2:
            u = self._normuon(group, u)
        scales = group["lr_scale"][mine]
        if any(s != scales[0] for s in scales):
            u = u * torch.tensor(scales, dtype=u.dtype, device=u.device).view(-1, 1, 1)
        elif scales and scales[0] != 1.0:
            u = u * scales[0]
        return u

    def _normuon(self, group, u: torch.Tensor) -> torch.Tensor:
        """NorMuon: a second moment per neuron, the entries of each matrix's larger dimension (its
        rows for a square one), EMA with beta2; the update scaled by its inverse square root, then
        rescaled to keep the update's norm."""
        dim = -1 if u.size(-2) == u.size(-1) else -2  # stored wide: average over the smaller dim
        n = u.size(dim)
        v = u.float().square().mean(dim=dim, keepdim=True)
        norm = (v.sum(dim=(-2, -1), keepdim=True) * n).sqrt()
        state = self.state[group["params"][0]]
        if "second_momentum" not in state:
            state["second_momentum"] = torch.zeros_like(v, dtype=u.dtype)
        second = state["second_momentum"]
        second.lerp_(v.to(second.dtype), 1 - self.beta2)
        step = second.clamp_min(1e-10).rsqrt()
        new_norm = (v * n * step.float().square()).sum(dim=(-2, -1), keepdim=True).sqrt()
        return u * (step * (norm / new_norm.clamp_min(1e-10))).to(u.dtype)

    def _apply_update(self, group, u: torch.Tensor, mine: slice) -> None:
        params = group["params"][mine]
        lr, wd = group["lr"], group["weight_decay"]
        updates = [x.mT if t else x for x, t in zip(u.unbind(0), group["transposed"][mine])]
        if self.cautious:  # decay only where the update and the weight agree in sign, by the same
            for p, x, s in zip(params, updates, group["lr_scale"][mine]):  # shape-scaled rate as the update
                p.sub_(lr * x + lr * s * wd * p * ((x * p) >= 0))
            return
        if wd:
            torch._foreach_mul_(params, 1 - lr * wd)
        torch._foreach_add_(params, updates, alpha=-lr)

    def state_dict(self) -> dict:
        """torch's layout; under torchrun the one-process state, gathered on rank 0 from the ranks'
        slices (every rank must call it; {} on the others)."""
        state = super().state_dict()
        if distributed.world_size() == 1:
            return state
        state["state"] = {i: {k: v.cpu() for k, v in entry.items()} for i, entry in state["state"].items()}
        ranks = distributed.gather_objects(state)
        if ranks is None:
            return {}
        for i in {i for rank in ranks for i in rank["state"]}:  # slices in rank order make the whole stack
            parts = [rank["state"][i] for rank in ranks if i in rank["state"]]
            state["state"][i] = {k: torch.cat([part[k] for part in parts]) for k in parts[0]}
        return state

    def load_state_dict(self, state: dict) -> None:
        """Under torchrun, this rank's slice of every group's stacked state."""
        if distributed.world_size() > 1:
            firsts = {}  # a group's state sits with its first parameter: its index in the state's order
            index = 0
            for group in self.param_groups:
                firsts[index] = len(group["params"])
                index += len(group["params"])
            mine = {}
            for i, entry in state["state"].items():
                lo, hi, _ = distributed.shard_bounds(firsts[int(i)])
                if hi > lo:
                    mine[i] = {k: v[lo:hi] for k, v in entry.items()}
            state = {**state, "state": mine}
        super().load_state_dict(state)

    def _update(self, group, g: torch.Tensor, mine: slice) -> None:
        """One step of the group's matrices `mine`, given their summed gradients (stacked, wide)."""
        u = self._orthogonal(group, self._nesterov_momentum(group, g, mine))
        self._apply_update(group, self._finished(group, u, mine), mine)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if distributed.world_size() == 1:
            for group in self.param_groups:
                if any(p.grad is not None for p in group["params"]):
                    self._update(group, self._stacked_grads(group), slice(None))
            return loss
        # ZeRO-2: every rank steps every group (a gradient no rank has counts as zero), its own
        # matrices only, and sends them to the others while it steps the next group
        gathers = []
        for group in self.param_groups:
            n = len(group["params"])
            lo, hi, k = distributed.shard_bounds(n)
            g = distributed.reduce_scatter_rows(self._stacked_grads(group), k)[:hi - lo]
            if hi > lo:
                self._update(group, g, slice(lo, hi))
            own = [p.mT if t else p for p, t in zip(group["params"][lo:hi], group["transposed"][lo:hi])]
            part = torch.stack(own) if own else g.new_empty((0, *g.shape[1:]))
            gathers.append((group, distributed.all_gather_rows(distributed.pad_rows(part, k), n)))
        for group, gathered in gathers:
            for p, t, x in zip(group["params"], group["transposed"], gathered()):
                p.copy_(x.mT if t else x)
        return loss
