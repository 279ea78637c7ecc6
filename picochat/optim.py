"""The optimizer: Muon for the transformer's hidden matrices, AdamW for everything else.

Why two optimizers. Muon (Keller Jordan et al., 2024) takes the momentum of a weight matrix's
gradient and replaces it by the nearest semi-orthogonal matrix (all singular values ~1) before
applying it. Every direction of the matrix then moves by the same amount, instead of a few dominant
directions taking all the step; for the 2-D hidden weights of a transformer this trains markedly
faster than AdamW. It is not meant for embeddings (a lookup, not a linear map on a dense input), the
output head, or 1-D scalars, so those keep AdamW — the same split nanochat and modded-nanogpt use.

Speed. On CPU the optimizer step is a large share of a small model's training step, and much of it
is Python and dispatch overhead. So Muon groups the matrices by shape (a tall matrix counts as its
transpose: Newton–Schulz works on the wide orientation anyway) and runs each group as ONE stacked
3-D tensor: one momentum update, batched matmuls for the orthogonalization, one foreach add back
into the parameters. A depth-8 model has 3 such groups, whatever its depth.

Distributed (torchrun): the training loop sums the gradients over ranks first; then each rank runs
Newton–Schulz on its slice (along dim 0) of every stacked group and the slices are all-gathered, so
N ranks share the orthogonalization work. The momentum is replicated: it is element-wise and cheap,
and it keeps every rank's optimizer state identical, so rank 0's checkpoint resumes any rank.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from . import distributed
from .settings import setting

# ----------------------------------------------------------------------------- configuration


@dataclass
class OptimConfig:
    # Learning rates, before the schedule multiplier. Defaults are nanochat's.
    matrix_lr: float = setting(0.02, "Muon learning rate of the hidden matrices")  # x sqrt(max(1, rows/cols))
    embedding_lr: float = setting(0.2, "AdamW learning rate of the token embedding")  # x (n_embd/768)^-0.5
    head_lr: float = setting(0.004, "AdamW learning rate of the output head")  # x (n_embd/768)^-0.5
    # AdamW, 1-D per-layer residual scalars (not width-scaled). Adam moves each scalar by about
    # lr per step whatever its gradient, so 0.5 rescales the residual stream by up to 50% in one
    # step: at 8K-token batches that gave one-step loss spikes past log(vocab) (measured: depth 4,
    # Gutenberg, step 20). 0.005 trains smoothly and reached a lower loss by step 24.
    scalar_lr: float = setting(0.005, "AdamW learning rate of the per-layer scalars")
    gate_lr: float = setting(0.2, "AdamW learning rate of the smear and backout gates (when the model has them)")
    # AdamW. beta1 = 0.8 keeps the short-memory momentum nanochat found best for embeddings; the
    # tiny eps matters because embedding rows of rare tokens get tiny second moments.
    adam_betas: tuple[float, float] = setting((0.8, 0.95), "AdamW betas")
    adam_eps: float = setting(1e-10, "AdamW epsilon")
    # Decoupled weight decay, applied to the Muon matrices only (p *= 1 - lr * wd, lr scheduled);
    # embeddings, head and scalars are never decayed.
    weight_decay: float = setting(0.0, "decoupled weight decay of the hidden matrices")
    # Muon momentum warms up linearly from muon_momentum_start to muon_momentum over the first
    # muon_momentum_warmup_steps steps: low momentum early, when the gradients change fast.
    muon_momentum: float = setting(0.95, "Muon momentum after its warmup")
    muon_momentum_start: float = setting(0.85, "Muon momentum at step 0")
    muon_momentum_warmup_steps: int = setting(300, "steps of Muon momentum warmup")
    ns_steps: int = setting(5, "Newton-Schulz iterations")  # 5 is enough with the quintic coefficients below
    # Precision of the Newton–Schulz matmuls: "auto" = bf16 on CUDA and on CPUs with fast bf16
    # (AVX512-BF16 / AMX), fp32 elsewhere (bf16 without hardware support is ~100x slower on CPU).
    ns_dtype: str = setting("auto", "precision of Newton-Schulz (auto: bf16 on CUDA and on CPUs with native "
                                    "bf16, else fp32)", choices=("auto", "fp32", "bf16"))
    # LR schedule, as fractions of the total steps: linear warmup, constant, linear warmdown to
    # final_lr_frac * lr. nanochat uses no warmup and a 20% warmdown to zero.
    warmup_frac: float = setting(0.0, "fraction of the steps spent warming the learning rate up")
    warmdown_frac: float = setting(0.2, "fraction of the steps spent decaying the learning rate")
    final_lr_frac: float = setting(0.0, "learning rate at the end, as a fraction of the peak")


def scale_lrs(cfg: OptimConfig, scale: float) -> OptimConfig:
    """cfg with every base learning rate times `scale` (fine-tuning and RL train gentler than
    pretraining: their --lr-scale)."""
    return replace(cfg, matrix_lr=cfg.matrix_lr * scale, embedding_lr=cfg.embedding_lr * scale,
                   head_lr=cfg.head_lr * scale, scalar_lr=cfg.scalar_lr * scale, gate_lr=cfg.gate_lr * scale)


# ----------------------------------------------------------------------------- schedules


def lr_multiplier(
    step: int, total_steps: int, warmup_frac: float, warmdown_frac: float, final_lr_frac: float
) -> float:
    """Multiplier on every base LR at `step` (0-based) of `total_steps`.

    Warmup: (step+1)/warmup_steps, so the very first step already moves. Constant 1.0 until
    total - warmdown_steps, then linear down to final_lr_frac, reached at step == total_steps
    (the last step actually taken, total-1, is one notch above it)."""
    warmup = round(warmup_frac * total_steps)
    warmdown = round(warmdown_frac * total_steps)
    if step < warmup:
        return (step + 1) / warmup
    if step <= total_steps - warmdown:
        return 1.0
    left = max(total_steps - step, 0) / warmdown  # 1 at the warmdown start, 0 at the end
    return final_lr_frac + (1.0 - final_lr_frac) * left


def muon_momentum(step: int, cfg: OptimConfig) -> float:
    """Muon momentum at `step`: linear from cfg.muon_momentum_start to cfg.muon_momentum."""
    if cfg.muon_momentum_warmup_steps <= 0:
        return cfg.muon_momentum
    frac = min(step / cfg.muon_momentum_warmup_steps, 1.0)
    return (1.0 - frac) * cfg.muon_momentum_start + frac * cfg.muon_momentum


# ----------------------------------------------------------------------------- Muon

# Quintic Newton–Schulz coefficients from Keller Jordan's Muon: chosen to push every singular
# value in (0, 1] up towards 1 as fast as possible, at the price of not converging exactly — after
# 5 steps the singular values land roughly in [0.7, 1.2], which works as well as exact
# orthogonalization for training and costs 5 iterations instead of dozens.
NS_COEFFS = (3.4445, -4.7750, 2.0315)


def ns_dtype_for(device: torch.device, name: str = "auto") -> torch.dtype:
    """The dtype Newton–Schulz runs in (see OptimConfig.ns_dtype)."""
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


def orthogonalize(stacked: torch.Tensor, steps: int = 5, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Approximately replace each matrix of a (n, rows, cols) stack by U V^T of its SVD U S V^T.

    A 2-D input is treated as a stack of one. Returned in the input's dtype and shape.
    The quintic iteration X <- aX + (bA + cA^2)X with A = XX^T maps each singular value s to
    p(s) = as + bs^3 + cs^5 while keeping the singular vectors; it needs all s <= 1 to start, which
    dividing by the Frobenius norm guarantees (||X||_F >= the largest singular value)."""
    squeeze = stacked.ndim == 2
    X = stacked.unsqueeze(0) if squeeze else stacked
    assert X.ndim == 3, f"orthogonalize wants a 2-D or 3-D tensor, got shape {tuple(stacked.shape)}"
    dtype = dtype or X.dtype
    # Work on the wide orientation: XX^T is then (rows x rows), the smaller Gram matrix.
    transposed = X.size(-2) > X.size(-1)
    if transposed:
        X = X.mT
    # Normalize in the input precision (fp32), then drop to the working dtype.
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    X = X.to(dtype)
    a, b, c = NS_COEFFS
    for _ in range(steps):
        A = X @ X.mT
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)  # b*A + c*A@A, one kernel
        X = torch.baddbmm(X, B, X, beta=a)  # a*X + B@X
    if transposed:
        X = X.mT
    X = X.to(stacked.dtype)
    return X.squeeze(0) if squeeze else X


class Muon(torch.optim.Optimizer):
    """MomentUm Orthogonalized by Newton–Schulz, for 2-D weights only.

    Per step, for each matrix W with gradient G:
        buf <- m * buf + (1 - m) * G              (momentum, EMA form)
        U   <- (1 - m) * G + m * buf              (Nesterov look-ahead)
        W   <- W * (1 - lr * wd) - lr * sqrt(max(1, rows/cols)) * orthogonalize(U)
    The shape factor keeps the update's per-element RMS comparable between square and tall
    (e.g. MLP up-projection, rows = 4 * cols) matrices: an orthogonalized tall matrix has
    smaller entries, and sqrt(rows/cols) gives it back the RMS a square one would have.

    Parameters are grouped by shape (tall ones transposed, see the module docstring): each
    torch param group is one shape group, and its momentum is ONE stacked tensor, kept in the
    wide orientation and stored in the state of the group's first parameter (so the standard
    torch state_dict / load_state_dict round-trip it). `group_by_shape=False` puts every matrix
    in its own group (same maths; for benchmarks and tests).
    """

    def __init__(
        self,
        params,
        lr: float = 0.02,
        momentum: float = 0.95,
        weight_decay: float = 0.0,
        ns_steps: int = 5,
        ns_dtype: str = "auto",
        group_by_shape: bool = True,
    ):
        params = [p for p in params]
        for p in params:
            if p.ndim != 2:
                raise ValueError(f"Muon only takes 2-D parameters, got shape {tuple(p.shape)}")
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
        self.ns_dtype = ns_dtype

    def _stacked_grads(self, group) -> torch.Tensor:
        # One copy of all gradients into a (n, small, large) stack. A missing gradient counts as
        # zero (the momentum still decays and is applied), matching a frozen-input step.
        grads = []
        for p, t in zip(group["params"], group["transposed"]):
            g = p.grad if p.grad is not None else torch.zeros_like(p)
            grads.append(g.mT if t else g)
        return torch.stack(grads)

    def _nesterov_momentum(self, group) -> torch.Tensor:
        """Update the group's momentum; returns the (n, small, large) Nesterov look-ahead."""
        g = self._stacked_grads(group)
        state = self.state[group["params"][0]]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(g)
        buf = state["momentum_buffer"]
        m = group["momentum"]
        buf.lerp_(g, 1 - m)
        return g.lerp_(buf, m)  # Nesterov: g <- (1 - m) g + m buf

    def _orthogonal_update(self, group, g: torch.Tensor, lo: int = 0) -> torch.Tensor:
        """Rows [lo, lo + len(g)) of the group's update: orthogonalized, times the shape factor,
        before the learning rate."""
        u = orthogonalize(g, group["ns_steps"], ns_dtype_for(g.device, self.ns_dtype))
        scales = group["lr_scale"][lo:lo + len(g)]
        if any(s != scales[0] for s in scales):
            u.mul_(torch.tensor(scales, dtype=u.dtype, device=u.device).view(-1, 1, 1))
        elif scales and scales[0] != 1.0:
            u.mul_(scales[0])
        return u

    def _apply_update(self, group, u: torch.Tensor) -> None:
        params = group["params"]
        lr, wd = group["lr"], group["weight_decay"]
        if wd:
            torch._foreach_mul_(params, 1 - lr * wd)
        updates = [x.mT if t else x for x, t in zip(u.unbind(0), group["transposed"])]
        torch._foreach_add_(params, updates, alpha=-lr)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        groups = [g for g in self.param_groups if any(p.grad is not None for p in g["params"])]
        if distributed.world_size() == 1:
            for group in groups:
                self._apply_update(group, self._orthogonal_update(group, self._nesterov_momentum(group)))
            return loss
        # Data-parallel: the gradients are already summed over ranks, so every rank keeps the same
        # momentum (cheap, element-wise), but each orthogonalizes only its share of every stack —
        # Newton-Schulz is the expensive part — and the shares are all-gathered, each while the next
        # group is orthogonalized.
        updates = []
        for group in groups:
            g = self._nesterov_momentum(group)
            lo, hi, k = distributed.shard_bounds(len(g))
            mine = g.new_zeros((k, *g.shape[1:]))
            if hi > lo:
                mine[:hi - lo] = self._orthogonal_update(group, g[lo:hi], lo)
            updates.append(distributed.all_gather_rows(mine, len(g)))
        for group, gathered in zip(groups, updates):
            self._apply_update(group, gathered())
        return loss


# ----------------------------------------------------------------------------- the combined optimizer


class Optimizer:
    """Muon for "matrix" parameters plus AdamW for "embedding", "head" and "scalar", as one object.

    The training loop calls `set_schedule(lr_multiplier(...), muon_momentum(...))` before each
    `step()`; every group's LR is its base LR (`initial_lr`) times the multiplier.
    `state_dict()` holds everything exact resume needs (momentum buffers, Adam moments and step
    counts, current LRs and momentum). Like torch's, it references live tensors: serialize it
    (torch.save) before taking more steps."""

    def __init__(self, muon: Muon | None, adamw: torch.optim.AdamW | None):
        self.muon = muon
        self.adamw = adamw
        self.lr_mult = 1.0
        self.momentum = muon.param_groups[0]["momentum"] if muon is not None else None

    @property
    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [o for o in (self.muon, self.adamw) if o is not None]

    @property
    def param_groups(self) -> list[dict]:
        return [g for o in self.optimizers for g in o.param_groups]

    def set_schedule(self, lr_mult: float, muon_momentum: float | None = None) -> None:
        self.lr_mult = lr_mult
        for g in self.param_groups:
            g["lr"] = g["initial_lr"] * lr_mult
        if muon_momentum is not None and self.muon is not None:
            self.momentum = muon_momentum
            for g in self.muon.param_groups:
                g["momentum"] = muon_momentum

    def step(self) -> None:
        for o in self.optimizers:
            o.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {
            "muon": self.muon.state_dict() if self.muon is not None else None,
            "adamw": self.adamw.state_dict() if self.adamw is not None else None,
            "lr_mult": self.lr_mult,
            "momentum": self.momentum,
        }

    def load_state_dict(self, d: dict) -> None:
        for name in ("muon", "adamw"):
            opt = getattr(self, name)
            if (opt is None) != (d[name] is None):
                have = "no" if d[name] is None else "a"
                raise ValueError(f"optimizer state has {have} {name} part; this model has the opposite")
            if opt is not None:
                opt.load_state_dict(d[name])
        self.lr_mult = d["lr_mult"]
        self.momentum = d["momentum"]


GROUP_NAMES = ("matrix", "embedding", "head", "scalar", "value_embed", "gate")
# what each group's optimizer keeps per parameter between steps: Muon one momentum, AdamW two moments
STATE_VALUES = {"matrix": 1, "embedding": 2, "head": 2, "scalar": 2, "value_embed": 2, "gate": 2}


def state_values(counts: dict[str, int]) -> int:
    """Values of optimizer state kept between steps, from the parameters per group
    (model.param_counts)."""
    return sum(STATE_VALUES[group] * n for group, n in counts.items())


def build_optimizer(model: nn.Module, cfg: OptimConfig, group_by_shape: bool = True) -> Optimizer:
    """Muon + AdamW over `model.param_groups()` (keys: matrix, embedding, head, scalar).

    Checks that every trainable parameter of the model is in exactly one group, so that a newly
    added weight cannot silently go untrained."""
    groups = model.param_groups()
    unknown = set(groups) - set(GROUP_NAMES)
    if unknown:
        raise ValueError(f"unknown parameter group(s) {sorted(unknown)}; expected {GROUP_NAMES}")
    groups = {k: [p for p in groups.get(k, []) if p.requires_grad] for k in GROUP_NAMES}
    seen: dict[int, str] = {}
    for name, ps in groups.items():
        for p in ps:
            if id(p) in seen:
                shape = tuple(p.shape)
                raise ValueError(f"a parameter of shape {shape} is in both {seen[id(p)]!r} and {name!r}")
            seen[id(p)] = name
    missing = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in seen]
    if missing:
        raise ValueError(f"parameters in no optimizer group: {missing}")

    muon = None
    if groups["matrix"]:
        muon = Muon(
            groups["matrix"],
            lr=cfg.matrix_lr,
            momentum=cfg.muon_momentum_start if cfg.muon_momentum_warmup_steps > 0 else cfg.muon_momentum,
            weight_decay=cfg.weight_decay,
            ns_steps=cfg.ns_steps,
            ns_dtype=cfg.ns_dtype,
            group_by_shape=group_by_shape,
        )
    # Embedding and head LRs were tuned at width 768; wider models want smaller Adam steps
    # (muP-style 1/sqrt(width) scaling, as nanochat does). Muon needs no such factor: its update
    # is orthogonal, so its size does not grow with width.
    width_scale = (model.config.n_embd / 768) ** -0.5
    adam_groups = [
        dict(params=groups["embedding"], lr=cfg.embedding_lr * width_scale),
        dict(params=groups["head"], lr=cfg.head_lr * width_scale),
        dict(params=groups["scalar"], lr=cfg.scalar_lr),
        # value embeddings are token embeddings at half their rate; the smear and backout gates a
        # rate of their own (nanochat's)
        dict(params=groups["value_embed"], lr=cfg.embedding_lr * width_scale * 0.5),
        dict(params=groups["gate"], lr=cfg.gate_lr),
    ]
    adam_groups = [g for g in adam_groups if g["params"]]
    for g in adam_groups:
        g["initial_lr"] = g["lr"]
    adamw = None
    if adam_groups:
        adamw = torch.optim.AdamW(
            adam_groups, betas=cfg.adam_betas, eps=cfg.adam_eps, weight_decay=0.0, foreach=True, fused=False
        )
    return Optimizer(muon, adamw)
