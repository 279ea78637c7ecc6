"""INT8 weight-only quantization: size on disk, batch-1 decode speed and bpb, fp32 vs int8, on CPU.

    python bench/bench_quant.py                         # kernels, depths 4 and 8, a depth-4 model trained here
    python bench/bench_quant.py --load runs/speedrun/sft  # also (or with --no-train: only) real run dirs
    python bench/bench_quant.py --skip-kernels --threads 1

Three parts:
1. kernels: one linear layer, the candidates for Int8Linear.forward at 1, 8 and 64 rows (the
   numbers behind the choice documented in picochat/quant.py).
2. speed and size at depths 4 and 8 with random weights (vocab 32768, context 1024, like
   bench/bench_decode.py): speed does not depend on the weights, bpb does, so no bpb there.
3. bpb: a model trained briefly here (depth 4, vocab 8192, 150 steps of 8 x 256 tokens on Gutenberg; cached
   under --work, so a rerun skips the training) and any --load run dirs, each evaluated on
   held-out Gutenberg books it never saw, in fp32, int8 (linears), and int8 with the embedding too.
   The same rows repeat size and decode speed for those models.

Decode speed: "engine" is Engine.generate at batch 1 (temperature 1), "forward" the bare model
with a KV cache; best of --repeats runs, fp32 and int8 interleaved so that a burst of load from
other processes hits both alike. bf16 is not timed: without AVX512-BF16/AMX, PyTorch's bf16 matmul
on this CPU runs at ~0.3 GFLOP/s (the int8 kernel's bf16 activations use its own vectorized loop).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))
from bench_decode import engine_decode, forward_only
from safetensors.torch import save_file

from picochat.common import cpu_has_fast_bf16, set_threads
from picochat.config import ModelConfig
from picochat.engine import Engine
from picochat.int8 import quantize_model
from picochat.model import GPT

GUTENBERG = Path(__file__).resolve().parents[2] / "shared" / "data" / "pretrain_text" / "gutenberg"
HELDOUT = ("11-0.txt", "35-0.txt", "36-0.txt")  # Alice, The Time Machine, The War of the Worlds


def _best(fns: dict, reps: int, rounds: int) -> dict:
    best = {k: float("inf") for k in fns}
    for f in fns.values():
        f()
    for _ in range(rounds):
        for k, f in fns.items():
            t0 = time.perf_counter()
            for _ in range(reps):
                f()
            best[k] = min(best[k], (time.perf_counter() - t0) / reps)
    return best


@torch.inference_mode()
def kernels() -> None:
    print("## kernels: one linear layer, microseconds per call (best of 10 rounds)\n")
    print("| weight (out x in) | rows | fp32 F.linear | dequantize + F.linear | int8pack_mm fp32 "
          "| int8pack_mm bf16 (chosen for <= 16 rows) |")
    print("|---|---|---|---|---|---|")
    for n, k in ((768, 768), (3072, 768), (32768, 384), (32768, 768)):
        w = torch.randn(n, k)
        s = w.abs().amax(1) / 127
        q = torch.round(w / s[:, None]).clamp(-127, 127).to(torch.int8)
        ones = torch.ones(n, dtype=torch.bfloat16)
        for m in (1, 8, 64):
            x = torch.randn(m, k)
            fns = {"fp32": lambda: F.linear(x, w), "deq": lambda: F.linear(x, q.float()) * s,
                   "i8f": lambda: torch._weight_int8pack_mm(x, q, s),
                   "i8b": lambda: torch._weight_int8pack_mm(x.to(torch.bfloat16), q, ones) * s}
            if m > 8 or n * k > 20_000_000:
                fns.pop("i8f")  # the scalar fallback: seconds per round, and never a contender
            t = _best(fns, reps=max(1, 16 // m), rounds=10)
            cell = lambda key: f"{t[key] * 1e6:,.0f}" if key in t else "—"
            print(f"| {n} x {k} | {m} | {cell('fp32')} | {cell('deq')} | {cell('i8f')} | {cell('i8b')} |", flush=True)
    print()


def file_mb(model) -> float:
    """Size of the model.safetensors save_run would write (fp32 floats, int8 stays int8)."""
    state = {k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype).contiguous()
             for k, v in model.state_dict().items()}
    with tempfile.TemporaryDirectory() as d:
        save_file(state, os.path.join(d, "m.safetensors"))
        return os.path.getsize(os.path.join(d, "m.safetensors")) / 1e6


def decode_speed(models: dict, prompt_len: int, tokens: int, repeats: int) -> dict:
    """{name: (engine tok/s, forward-only tok/s)} at batch 1, runs interleaved across models."""
    vocab = next(iter(models.values())).config.vocab_size
    prompt = torch.randint(0, vocab, (prompt_len,), generator=torch.Generator().manual_seed(0)).tolist()
    engines = {k: Engine(m) for k, m in models.items()}
    for e in engines.values():
        engine_decode(e, prompt, 1, 8, None)  # warm up
    eng = {k: float("inf") for k in models}
    fwd = dict(eng)
    for _ in range(repeats):
        for k in models:
            eng[k] = min(eng[k], engine_decode(engines[k], prompt, 1, tokens, None)[1])
            fwd[k] = min(fwd[k], forward_only(models[k], prompt, 1, tokens))
    n = tokens - 1
    return {k: (n / eng[k], n / fwd[k]) for k in models}


def variants(model, embeddings: bool = True) -> dict:
    out = {"fp32": model, "int8": quantize_model(copy.deepcopy(model))}
    if embeddings:
        out["int8+emb"] = quantize_model(copy.deepcopy(model), embeddings=True)
    return out


def speed_row(label: str, model, args) -> dict:
    ms = variants(model.eval())
    sizes = {k: file_mb(m) for k, m in ms.items()}
    speed = decode_speed({k: ms[k] for k in ("fp32", "int8")}, args.prompt, args.tokens, args.repeats)
    (e32, f32), (e8, f8) = speed["fp32"], speed["int8"]
    print(f"| {label} | {model.num_params() / 1e6:.1f}M | {sizes['fp32']:.1f} | {sizes['int8']:.1f} "
          f"({sizes['fp32'] / sizes['int8']:.1f}x) | {sizes['int8+emb']:.1f} ({sizes['fp32'] / sizes['int8+emb']:.1f}x) "
          f"| {e32:,.0f} | {e8:,.0f} | {e8 / e32:.2f}x | {f32:,.0f} | {f8:,.0f} | {f8 / f32:.2f}x |", flush=True)
    return ms


def train_small(work: Path, steps: int, depth: int) -> Path:
    """A briefly trained model (cached): tokenizer and pretraining on Gutenberg minus the held-out books."""
    from picochat.tokenizer import train_tokenizer
    from picochat.train.pretrain import PretrainConfig, pretrain
    from picochat.train.stage import Controls
    save = work / f"d{depth}-s{steps}"
    if (save / "model.safetensors").is_file():
        return save
    books = sorted(str(p) for p in GUTENBERG.glob("*.txt") if p.name not in HELDOUT)
    tok = work / "tokenizer-8192.json"
    if not tok.is_file():
        train_tokenizer(books, 8192, save=str(tok), max_chars=20_000_000)
    pretrain(PretrainConfig(data=books, save=str(save), tokenizer=str(tok), depth=depth, seq_len=256, batch_size=8,
                            steps=steps, cache_dir=str(work / "token-cache"),
                            controls=Controls(device="cpu", dtype="fp32", seed=0, log_every=max(1, steps // 10),
                                            overwrite=True)))
    return save


@torch.inference_mode()
def bpb_of(model, tokenizer, ds, max_tokens: int, seq_len: int) -> float:
    from picochat.evals.bpb import _Sequential, evaluate_bpb
    seq_len = min(seq_len, model.config.sequence_len)
    rows = _Sequential(ds.tokens, 8, seq_len)
    steps = min(rows.batches_left(), max(1, max_tokens // (8 * seq_len)))
    token_bytes = torch.tensor(tokenizer.token_byte_lengths(), dtype=torch.float32)
    return evaluate_bpb(model, rows, steps, token_bytes, torch.device("cpu"), torch.float32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--depths", default="4,8", help="random-weight speed/size rows (vocab 32768, context 1024)")
    ap.add_argument("--tokens", type=int, default=128, help="tokens generated per decode run")
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3, help="best of this many decode runs")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = every core)")
    ap.add_argument("--skip-kernels", action="store_true")
    ap.add_argument("--load", nargs="*", default=[], help="trained run dirs to add (bpb, size, speed)")
    ap.add_argument("--no-train", action="store_true", help="do not train the small bpb model here")
    ap.add_argument("--train-steps", type=int, default=150)
    ap.add_argument("--train-depth", type=int, default=4)
    ap.add_argument("--bpb-tokens", type=int, default=131072, help="held-out tokens per bpb evaluation")
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "picochat-bench-quant"),
                    help="where the trained model and token caches are kept between runs")
    args = ap.parse_args()
    set_threads(args.threads)
    torch.manual_seed(0)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}, load average at start {load:.2f} "
          "(other work on the cores skews every timing below)")
    if cpu_has_fast_bf16():
        print("bf16: this CPU has native bf16; not timed here (see bench/bench_decode.py)\n")
    else:
        print("bf16: not timed — no AVX512-BF16/AMX here, so PyTorch's bf16 matmul runs at ~0.3 GFLOP/s "
              "(minutes per run); fp32 and int8 only\n")
    if not args.skip_kernels:
        kernels()

    header = ("| model | params | fp32 MB | int8 MB | int8+emb MB | engine fp32 tok/s | engine int8 tok/s | speedup "
              "| forward fp32 tok/s | forward int8 tok/s | speedup |")
    print(f"## size on disk and batch-1 decode (prompt {args.prompt}, {args.tokens} tokens, best of {args.repeats})\n")
    print(header)
    print("|---" * (header.count("|") - 1) + "|")
    for depth in (int(d) for d in args.depths.split(",") if d):
        torch.manual_seed(0)
        model = GPT(ModelConfig.from_depth(depth, vocab_size=32768, sequence_len=1024))
        with torch.no_grad():  # init_weights zeroes the output projections: give them real values
            for b in model.blocks:
                for lin in (b.attn.c_proj, b.mlp.c_proj):
                    lin.weight.normal_(std=lin.in_features ** -0.5)
        speed_row(f"depth {depth}, random, vocab 32768", model, args)
        del model

    from picochat.run_dir import load_run
    runs = list(args.load)
    if not args.no_train:
        if not GUTENBERG.is_dir():
            print(f"\n(no {GUTENBERG}: skipping the trained model)")
        else:
            work = Path(args.work)
            work.mkdir(parents=True, exist_ok=True)
            t0 = time.perf_counter()
            runs.insert(0, str(train_small(work, args.train_steps, args.train_depth)))
            print(f"\n(trained model ready in {time.perf_counter() - t0:.0f} s: {runs[0]})")
    if not runs:
        return
    from picochat.data.loader import TokenDataset
    loaded = []
    for path in runs:
        run = load_run(path, "cpu")
        c = run.config
        label = f"{Path(path).name}: depth {c.n_layer}, vocab {c.vocab_size}, {run.meta.get('stage', '?')}"
        ds = TokenDataset.build([str(GUTENBERG / b) for b in HELDOUT], run.tokenizer)  # (logs: before the table)
        loaded.append((label, run, ds))
    print(f"\n## the trained models: size and batch-1 decode\n\n{header}\n" + "|---" * (header.count("|") - 1) + "|")
    for label, run, _ in loaded:
        speed_row(label, run.model, args)

    print(f"\n## bpb on held-out Gutenberg ({', '.join(HELDOUT)}; up to {args.bpb_tokens:,} tokens, seq 256)\n")
    print("| model | bpb fp32 | bpb int8 | delta | bpb int8+emb | delta |")
    print("|---|---|---|---|---|---|")
    for label, run, ds in loaded:
        ms = variants(run.model.eval())
        b = {k: bpb_of(m, run.tokenizer, ds, args.bpb_tokens, 256) for k, m in ms.items()}
        print(f"| {label} | {b['fp32']:.4f} | {b['int8']:.4f} | {b['int8'] - b['fp32']:+.4f} "
              f"| {b['int8+emb']:.4f} | {b['int8+emb'] - b['fp32']:+.4f} |", flush=True)


if __name__ == "__main__":
    main()
