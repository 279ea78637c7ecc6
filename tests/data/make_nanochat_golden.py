"""Golden values from nanochat's own code, for picochat's exactness tests (tests/test_nanochat_golden.py).

    python tests/data/make_nanochat_golden.py --nanochat PATH/TO/nanochat

It imports nanochat from the checkout given (on the CPU, fp32: NANOCHAT_DTYPE=float32) and writes
tests/data/nanochat/golden.safetensors and golden.json:
- model: a tiny GPT with every feature of nanochat's network on (value embeddings, smear,
  backout, GQA, a sliding window that the tokens outgrow, the vocabulary padded), its weights
  given noise so that every path carries signal, and its logits on fixed tokens;
- optimizer: one step of nanochat's MuonAdamW, set up as its base_train sets it up, from fixed
  weights and fixed gradients, at steps 0, 39, mid-run and in the warmdown of a 1,000-step run
  (learning rate, Muon momentum and weight decay from base_train's schedules): the new weights.
Weights and gradients are rounded to fp16 first, so that they are stored exactly in half the
bytes; everything computed from them is kept in fp32. golden.json records the nanochat commit
and torch version that made them. The test refuses a golden file from another commit than the one
it was written against, naming both.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

OUT = Path(__file__).resolve().parent / "nanochat"
MODEL = dict(sequence_len=512, vocab_size=50, n_layer=3, n_head=2, n_kv_head=1, n_embd=24, window_pattern="SSL")
TOKENS = 160  # past the short window: ceil(512 / 4 / 128) * 128 = 128 keys before the query
OPTIM_MODEL = dict(sequence_len=64, vocab_size=16, n_layer=2, n_head=1, n_kv_head=1, n_embd=8, window_pattern="L")
RUN_STEPS = 1000
STEPS = (0, 39, 500, 900)  # warmup, its end, mid-run, the warmdown (65% of the run: from step 350)
# base_train's defaults (scripts/base_train.py at the commit this was written against)
TRAIN = dict(embedding_lr=0.3, unembedding_lr=0.008, matrix_lr=0.02, scalar_lr=0.5, weight_decay=0.28,
             warmup_steps=40, warmdown_ratio=0.65, final_lr_frac=0.05)


def half(t: torch.Tensor) -> torch.Tensor:
    return t.half().float()


def noisy_model(GPT, GPTConfig, config: dict, seed: int):
    """nanochat's model as base_train builds it (meta device, then init_weights), each weight then
    given noise and rounded to fp16."""
    with torch.device("meta"):
        model = GPT(GPTConfig(**config))
    model.to_empty(device="cpu")
    torch.manual_seed(seed)
    model.init_weights()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            p.copy_(half(p + 0.3 * torch.randn(p.shape, generator=g)))
    return model


def schedules(step: int) -> tuple[float, float, float]:
    """base_train's LR multiplier, Muon momentum and weight decay (before its depth scaling) at `step`."""
    import math
    warmdown = round(TRAIN["warmdown_ratio"] * RUN_STEPS)
    if step < TRAIN["warmup_steps"]:
        lr = (step + 1) / TRAIN["warmup_steps"]
    elif step <= RUN_STEPS - warmdown:
        lr = 1.0
    else:
        progress = (RUN_STEPS - step) / warmdown
        lr = progress + (1 - progress) * TRAIN["final_lr_frac"]
    start = RUN_STEPS - warmdown
    if step < 400:
        momentum = (1 - step / 400) * 0.85 + step / 400 * 0.97
    elif step >= start:
        progress = (step - start) / warmdown
        momentum = 0.97 * (1 - progress) + 0.90 * progress
    else:
        momentum = 0.97
    wd = TRAIN["weight_decay"] * 0.5 * (1 + math.cos(math.pi * step / RUN_STEPS))
    return lr, momentum, wd


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nanochat", required=True, help="a nanochat checkout")
    args = ap.parse_args()
    os.environ["NANOCHAT_DTYPE"] = "float32"
    sys.path.insert(0, str(Path(args.nanochat).resolve()))
    from nanochat.gpt import GPT, GPTConfig
    commit = subprocess.run(["git", "-C", args.nanochat, "rev-parse", "HEAD"], capture_output=True, text=True,
                            check=True).stdout.strip()
    out: dict[str, torch.Tensor] = {}

    model = noisy_model(GPT, GPTConfig, MODEL, seed=0)
    tokens = torch.randint(0, MODEL["vocab_size"], (1, TOKENS), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(tokens)
    out.update({f"model.{k}": v.half() for k, v in model.state_dict().items()})
    out["model_tokens"], out["model_logits"] = tokens, logits.float()

    for step in STEPS:
        model = noisy_model(GPT, GPTConfig, OPTIM_MODEL, seed=2)
        g = torch.Generator().manual_seed(3)
        grads = {name: half(torch.randn(p.shape, generator=g)) for name, p in sorted(model.named_parameters())}
        if step == STEPS[0]:
            out.update({f"optim.weight.{k}": v.half() for k, v in model.state_dict().items()})
            out.update({f"optim.grad.{k}": v.half() for k, v in grads.items()})
        lr, momentum, wd = schedules(step)
        optimizer = model.setup_optimizer(unembedding_lr=TRAIN["unembedding_lr"], embedding_lr=TRAIN["embedding_lr"],
                                          scalar_lr=TRAIN["scalar_lr"], matrix_lr=TRAIN["matrix_lr"],
                                          weight_decay=TRAIN["weight_decay"])
        for group in optimizer.param_groups:  # what base_train sets before each step
            group["lr"] = group["initial_lr"] * lr
            if group["kind"] == "muon":
                group["momentum"], group["weight_decay"] = momentum, wd
        for name, p in model.named_parameters():
            p.grad = grads[name].clone()
        optimizer.step()
        out.update({f"optim.step{step}.{k}": v.float() for k, v in model.state_dict().items()})

    OUT.mkdir(exist_ok=True)
    save_file({k: v.contiguous() for k, v in out.items()}, OUT / "golden.safetensors")
    (OUT / "golden.json").write_text(json.dumps({
        "nanochat_commit": commit, "torch": torch.__version__, "model": MODEL, "tokens": TOKENS,
        "optim_model": OPTIM_MODEL, "run_steps": RUN_STEPS, "steps": list(STEPS), "train": TRAIN,
        "schedules": {str(s): schedules(s) for s in STEPS}}, indent=1) + "\n")
    print(f"wrote {OUT / 'golden.safetensors'} ({(OUT / 'golden.safetensors').stat().st_size:,} bytes) from nanochat "
          f"{commit[:7]}")


if __name__ == "__main__":
    main()
