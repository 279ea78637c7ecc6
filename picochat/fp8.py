"""FP8 training (--fp8): the hidden matrices' products in float8, through torchao's float8
training (tensorwise dynamic scaling: e4m3 for inputs and weights, e5m2 for gradients).

Only the training step computes in FP8. fp8_training_view(model) returns a second module tree
over the same Parameter objects, whose eligible Linears are torchao's Float8Linear: the trainer
runs its forward and backward through it, the optimizer updates the shared weights, and
everything else (evals, samples, the saved run dir) reads the model itself, in bf16, with no
conversion to undo. The head is not converted (its product runs in loss.py, a chunk at a time).

Eligible: a Linear whose sides are multiples of 16 (what the FP8 GEMMs accept) and at least 128
(nanochat's rule: below that the casts cost more than FP8 saves), so the value-embedding and
smear gates stay as they are.

FP8 GEMMs need an NVIDIA GPU of compute capability 8.9 or newer (Ada, Hopper, Blackwell).
PICOCHAT_FP8_EMULATE=1 lets a CPU run the same conversion with torchao's emulated matmuls
(what the tests use; far slower than bf16, never for real training).
"""

from __future__ import annotations

import copy
import os

import torch
import torch.nn as nn

from .common import PicochatError

EMULATE_ENV = "PICOCHAT_FP8_EMULATE"


def fp8_problem(device: torch.device) -> str | None:
    """Why `device` cannot train in FP8, or None when it can."""
    if device.type != "cuda" and not (device.type == "cpu" and os.environ.get(EMULATE_ENV) == "1"):
        return f"FP8 training needs an NVIDIA GPU of compute capability 8.9 or newer (H100, L4, RTX 4090); " \
               f"this run is on {device.type}"
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        major, minor = torch.cuda.get_device_capability(device)
        return f"FP8 training needs compute capability 8.9 or newer; {torch.cuda.get_device_name(device)} has " \
               f"{major}.{minor}"
    try:
        import torchao.float8  # noqa: F401
    except ImportError:
        return "FP8 training needs torchao: pip install torchao"
    return None


def eligible(module: nn.Module, name: str = "") -> bool:
    """Whether a module's product runs in FP8 (torchao's module_filter_fn)."""
    if not isinstance(module, nn.Linear) or name.endswith("lm_head"):
        return False
    sides = (module.in_features, module.out_features)
    return all(s % 16 == 0 for s in sides) and min(sides) >= 128


def fp8_training_view(model: nn.Module, device: torch.device) -> nn.Module:
    """A copy of `model`'s module tree sharing its parameters and buffers, its eligible Linears
    converted to Float8Linear. Raises PicochatError where `device` cannot train in FP8."""
    problem = fp8_problem(device)
    if problem:
        raise PicochatError(f"--fp8: {problem}")
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    shared = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    view = copy.deepcopy(model, memo=shared)
    config = Float8LinearConfig(emulate=device.type != "cuda")
    convert_to_float8_training(view, config=config, module_filter_fn=eligible)
    if {id(p) for p in view.parameters()} != {id(p) for p in model.parameters()}:
        raise RuntimeError("fp8_training_view: the converted modules do not share the model's parameters")
    return view


def fp8_layers(module: nn.Module) -> int:
    return sum(type(m).__name__ == "Float8Linear" for m in module.modules())
