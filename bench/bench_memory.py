"""Training memory, measured: the peak-memory estimate (picochat/memory.py) against real CPU
training steps, and memory per token against nanochat's at the same shape.

    python bench/bench_memory.py                                  # the estimate: depth 4 and 8, every path
    python bench/bench_memory.py --configs 12:32768:512:4 --paths fp32 bf16
    python bench/bench_memory.py --per-token --against-nanochat ../nanochat   # d20's shape, side by side
    python bench/bench_memory.py --per-token --depth 2 --paths "fp32 compiled" "bf16 compiled" fp32 bf16

Paths: fp32 or bf16 (GPT.computing_in), eager, compiled or with --grad-checkpoint.

The estimate: each config runs in a fresh process, two training steps (forward, backward, Muon +
AdamW) of `rows` x `seq` tokens; the second step's peak resident set size is read (the kernel's
high-water mark, reset after the first step: a compiled step is measured without the compiler's
own peak). The estimate is what `picochat pretrain` logs and refuses on; it should sit at or a
little above the measurement.

Per token: one forward and backward pass of one row of T1 and of T2 tokens, each in a fresh
process, at a preset's shape (default `d20`: depth 20, width 1,280, vocab 32,768, context 2,048,
nanochat's network); (peak RSS at T2 - peak RSS at T1) / (T2 - T1) is what a token costs, with
the weights and the runtime cancelled out. The gradients are allocated before the measured pass,
so that its peak is the activations' (allocated during the backward pass, they would overlap the
activations it frees, and the difference would come out short). These children run with a fixed
malloc mmap threshold, so that freed blocks leave the resident set (the estimate's children run
with malloc as users have it). nanochat runs from the checkout given (its own model,
NANOCHAT_DTYPE=float32 or bfloat16: bf16 compute with fp32 master weights).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")

# Peak resident memory of one step, read from the kernel: /proc/self/clear_refs resets the
# high-water mark, so a compiled step is measured after compiling, not with the compiler's own peak.
PEAK = """
import re
import torch
def reset_peak():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
def peak():
    with open("/proc/self/status") as f:
        return int(re.search(r"VmHWM:\\s+(\\d+)", f.read()).group(1)) * 1024
def zero_grads(model):  # allocated before the measured step, so that its peak is the activations'
    for p in model.parameters():
        p.grad = torch.zeros_like(p) if p.grad is None else p.grad.zero_()
"""

# argv: repo, depth, vocab, seq, rows, dtype, grad checkpoint, compile
ESTIMATE = PEAK + """
import json, sys, torch
sys.path.insert(0, sys.argv[1])
from picochat.config import ModelConfig
from picochat.memory import estimate_training_memory
from picochat.model import GPT, num_params
from picochat.optim import OptimConfig, build_optimizer
depth, vocab, seq, rows, bf16, ckpt, comp = (int(a) for a in sys.argv[2:9])
dtype = torch.bfloat16 if bf16 else torch.float32
config = ModelConfig.from_depth(depth, vocab_size=vocab, sequence_len=seq)
model = GPT(config)
model.grad_checkpoint = bool(ckpt)
step_model = torch.compile(model, dynamic=False) if comp else model
opt = build_optimizer(model, OptimConfig())
x = torch.randint(0, vocab, (rows, seq))
for i in range(2):  # the second step's peak: the optimizer's state exists, the compiler has finished
    if i == 1:
        reset_peak()
    with model.computing_in(dtype):
        loss = step_model(x, x)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
est = estimate_training_memory(config, rows, seq, dtype, bool(ckpt), device_type="cpu", compiled=bool(comp))
print(json.dumps({"peak": peak(), "estimate": est.total, "params": num_params(config)}))
"""

# argv: repo, preset, layers, tokens, dtype, grad checkpoint, compile
PICOCHAT_STEP = PEAK + """
import dataclasses, json, sys, torch
sys.path.insert(0, sys.argv[1])
from picochat.model import GPT
from picochat.presets import PRESETS
config = dataclasses.replace(PRESETS[sys.argv[2]].model_config(), n_layer=int(sys.argv[3]))
tokens, dtype = int(sys.argv[4]), {"fp32": torch.float32, "bf16": torch.bfloat16}[sys.argv[5]]
model = GPT(config)
model.grad_checkpoint = sys.argv[6] == "1"
step_model = torch.compile(model, dynamic=False) if sys.argv[7] == "1" else model
x = torch.randint(0, config.vocab_size, (1, tokens))
for i in range(1 + (sys.argv[7] == "1")):  # compiled: measure the step after the one that compiles
    zero_grads(model)
    reset_peak()
    with model.computing_in(dtype):
        loss = step_model(x, x)
    loss.backward()
print(json.dumps({"peak": peak()}))
"""

# argv: nanochat dir, config json, tokens, compile (NANOCHAT_DTYPE set by the caller)
NANOCHAT_STEP = PEAK + """
import json, sys, torch
sys.path.insert(0, sys.argv[1])
from nanochat.gpt import GPT, GPTConfig
config = GPTConfig(**json.loads(sys.argv[2]))
with torch.device("meta"):
    model = GPT(config)
model.to_empty(device="cpu")
model.init_weights()
step_model = torch.compile(model, dynamic=False) if sys.argv[4] == "1" else model
x = torch.randint(0, config.vocab_size, (1, int(sys.argv[3])))
for i in range(1 + (sys.argv[4] == "1")):
    zero_grads(model)
    reset_peak()
    step_model(x, x).backward()
print(json.dumps({"peak": peak()}))
"""


# glibc's malloc otherwise raises its mmap threshold as big blocks are freed and serves later ones
# from its heap, where freed memory stays resident: the peak RSS would count memory no longer in use
MALLOC = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def child(code: str, *args: str, env: dict | None = None) -> dict:
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=True,
                         env={**os.environ, **(env or {})}).stdout
    return json.loads(out.strip().splitlines()[-1])


PATHS = {"fp32": (0, 0, 0), "bf16": (1, 0, 0), "fp32 compiled": (0, 0, 1), "bf16 compiled": (1, 0, 1),
         "fp32 checkpointed": (0, 1, 0), "bf16 checkpointed": (1, 1, 0)}  # bf16, grad checkpoint, compile


def estimate_table(configs: list[str], paths: list[str]) -> None:
    print("| depth | vocab | seq x rows | path | params | peak RSS (GiB) | estimate (GiB) | estimate / RSS |")
    print("|---|---|---|---|---|---|---|---|")
    for spec in configs:
        depth, vocab, seq, rows = (int(v) for v in spec.split(":"))
        for path in paths:
            r = child(ESTIMATE, REPO, str(depth), str(vocab), str(seq), str(rows), *(str(v) for v in PATHS[path]))
            print(f"| {depth} | {vocab:,} | {seq} x {rows} | {path} | {r['params'] / 1e6:.1f}M "
                  f"| {r['peak'] / 2**30:.2f} | {r['estimate'] / 2**30:.2f} | {r['estimate'] / r['peak']:.2f} |",
                  flush=True)


def per_token_table(preset: str, depth: int | None, tokens: tuple[int, int], nanochat: str | None,
                    paths: list[str]) -> None:
    sys.path.insert(0, REPO)
    import dataclasses

    import torch

    from picochat.memory import activation_bytes_per_token, head_bytes
    from picochat.presets import PRESETS
    config = PRESETS[preset].model_config()
    config = dataclasses.replace(config, n_layer=depth or config.n_layer)
    t1, t2 = tokens
    print(f"{preset}: depth {config.n_layer}, width {config.n_embd}, vocab {config.vocab_size:,}, one row of "
          f"{t1:,} and of {t2:,} tokens, forward + backward, CPU\n")
    print("| model | path | KiB per token | picochat's estimate |")
    print("|---|---|---|---|")
    rows = [("picochat", p) for p in paths]
    rows += [("nanochat", p) for p in paths if "checkpointed" not in p] if nanochat else []
    for who, path in rows:
        bf16, ckpt, comp = PATHS[path]
        if who == "picochat":
            peaks = [child(PICOCHAT_STEP, REPO, preset, str(config.n_layer), str(t), "bf16" if bf16 else "fp32",
                           str(ckpt), str(comp), env=MALLOC)["peak"] for t in tokens]
            dtype = torch.bfloat16 if bf16 else torch.float32
            est = activation_bytes_per_token(config, dtype, bool(ckpt))
            est += (head_bytes(config, t2, dtype, bool(comp)) - head_bytes(config, t1, dtype, bool(comp))) / (t2 - t1)
            est_text = f"{est / 1024:,.0f}"
        else:
            spec = json.dumps(dict(sequence_len=config.sequence_len, vocab_size=config.vocab_size,
                                   n_layer=config.n_layer, n_head=config.n_head, n_kv_head=config.n_kv_head,
                                   n_embd=config.n_embd, window_pattern=config.window_pattern))
            env = {**MALLOC, "NANOCHAT_DTYPE": "bfloat16" if bf16 else "float32"}
            peaks = [child(NANOCHAT_STEP, nanochat, spec, str(t), str(comp), env=env)["peak"] for t in tokens]
            est_text = ""
        per_token = (peaks[1] - peaks[0]) / (t2 - t1)
        print(f"| {who} | {path} | {per_token / 1024:,.0f} | {est_text} |", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=["4:4096:256:16", "8:32768:512:8"],
                   help="the estimate's configs, depth:vocab:seq:rows")
    p.add_argument("--per-token", action="store_true", help="memory per token at a preset's shape instead")
    p.add_argument("--preset", default="d20", help="the shape of --per-token")
    p.add_argument("--depth", type=int, help="--per-token at the preset's width with this many layers "
                   "(compiling 20 layers takes minutes)")
    p.add_argument("--tokens", type=int, nargs=2, default=[1024, 2048], help="--per-token's two lengths")
    p.add_argument("--paths", nargs="+", choices=list(PATHS), default=list(PATHS), metavar="PATH",
                   help=f"of: {', '.join(PATHS)} (default: all)")
    p.add_argument("--against-nanochat", metavar="DIR", help="a nanochat checkout, measured beside picochat")
    a = p.parse_args()
    if a.per_token:
        per_token_table(a.preset, a.depth, tuple(a.tokens), a.against_nanochat, a.paths)
    else:
        estimate_table(a.configs, a.paths)


if __name__ == "__main__":
    main()
