"""Training throughput and MFU of the real picochat step (forward, backward, Muon + AdamW).

    python bench/bench_train.py                      # depths 4 and 8, fp32/bf16, eager/compiled
    python bench/bench_train.py --depths 4 --steps 3 --no-compile --accum 1
    python bench/bench_train.py --features legacy    # the network before nanochat's 2026 features
    python bench/bench_train.py --depths 4 --dtypes fp32 --accum 4 --against-nanochat ../nanochat

MFU is measured against the matmul peak this script measures first on this machine (2048^2),
so the percentage says how much of what the hardware can do the step gets. A dtype whose matmul is
far below fp32 (bf16 on a CPU without AVX512-BF16) is reported and skipped.

--accum sets the micro-batches per optimizer step (default: 1 and 4). The optimizer's cost does not
grow with the batch: Muon's Newton-Schulz on a depth-8 model is about 0.9 TFLOP per step, more
than the forward and backward of one 8 x 256 micro-batch (0.8 TFLOP). Real runs take 8K (the tiny
preset) to 500K tokens per step, so "optimizer" shows its share of the step at each setting.

--against-nanochat DIR times nanochat's own training step (its GPT, its Muon + AdamW, from the
checkout in DIR, NANOCHAT_DTYPE as the row's dtype) on the same random tokens at the same width,
depth, context and tokens per step, in a fresh process; its MFU counts its own FLOPs per token
(GPT.estimate_flops). nanochat's network is its own: 128-wide heads, no GQA, its windows. The two
alternate --rounds times (default 3): a shared machine's speed drifts by 10-20% over minutes, and
alternating puts both under the same drift.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from picochat.common import choose_device, set_threads  # noqa: E402
from picochat.config import NANOCHAT_FEATURES, PICOCHAT_FEATURES, ModelConfig, ModelFeatures  # noqa: E402
from picochat.model import flops_per_token  # noqa: E402
from picochat.train.measure import sync, time_training_step  # noqa: E402

# the pretraining command's network (its default), the one before nanochat's 2026 features, nanochat's
FEATURES = {"picochat": PICOCHAT_FEATURES, "legacy": ModelFeatures(), "nanochat": NANOCHAT_FEATURES}


def matmul_peak(dtype: torch.dtype, device: torch.device, n: int = 2048, reps: int = 8) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
        if time.perf_counter() - t0 > 10:  # pathological dtypes: do not wait minutes
            reps = _ + 1
            break
    sync(device)
    return 2 * n ** 3 * reps / (time.perf_counter() - t0)


# argv: nanochat dir, config json, rows, accum, steps, warmup, compile (NANOCHAT_DTYPE set by the caller)
NANOCHAT_STEP = """
import json, sys, time, torch
sys.path.insert(0, sys.argv[1])
from nanochat.gpt import GPT, GPTConfig
config = GPTConfig(**json.loads(sys.argv[2]))
rows, accum, steps, warmup, compile = (int(a) for a in sys.argv[3:8])
torch.manual_seed(0)
with torch.device("meta"):
    model = GPT(config)
model.to_empty(device="cpu")
model.init_weights()
optimizer = model.setup_optimizer()
step_model = torch.compile(model, dynamic=False) if compile else model
g = torch.Generator().manual_seed(0)
times = []
for _ in range(warmup + steps):
    t0 = time.perf_counter()
    for _ in range(accum):
        row = torch.randint(0, config.vocab_size, (rows, config.sequence_len + 1), generator=g)
        loss = step_model(row[:, :-1].contiguous(), row[:, 1:].contiguous()) / accum
        loss.backward()
    optimizer.step()
    model.zero_grad(set_to_none=True)
    float(loss)
    times.append(time.perf_counter() - t0)
print(json.dumps({"step_s": sorted(times[warmup:])[steps // 2], "warmup_s": sum(times[:warmup]),
                  "flops_per_token": model.estimate_flops(), "params": sum(p.numel() for p in model.parameters())}))
"""


def bench_nanochat(nanochat: str, cfg: ModelConfig, dtype: str, compile_: bool, accum: int, args, peak) -> dict:
    spec = dict(sequence_len=cfg.sequence_len, vocab_size=cfg.vocab_size, n_layer=cfg.n_layer,
                n_head=max(1, cfg.n_embd // 128), n_kv_head=max(1, cfg.n_embd // 128), n_embd=cfg.n_embd)
    env = {**os.environ, "NANOCHAT_DTYPE": {"fp32": "float32", "bf16": "bfloat16"}[dtype]}
    out = subprocess.run([sys.executable, "-c", NANOCHAT_STEP, nanochat, json.dumps(spec), str(args.batch_size),
                          str(accum), str(args.steps), str(args.warmup), str(int(compile_))],
                         capture_output=True, text=True, check=True, env=env).stdout
    r = json.loads(out.strip().splitlines()[-1])
    tok_s = args.batch_size * cfg.sequence_len * accum / r["step_s"]
    return {"params": r["params"], "tok_s": tok_s, "step_s": r["step_s"], "warmup_s": r["warmup_s"],
            "mfu": r["flops_per_token"] * tok_s / peak, "opt_share": None}  # not timed apart


def bench_one(depth, dtype, compile_, accum, args, device, peak) -> dict:
    cfg = ModelConfig.from_depth(depth, vocab_size=args.vocab, sequence_len=args.seq_len,
                                 **dataclasses.asdict(FEATURES[args.features]))
    t, params = time_training_step(cfg, args.batch_size, device, dtype, steps=args.steps, warmup=args.warmup,
                                   accum=accum, compile=compile_)
    tok_s = args.batch_size * args.seq_len * accum / t.step_seconds
    return {"params": params, "tok_s": tok_s, "step_s": t.step_seconds, "warmup_s": t.warmup_seconds,
            "mfu": flops_per_token(cfg) * tok_s / peak, "opt_share": t.optimizer_seconds / t.step_seconds}


def median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def median_round(results: tuple[dict, ...]) -> dict:
    """Of one model's rounds, the one with the median tokens/s."""
    return sorted(results, key=lambda r: r["tok_s"])[len(results) // 2]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--depths", type=int, nargs="+", default=[4, 8])
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"])
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--accum", type=int, nargs="+", default=[1, 4], help="micro-batches per optimizer step")
    p.add_argument("--device", default="cpu")
    p.add_argument("--features", choices=list(FEATURES), default="picochat", help="the network's features")
    p.add_argument("--against-nanochat", metavar="DIR", help="a nanochat checkout, timed beside picochat")
    p.add_argument("--rounds", type=int, default=3, help="with --against-nanochat: picochat and nanochat alternate "
                   "this many times; each row is the median round, the ratio the median of the rounds' ratios")
    args = p.parse_args()
    set_threads()
    device = choose_device(args.device)
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    peaks = {name: matmul_peak(dtypes[name], device) for name in args.dtypes}
    print(f"device {device}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print("matmul peak (2048^2): " + ", ".join(f"{k} {v / 1e9:,.1f} GFLOP/s" for k, v in peaks.items()))
    rounds = f", the median of {args.rounds} alternating rounds" if args.against_nanochat else ""
    print(f"batch {args.batch_size} x seq {args.seq_len}, vocab {args.vocab}, {args.features} features, median of "
          f"{args.steps} steps{rounds}\n")
    print("| model | depth | params | dtype | compile | tokens/step | tok/s | step (s) | optimizer "
          "| MFU vs measured peak | first steps (s) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for depth in args.depths:
        for name in args.dtypes:
            if peaks[name] < 0.1 * peaks["fp32" if "fp32" in peaks else name]:
                print(f"| picochat | {depth} | | {name} | | | skipped: matmul {peaks[name] / 1e9:.1f} GFLOP/s, no "
                      f"native support | | | | |")
                continue
            for compile_ in ([False] if args.no_compile else [False, True]):
                for accum in args.accum:
                    rounds = []  # picochat and nanochat alternate, so that a slow spell of the machine hits both
                    for _ in range(args.rounds if args.against_nanochat else 1):
                        pair = [bench_one(depth, dtypes[name], compile_, accum, args, device, peaks[name])]
                        if args.against_nanochat:
                            cfg = ModelConfig.from_depth(depth, vocab_size=args.vocab, sequence_len=args.seq_len)
                            pair.append(bench_nanochat(args.against_nanochat, cfg, name, compile_, accum, args,
                                                       peaks[name]))
                        rounds.append(pair)
                    rows = list(zip(("picochat", "nanochat"), map(median_round, zip(*rounds))))
                    speedup = median([pico["tok_s"] / nano["tok_s"] for pico, nano in rounds]) if len(rows) > 1 else 0
                    for who, r in rows:
                        ratio = f" (picochat {speedup:.2f}x)" if who == "nanochat" else ""
                        share = "" if r["opt_share"] is None else f"{100 * r['opt_share']:.0f}%"
                        print(f"| {who}{ratio} | {depth} | {r['params'] / 1e6:.1f}M | {name} "
                              f"| {'yes' if compile_ else 'no'} | {args.batch_size * args.seq_len * accum:,} "
                              f"| {r['tok_s']:,.0f} | {r['step_s']:.3f} | {share} "
                              f"| {100 * r['mfu']:.1f}% | {r['warmup_s']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
