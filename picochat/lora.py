"""LoRA (Hu et al., 2021): fine-tune a frozen model through low-rank updates of some of its Linear
layers. Each adapted layer computes x W^T + (alpha / r) x A^T B^T, with A (r x in) random and B
(out x r) zero, so training starts from the model itself; only A and B get gradients and optimizer
state (AdamW: Muon's orthogonal update has no sense for an r-wide factor).

A base model never trained the special tokens' rows of its embedding and head (its text has no
<|python_start|> or <|assistant_end|>), and no update of the blocks can make a frozen, near-zero
head row likely: those rows (the last ids, tokenizer.py) train too, as a delta of 2 x 11 x width
values.

The adapters sit beside the model, not in it: a forward hook on each adapted Linear adds its
update (and on the embedding and the head, their rows'; the loss reads the head's weight through
GPT.head_rows), so the model's weights, names and state dict stay what every other command
reads. At the end of a stage the update is merged into the weights (W + alpha / r B A), and the
adapter is kept beside them in the run dir (adapter.safetensors, adapter_config.json); unmerged,
the run dir holds the base weights and load_run merges the adapter as it loads (run_dir.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import distributed
from .common import PicochatError
from .settings import setting
from .tokenizer import SPECIAL_TOKENS


@dataclass
class LoraConfig:
    lora: int | None = setting(None, "train low-rank adapters of this rank on the frozen model instead of every "
                                     "weight, with AdamW (default: full fine-tuning)", low=1, metavar="RANK")
    lora_alpha: float = setting(16.0, "the adapters' update is scaled by alpha / rank", low=0)
    lora_targets: str = setting("attn,mlp", "the projections that get adapters, comma-separated: attn (c_q, c_k, "
                                            "c_v, c_proj), mlp (c_fc, c_proj), a projection's name, or a layer's "
                                            "(blocks.3.mlp.c_fc)")
    lora_lr: float = setting(2e-3, "AdamW learning rate of the adapters, before the schedule", low=0)
    lora_merge: bool = setting(True, "merge the adapters into the saved weights (with --no-lora-merge the run dir "
                                     "keeps the base weights, and the adapter is applied as it loads)",
                               defines_run=False)


# the blocks' projections; not the head, whose loss runs a chunk of rows at a time from its weight
# (loss.py), nor the small gates
PROJECTIONS = ("c_q", "c_k", "c_v", "c_proj", "c_fc")


def projection_names(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and name.startswith("blocks.") and name.rsplit(".", 1)[-1] in PROJECTIONS]


def matching(model: nn.Module, targets: str) -> list[str]:
    """The projections whose dotted name has one of the comma-separated targets as a run of its
    parts (attn matches blocks.0.attn.c_q; c_proj matches both of a block's output projections)."""
    names = projection_names(model)
    wanted = [t.strip() for t in targets.split(",") if t.strip()]
    if not wanted:
        raise PicochatError("--lora-targets: no layer named")
    chosen = []
    for target in wanted:
        part = target.split(".")
        hits = [n for n in names if any(n.split(".")[i:i + len(part)] == part for i in range(len(n.split("."))))]
        if not hits:
            kinds = sorted({".".join(n.split(".")[2:]) for n in names})
            raise PicochatError(f"--lora-targets: {target!r} matches none of the model's projections (blocks.N. "
                                f"{', '.join(kinds)})")
        chosen += [n for n in hits if n not in chosen]
    return sorted(chosen, key=names.index)


class Adapters(nn.Module):
    """The adapters of one model: A and B for each adapted Linear, in the order of `names`."""

    def __init__(self, model: nn.Module, rank: int, alpha: float, names: list[str]):
        super().__init__()
        if rank < 1:
            raise PicochatError(f"--lora {rank}: the rank must be at least 1")
        self.rank, self.alpha, self.names = rank, alpha, list(names)
        self.scale = alpha / rank
        vocab, width = model.config.vocab_size, model.config.n_embd
        self.special = slice(vocab - len(SPECIAL_TOKENS), vocab)  # the special tokens' ids: the last ones
        self.embed_rows = nn.Parameter(torch.zeros(len(SPECIAL_TOKENS), width, device=model.wte.weight.device))
        self.head_rows = nn.Parameter(torch.zeros(len(SPECIAL_TOKENS), width, device=model.wte.weight.device))
        modules = dict(model.named_modules())
        self.lora_A, self.lora_B = nn.ParameterList(), nn.ParameterList()
        for name in self.names:
            w = modules[name].weight
            a = torch.empty(rank, w.size(1), device=w.device)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # as nn.Linear initializes its weight
            self.lora_A.append(nn.Parameter(a))
            self.lora_B.append(nn.Parameter(torch.zeros(w.size(0), rank, device=w.device)))
        self.hooks: list = []  # (the handles: a hook is removed with its handle)

    @classmethod
    def for_model(cls, model: nn.Module, cfg: LoraConfig) -> Adapters:
        return cls(model, cfg.lora, cfg.lora_alpha, matching(model, cfg.lora_targets))

    def attach(self, model: nn.Module) -> Adapters:
        """Freeze the model and add each adapter's update to its layer's output."""
        model.requires_grad_(False)
        modules = dict(model.named_modules())
        for i, name in enumerate(self.names):
            self.hooks.append(modules[name].register_forward_hook(self._hook(i)))
        self.hooks.append(model.wte.register_forward_hook(self._embed_hook))
        self.hooks.append(model.lm_head.register_forward_hook(self._head_hook))
        model.head_rows = self.with_head_rows
        return self

    @staticmethod
    def _rows(delta: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """fp32 adapters in the activations' dtype (bf16 under GPT.computing_in)."""
        return delta.to(like.dtype) if delta.dtype != like.dtype else delta

    def _embed_hook(self, module, inputs, out):
        idx, first = inputs[0], self.special.start
        return out + (idx >= first).unsqueeze(-1) * self._rows(self.embed_rows, out)[(idx - first).clamp(min=0)]

    def _head_hook(self, module, inputs, out):  # logits outside the loss (evals, sampling)
        s = self.special
        extra = F.linear(inputs[0], self._rows(self.head_rows, inputs[0]))
        return torch.cat([out[..., :s.start], out[..., s] + extra, out[..., s.stop:]], dim=-1)

    def with_head_rows(self, w: torch.Tensor) -> torch.Tensor:
        """The head's weight with the special tokens' rows trained (for the loss, loss.py)."""
        s = self.special
        return torch.cat([w[:s.start], w[s] + self.head_rows.to(w.dtype), w[s.stop:]])

    def _hook(self, i: int):
        def add_update(module, inputs, out):
            x = inputs[0]
            a, b = self._rows(self.lora_A[i], x), self._rows(self.lora_B[i], x)
            return out + self.scale * F.linear(F.linear(x, a), b)
        return add_update

    def update(self, i: int) -> torch.Tensor:
        """The i-th layer's weight update, alpha / r B A, fp32."""
        return self.scale * (self.lora_B[i].detach().float() @ self.lora_A[i].detach().float())

    @torch.no_grad()
    def merged_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The model's state dict with every update merged into its weight (the model unchanged)."""
        state = dict(model.state_dict())
        for i, name in enumerate(self.names):
            w = state[f"{name}.weight"]
            state[f"{name}.weight"] = (w.float() + self.update(i).to(w.device)).to(w.dtype)
        for key, delta in (("wte.weight", self.embed_rows), ("lm_head.weight", self.head_rows)):
            w = state[key].clone()
            w[self.special] += delta.detach().to(w.dtype)
            state[key] = w
        return state

    def tensors(self) -> dict[str, torch.Tensor]:
        """adapter.safetensors' contents: <layer>.lora_A and <layer>.lora_B, and the special tokens'
        rows of the embedding and the head."""
        out = {"wte.special_rows": self.embed_rows.detach(), "lm_head.special_rows": self.head_rows.detach()}
        for i, name in enumerate(self.names):
            out[f"{name}.lora_A"], out[f"{name}.lora_B"] = self.lora_A[i].detach(), self.lora_B[i].detach()
        return out

    def describe(self) -> dict:
        """adapter_config.json (and config.json's "lora")."""
        return {"rank": self.rank, "alpha": self.alpha, "layers": self.names,
                "special_rows": [self.special.start, self.special.stop]}

    @classmethod
    def from_saved(cls, model: nn.Module, described: dict, tensors: dict[str, torch.Tensor], where: str) -> Adapters:
        try:
            adapters = cls(model, int(described["rank"]), float(described["alpha"]), list(described["layers"]))
            with torch.no_grad():
                adapters.embed_rows.copy_(tensors["wte.special_rows"])
                adapters.head_rows.copy_(tensors["lm_head.special_rows"])
                for i, name in enumerate(adapters.names):
                    adapters.lora_A[i].copy_(tensors[f"{name}.lora_A"])
                    adapters.lora_B[i].copy_(tensors[f"{name}.lora_B"])
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise PicochatError(f"corrupt run dir {where}: its adapter does not fit its model ({e})") from None
        return adapters

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def adapter_shape(config, cfg: LoraConfig) -> tuple[int, int]:
    """(parameters, adapted layers) of the adapters a model of `config` gets, for the memory
    estimate before any model exists: rank x (in + out) parameters per adapted layer, and the
    special tokens' rows of the embedding and the head."""
    from .model import GPT
    with torch.device("meta"):
        model = GPT(config)
    modules, names = dict(model.named_modules()), matching(model, cfg.lora_targets)
    rows = 2 * len(SPECIAL_TOKENS) * config.n_embd
    return rows + sum(cfg.lora * sum(modules[n].weight.shape) for n in names), len(names)


def lora_optimizer(adapters: Adapters, lr: float):
    """AdamW over the adapters (sharded under torchrun, as the full model's is), in the Optimizer
    the loop schedules."""
    from .optim import Optimizer
    from .sharded_adamw import ShardedAdamW
    group = {"params": list(adapters.parameters()), "lr": lr, "initial_lr": lr, "betas": (0.9, 0.999),
             "weight_decay": 0.0}
    adam_class = ShardedAdamW if distributed.world_size() > 1 else torch.optim.AdamW
    return Optimizer(None, adam_class([group], eps=1e-8, foreach=True, fused=False))
