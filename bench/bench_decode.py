"""Decode speed of the Engine against the memory-bandwidth bound, on CPU in fp32.

    python bench/bench_decode.py                           # depths 4 and 8, batch 1 and 8
    python bench/bench_decode.py --depths 4 --batch-sizes 1 --tokens 64 --bandwidth 50 --threads 1

Each step of batched decoding reads every weight matrix once (the token embedding only reads B
rows, so it is left out), whatever the batch size. At batch 1 that read is the floor of a step's
time: bound = batch / (weight bytes / bandwidth) tokens per second. The bandwidth is the read
rate the script measures first (a sum over 512 MiB on every thread), or --bandwidth GB/s.

Few-row products go through linear.Linear's CPU paths (row blocks, oneDNN; see its docstring);
`--plain-linear` sends every product through F.linear, plain BLAS, for the comparison.

"engine" is Engine.generate (sampling, bookkeeping, one .tolist() a step); "forward only" feeds a
fixed token straight into the model with the same cache, so the difference between the two is the
engine's own overhead. Random weights: speed does not depend on them.

Each depth runs eagerly (DynamicKVCache) and compiled (Engine(compile=True): torch.compile of the step on
a StaticKVCache of the whole context); "compile s" is the first compiled step's time, which is
short when inductor's on-disk cache already holds the graph. `--modes eager` skips compiling.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from picochat.common import set_threads
from picochat.config import ModelConfig
from picochat.decode_batch import GenRequest
from picochat.engine import Engine
from picochat.kv_cache import DynamicKVCache, StaticKVCache
from picochat.linear import Linear
from picochat.model import GPT


def read_bandwidth(mbytes: int = 512, reps: int = 5) -> float:
    """Bytes read per second by summing a large fp32 tensor on every thread; best of reps. Decoding
    only reads the weights, so this is the rate its bound is made of."""
    src = torch.ones(mbytes * 2**20 // 4)
    src.sum()  # touch the pages first
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        src.sum()
        best = min(best, time.perf_counter() - t0)
    return src.numel() * 4 / best


def weight_bytes(model: GPT) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters()) - \
        model.wte.weight.numel() * model.wte.weight.element_size()


@torch.inference_mode()
def forward_only(engine: Engine, prompt: list[int], batch: int, tokens: int) -> float:
    """Seconds for tokens-1 one-token forwards of a batch, after a prefill, the way the engine
    steps: eagerly on a DynamicKVCache just long enough, or compiled on a StaticKVCache of the context."""
    model, compiled = engine.model, engine.decode_step is not None
    cache = DynamicKVCache(model.config, batch, engine.context if compiled else len(prompt) + tokens)
    model(torch.tensor([prompt] * batch), kv_cache=cache)
    if compiled:
        cache = StaticKVCache(cache)
    nxt = torch.full((batch, 1), prompt[-1])
    t0 = time.perf_counter()
    for _ in range(tokens - 1):
        engine._decode(nxt, cache)
    return time.perf_counter() - t0


def engine_decode(engine: Engine, prompt: list[int], batch: int, tokens: int, top_k: int | None) -> tuple[float, float]:
    """(prefill seconds incl. the first sample, seconds for the remaining tokens-1 steps)."""
    t0 = time.perf_counter()
    it = engine.generate([GenRequest(prompt, batch, tokens, temperature=1.0, top_k=top_k, seed=0)])
    next(it)
    t1 = time.perf_counter()
    steps = sum(1 for _ in it)
    assert steps == tokens - 1, "a row stopped early"
    return t1 - t0, time.perf_counter() - t1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--depths", default="4,8")
    ap.add_argument("--batch-sizes", default="1,8")
    ap.add_argument("--tokens", type=int, default=128, help="tokens generated per row")
    ap.add_argument("--prompt", type=int, default=32, help="prompt tokens")
    ap.add_argument("--bandwidth", type=float, default=0.0, help="GB/s for the bound (default: measured)")
    ap.add_argument("--plain-linear", action="store_true", help="every product through F.linear (plain BLAS)")
    ap.add_argument("--top-k", type=int, default=None)
    ap.add_argument("--modes", default="eager,compiled", help="eager and/or compiled decode steps")
    ap.add_argument("--repeats", type=int, default=2, help="best of this many runs")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads (0 = every core); on a busy machine 1 avoids OpenMP spin contention")
    args = ap.parse_args()
    set_threads(args.threads)
    torch.manual_seed(0)
    if args.plain_linear:
        Linear.forward = lambda self, x: torch.nn.functional.linear(x, self.weight)

    measured = read_bandwidth()
    args.bandwidth = args.bandwidth or measured / 1e9
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32 on CPU; "
          f"prompt {args.prompt} tokens, {args.tokens} generated per row, temperature 1"
          f"{f', top-k {args.top_k}' if args.top_k else ''}")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"load average at start: {load:.2f} (other work on the cores skews every number below)")
    print(f"measured read bandwidth (sum of 512 MiB): {measured / 1e9:.1f} GB/s; "
          f"bound uses {args.bandwidth:.1f} GB/s\n")
    print("| depth | params | weights read/step | step | batch | compile s | prefill ms | forward only tok/s "
          "| engine tok/s | ms/step | bound tok/s | of bound |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for depth, mode in ((int(d), m) for d in args.depths.split(",") for m in args.modes.split(",")):
        cfg = ModelConfig.from_depth(depth, vocab_size=32768, sequence_len=1024)
        torch.manual_seed(0)
        model = GPT(cfg).eval()
        engine = Engine(model, compile=mode == "compiled")
        wbytes = weight_bytes(model)
        prompt = torch.randint(0, cfg.vocab_size, (args.prompt,)).tolist()
        for batch in (int(b) for b in args.batch_sizes.split(",")):
            t0 = time.perf_counter()
            engine_decode(engine, prompt, batch, 3, args.top_k)  # warms up; compiles this batch size's graph
            first = time.perf_counter() - t0
            fwd = min(forward_only(engine, prompt, batch, args.tokens) for _ in range(args.repeats))
            runs = [engine_decode(engine, prompt, batch, args.tokens, args.top_k) for _ in range(args.repeats)]
            prefill = min(r[0] for r in runs)
            dec = min(r[1] for r in runs)
            n = args.tokens - 1
            tps, fwd_tps = batch * n / dec, batch * n / fwd
            bound = batch / (wbytes / (args.bandwidth * 1e9))
            print(f"| {depth} | {model.num_params() / 1e6:.1f}M | {wbytes / 1e6:.0f} MB | {mode} | {batch} "
                  f"| {first:.1f} | {prefill * 1e3:.0f} | {fwd_tps:,.0f} | {tps:,.0f} | {dec / n * 1e3:.2f} "
                  f"| {bound:,.0f} | {tps / bound:.0%} |", flush=True)


if __name__ == "__main__":
    main()
