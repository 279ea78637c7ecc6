"""The optimizer: Muon (muon.py) for the transformer's hidden matrices, AdamW for everything else,
their learning-rate, momentum and weight-decay schedules, and the settings of all of it.

Why two optimizers. Muon (Keller Jordan et al., 2024) takes the momentum of a weight matrix's
gradient and replaces it by the nearest semi-orthogonal matrix (all singular values ~1) before
applying it. Every direction of the matrix then moves by the same amount, instead of a few dominant
directions taking all the step; for the 2-D hidden weights of a transformer this trains markedly
faster than AdamW. It is not meant for embeddings (a lookup, not a linear map on a dense input), the
output head, or 1-D scalars, so those keep AdamW — the same split nanochat and modded-nanogpt use.

OptimConfig's defaults are picochat's recipe; NANOCHAT_OPTIM is nanochat's at HEAD 92d63d4 (its
base_train.py and gpt.py's setup_optimizer): Polar Express, NorMuon, MuonEq, Muon+, cautious
weight decay on a cosine schedule, AdamW betas and weight decay per group, 40 warmup steps, a 65%
warmdown to 5%, Muon momentum 0.85 -> 0.97 over 400 steps and -> 0.90 through the warmdown.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import nn

from . import distributed
from .muon import ORTHOGONALIZERS, Muon
from .settings import setting
from .sharded_adamw import ShardedAdamW

WD_SCHEDULES = ("constant", "cosine")

# ----------------------------------------------------------------------------- configuration


@dataclass
class OptimConfig:
    # Learning rates, before the schedule multiplier.
    matrix_lr: float = setting(0.02, "Muon learning rate of the hidden matrices")  # x sqrt(max(1, rows/cols))
    embedding_lr: float = setting(0.2, "AdamW learning rate of the token embedding")  # x (n_embd/768)^-0.5
    head_lr: float = setting(0.004, "AdamW learning rate of the output head")  # x (n_embd/768)^-0.5
    # AdamW, 1-D per-layer residual scalars (not width-scaled). Adam moves each scalar by about
    # lr per step whatever its gradient, so 0.5 rescales the residual stream by up to 50% in one
    # step: at 8K-token batches that gave one-step loss spikes past log(vocab) (measured: depth 4,
    # Gutenberg, step 20). 0.005 trains smoothly and reached a lower loss by step 24.
    scalar_lr: float = setting(0.005, "AdamW learning rate of the per-layer scalars (x0's; the residual's is "
                                      "--resid-lr times it)")
    resid_lr: float = setting(1.0, "the residual scalars' learning rate as a multiple of --scalar-lr (nanochat: "
                                   "0.01)", low=0)
    value_embed_lr: float = setting(0.5, "the value embeddings' learning rate as a multiple of --embedding-lr", low=0)
    gate_lr: float = setting(0.2, "AdamW learning rate of the smear and backout gates (when the model has them)")
    # AdamW. beta1 = 0.8 keeps the short-memory momentum nanochat found best for embeddings; the
    # tiny eps matters because embedding rows of rare tokens get tiny second moments.
    adam_betas: tuple[float, float] = setting((0.8, 0.95), "AdamW betas of every group not given its own")
    adam_eps: float = setting(1e-10, "AdamW epsilon")
    # AdamW per group: (beta1, beta2, weight decay), or the shared betas and no decay
    head_adam: tuple[float, float, float] | None = setting(None, "AdamW beta1 beta2 weight-decay of the head "
                                                                 "(nanochat: 0.8 0.96 0.01)")
    embedding_adam: tuple[float, float, float] | None = setting(None, "... of the token embedding (nanochat: 0.8 "
                                                                      "0.995 0.001)")
    value_embed_adam: tuple[float, float, float] | None = setting(None, "... of the value embeddings (nanochat: "
                                                                        "0.8 0.995 0.01)")
    resid_adam: tuple[float, float, float] | None = setting(None, "... of the residual scalars (nanochat: 0.8 0.95 "
                                                                  "0.05)")
    x0_adam: tuple[float, float, float] | None = setting(None, "... of the x0 scalars (nanochat: 0.96 0.95 0)")
    # Decoupled weight decay of the Muon matrices (p *= 1 - lr * wd, lr scheduled); AdamW's groups
    # have their own above.
    weight_decay: float = setting(0.0, "decoupled weight decay of the hidden matrices", low=0)
    cautious_wd: bool = setting(False, "decay a matrix entry only where its update agrees with it in sign (nanochat)")
    wd_schedule: str = setting("constant", "the hidden matrices' weight decay over the run: constant, or cosine "
                                           "down to 0 (nanochat)", choices=WD_SCHEDULES)
    # Muon momentum warms up linearly from muon_momentum_start to muon_momentum over the first
    # muon_momentum_warmup_steps steps: low momentum early, when the gradients change fast.
    muon_momentum: float = setting(0.95, "Muon momentum after its warmup")
    muon_momentum_start: float = setting(0.85, "Muon momentum at step 0")
    muon_momentum_warmup_steps: int = setting(300, "steps of Muon momentum warmup")
    muon_momentum_final: float | None = setting(None, "Muon momentum at the end of the LR warmdown, linearly from "
                                                      "--muon-momentum (default: unchanged)")
    ns_steps: int = setting(5, "orthogonalization iterations")  # 5 is enough with either's coefficients
    orthogonalizer: str = setting("newton-schulz", "how Muon orthogonalizes: newton-schulz (a fixed quintic) or "
                                                   "polar-express (per-iteration coefficients; nanochat)",
                                  choices=ORTHOGONALIZERS)
    muon_beta2: float = setting(0.0, "NorMuon: a second moment per neuron with this beta scales the update "
                                     "(0: off; nanochat: 0.9)", low=0, high=1)
    muon_eq: bool = setting(False, "MuonEq: equilibrate each matrix's rows before orthogonalizing (nanochat)")
    muon_plus: bool = setting(False, "Muon+: set the update's Frobenius norm to sqrt(min(rows, cols)) (nanochat)")
    # Precision of the orthogonalization's matmuls: "auto" = bf16 on CUDA and on CPUs with fast bf16
    # (AVX512-BF16 / AMX), fp32 elsewhere (bf16 without hardware support is ~100x slower on CPU).
    ns_dtype: str = setting("auto", "precision of the orthogonalization (auto: bf16 on CUDA and on CPUs with "
                                    "native bf16, else fp32)", choices=("auto", "fp32", "bf16"))
    # LR schedule: linear warmup, constant, linear warmdown to final_lr_frac * lr.
    warmup_frac: float = setting(0.0, "fraction of the steps spent warming the learning rate up", low=0, high=1)
    warmup_steps: int = setting(0, "steps spent warming the learning rate up, if given (nanochat: 40)", low=0)
    warmdown_frac: float = setting(0.2, "fraction of the steps spent decaying the learning rate", low=0, high=1)
    final_lr_frac: float = setting(0.0, "learning rate at the end, as a fraction of the peak", low=0)


# nanochat at HEAD 92d63d4: scripts/base_train.py's defaults and gpt.py's setup_optimizer. Its
# learning rates are before nanochat's batch-size scaling (the pretraining budget applies it).
NANOCHAT_OPTIM = OptimConfig(
    matrix_lr=0.02, embedding_lr=0.3, head_lr=0.008, scalar_lr=0.5, resid_lr=0.01, value_embed_lr=0.5, gate_lr=0.2,
    head_adam=(0.8, 0.96, 0.01), embedding_adam=(0.8, 0.995, 0.001), value_embed_adam=(0.8, 0.995, 0.01),
    resid_adam=(0.8, 0.95, 0.05), x0_adam=(0.96, 0.95, 0.0), weight_decay=0.28, cautious_wd=True,
    wd_schedule="cosine", muon_momentum=0.97, muon_momentum_start=0.85, muon_momentum_warmup_steps=400,
    muon_momentum_final=0.90, orthogonalizer="polar-express", muon_beta2=0.9, muon_eq=True, muon_plus=True,
    warmup_steps=40, warmdown_frac=0.65, final_lr_frac=0.05)


def scale_lrs(cfg: OptimConfig, scale: float) -> OptimConfig:
    """cfg with every base learning rate times `scale` (fine-tuning and RL train gentler than
    pretraining: their --lr-scale)."""
    return replace(cfg, matrix_lr=cfg.matrix_lr * scale, embedding_lr=cfg.embedding_lr * scale,
                   head_lr=cfg.head_lr * scale, scalar_lr=cfg.scalar_lr * scale, gate_lr=cfg.gate_lr * scale)


# ----------------------------------------------------------------------------- schedules


def lr_multiplier(step: int, total_steps: int, warmup_frac: float, warmdown_frac: float, final_lr_frac: float,
                  warmup_steps: int = 0) -> float:
    """Multiplier on every base LR at `step` (0-based) of `total_steps`.

    Warmup (warmup_steps, else warmup_frac of the run): (step+1)/warmup, so the very first step
    already moves. Constant 1.0 until total - warmdown_steps, then linear down to final_lr_frac,
    reached at step == total_steps (the last step actually taken, total-1, is one notch above)."""
    warmup = warmup_steps or round(warmup_frac * total_steps)
    warmdown = round(warmdown_frac * total_steps)
    if step < warmup:
        return (step + 1) / warmup
    if step <= total_steps - warmdown:
        return 1.0
    left = max(total_steps - step, 0) / warmdown  # 1 at the warmdown start, 0 at the end
    return final_lr_frac + (1.0 - final_lr_frac) * left


def muon_momentum(step: int, cfg: OptimConfig, total_steps: int = 0) -> float:
    """Muon momentum at `step`: linear from cfg.muon_momentum_start to cfg.muon_momentum over its
    warmup steps; then, with muon_momentum_final, linear to that through the LR's warmdown."""
    warmup = cfg.muon_momentum_warmup_steps
    if warmup > 0 and step < warmup:
        frac = step / warmup
        return (1.0 - frac) * cfg.muon_momentum_start + frac * cfg.muon_momentum
    warmdown = round(cfg.warmdown_frac * total_steps)
    if cfg.muon_momentum_final is not None and warmdown and step >= total_steps - warmdown:
        progress = (step - (total_steps - warmdown)) / warmdown
        return cfg.muon_momentum * (1 - progress) + cfg.muon_momentum_final * progress
    return cfg.muon_momentum


def wd_multiplier(step: int, total_steps: int, schedule: str) -> float:
    """Multiplier on the hidden matrices' weight decay at `step`: 1, or cosine from 1 to 0."""
    if schedule == "cosine" and total_steps:
        return 0.5 * (1 + math.cos(math.pi * step / total_steps))
    return 1.0


# ----------------------------------------------------------------------------- the combined optimizer


class Optimizer:
    """Muon for "matrix" parameters plus AdamW for the other groups, as one object.

    The training loop calls `set_schedule(lr_multiplier(...), muon_momentum(...), wd_multiplier(...))`
    before each `step()`; every group's LR is its base LR (`initial_lr`) times the multiplier, and
    Muon's weight decay its base (`initial_weight_decay`) times the last.
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

    def set_schedule(self, lr_mult: float, muon_momentum: float | None = None, wd_mult: float = 1.0) -> None:
        self.lr_mult = lr_mult
        for g in self.param_groups:
            g["lr"] = g["initial_lr"] * lr_mult
        if self.muon is not None:
            for g in self.muon.param_groups:
                g["weight_decay"] = g.get("initial_weight_decay", g["weight_decay"]) * wd_mult
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


GROUP_NAMES = ("matrix", "embedding", "head", "resid", "x0", "value_embed", "gate")
# what each group's optimizer keeps per parameter between steps: Muon one momentum, AdamW two moments
STATE_VALUES = {"matrix": 1, "embedding": 2, "head": 2, "resid": 2, "x0": 2, "value_embed": 2, "gate": 2}


def state_values(counts: dict[str, int]) -> int:
    """Values of optimizer state kept between steps, from the parameters per group
    (model.param_counts)."""
    return sum(STATE_VALUES[group] * n for group, n in counts.items())


def build_optimizer(model: nn.Module, cfg: OptimConfig, group_by_shape: bool = True) -> Optimizer:
    """Muon + AdamW over `model.param_groups()` (keys: GROUP_NAMES).

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
            orthogonalizer=cfg.orthogonalizer,
            beta2=cfg.muon_beta2,
            equilibrate=cfg.muon_eq,
            renormalize=cfg.muon_plus,
            cautious=cfg.cautious_wd,
        )
        for g in muon.param_groups:
            g["initial_weight_decay"] = cfg.weight_decay
    # Embedding and head LRs were tuned at width 768; wider models want smaller Adam steps
    # (muP-style 1/sqrt(width) scaling, as nanochat does). Muon needs no such factor: its update
    # is orthogonal, so its size does not grow with width.
    width_scale = (model.config.n_embd / 768) ** -0.5

    def adam(params: list, lr: float, hyper: tuple | None) -> dict:
        beta1, beta2, wd = hyper if hyper is not None else (*cfg.adam_betas, 0.0)
        return dict(params=params, lr=lr, betas=(beta1, beta2), weight_decay=wd)
    resid = adam(groups["resid"], cfg.scalar_lr * cfg.resid_lr, cfg.resid_adam)
    x0 = adam(groups["x0"], cfg.scalar_lr, cfg.x0_adam)
    same = {k: v for k, v in resid.items() if k != "params"} == {k: v for k, v in x0.items() if k != "params"}
    scalars = [dict(x0, params=resid["params"] + x0["params"])] if same else [resid, x0]  # one group where they agree
    adam_groups = [
        adam(groups["embedding"], cfg.embedding_lr * width_scale, cfg.embedding_adam),
        adam(groups["head"], cfg.head_lr * width_scale, cfg.head_adam),
        *scalars,
        adam(groups["value_embed"], cfg.embedding_lr * width_scale * cfg.value_embed_lr, cfg.value_embed_adam),
        adam(groups["gate"], cfg.gate_lr, None),
    ]
    adam_groups = [g for g in adam_groups if g["params"]]
    for g in adam_groups:
        g["initial_lr"] = g["lr"]
    adamw = None
    if adam_groups:
        adam_class = ShardedAdamW if distributed.world_size() > 1 else torch.optim.AdamW
        adamw = adam_class(adam_groups, eps=cfg.adam_eps, foreach=True, fused=False)
    return Optimizer(muon, adamw)
