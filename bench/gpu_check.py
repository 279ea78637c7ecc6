"""The GPU check: picochat's CUDA paths measured on one GPU, in one table (bench/gpu_check.sh runs
it after the CUDA tests; at most about 8 minutes on an H100).

    python bench/gpu_check.py                # on a CUDA GPU
    python bench/gpu_check.py --quick       # smaller shapes and fewer steps

Rows:
- training at d20's shape (32 x 2,048 rows): tokens/s and MFU of the real step (Trainer.train_step:
  forward, backward, Muon + AdamW) in bf16, compiled, with PyTorch's SDPA, with flash-attn where it
  is installed, and in FP8 where the GPU has it; at gpt2's (d24, 16 x 2,048) the fastest of those;
  the peak memory torch's allocator saw beside picochat's estimate (memory.py);
- decoding at d20's shape: Engine.generate's tokens/s at batch 1 and 32, eager and compiled;
- the speedrun's plan for `gpt2` on 8 such GPUs: its time estimate, from a step timed here.

It fails, with one line, where there is no CUDA: nothing here means anything on a CPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from picochat import attention as attention_module  # noqa: E402
from picochat.common import format_duration  # noqa: E402
from picochat.decode_batch import GenRequest  # noqa: E402
from picochat.engine import Engine  # noqa: E402
from picochat.fp8 import fp8_problem  # noqa: E402
from picochat.memory import GiB, estimate_training_memory  # noqa: E402
from picochat.model import GPT  # noqa: E402
from picochat.plan import make_plan  # noqa: E402
from picochat.presets import PRESETS  # noqa: E402
from picochat.train.measure import time_training_step  # noqa: E402

ROWS: list[tuple[str, str]] = []


def row(check: str, result: str) -> None:
    ROWS.append((check, result))
    print(f"| {check} | {result} |", flush=True)


def train_rows(preset: str, rows: int, steps: int, device: torch.device, every_variant: bool = True) -> None:
    """Each variant compiles its own graph (a minute or more at these sizes): every_variant=False
    times only the fastest the GPU has."""
    config = PRESETS[preset].model_config()
    flash = attention_module.FLASH_ATTN
    variants = [("SDPA", False, False)]
    if flash is not None:
        variants.append(("flash-attn", True, False))
    if fp8_problem(device) is None:
        variants.append(("flash-attn + FP8" if flash is not None else "FP8", flash is not None, True))
    est = estimate_training_memory(config, rows, config.sequence_len, torch.bfloat16, device_type="cuda", compiled=True)
    for name, use_flash, fp8 in variants if every_variant else variants[-1:]:
        attention_module.FLASH_ATTN = flash if use_flash else None
        torch.cuda.reset_peak_memory_stats(device)
        try:
            t, _ = time_training_step(config, rows, device, torch.bfloat16, steps=steps, warmup=1, compile=True,
                                      fp8=fp8)
        except torch.OutOfMemoryError:
            row(f"train {preset} {rows} x {config.sequence_len:,}, bf16 compiled, {name}",
                f"OUT OF MEMORY (estimate {est.total / GiB:.1f} GiB)")
            gc.collect()
            torch.cuda.empty_cache()
            continue
        finally:
            attention_module.FLASH_ATTN = flash
        peak = torch.cuda.max_memory_allocated(device)
        tokens = rows * config.sequence_len
        row(f"train {preset} {rows} x {config.sequence_len:,}, bf16 compiled, {name}",
            f"{tokens / t.step_seconds:,.0f} tok/s, MFU {100 * t.mfu:.1f}%, compile {t.warmup_seconds:.0f} s; "
            f"peak {peak / GiB:.1f} GiB, estimate {est.total / GiB:.1f} GiB ({est.total / peak:.2f}x)")


def decode_rows(preset: str, batches: list[int], tokens: int, device: torch.device) -> None:
    config = PRESETS[preset].model_config()
    torch.manual_seed(0)
    with torch.device(device):
        model = GPT(config).eval()
    prompt = torch.randint(0, config.vocab_size, (32,)).tolist()
    for compile in (False, True):
        engine = Engine(model, compile=compile)
        for batch in batches:
            request = GenRequest(prompt, batch, tokens, temperature=1.0, seed=0)
            t0 = time.perf_counter()
            sum(1 for _ in engine.generate([dataclasses.replace(request, max_tokens=4)]))  # compiles
            first = time.perf_counter() - t0
            t0 = time.perf_counter()
            steps = sum(1 for _ in engine.generate([request]))
            dt = time.perf_counter() - t0
            row(f"decode {preset}, batch {batch}, {'compiled' if compile else 'eager'}",
                f"{batch * steps / dt:,.0f} tok/s ({dt / steps * 1e3:.1f} ms a step; first call {first:.1f} s)")
    del model
    torch.cuda.empty_cache()


def plan_row(device: torch.device) -> None:
    plan = make_plan(PRESETS["gpt2"], Path("/nonexistent"), device, torch.bfloat16, world=8, measure_steps=1)
    pretrain = next(s for s in plan.stages if s.name == "pretrain")
    total = sum(s.seconds or 0 for s in plan.stages)
    row("speedrun plan: gpt2 on 8 of these GPUs",
        f"pretraining ~{format_duration(pretrain.seconds or 0)}, every stage ~{format_duration(total)} "
        f"({plan.timing})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="d20's shape at 8 rows, 2 steps, decode batch 1 and 8")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("error: gpu_check needs a CUDA GPU, and torch sees none (torch.cuda.is_available() is False)",
              file=sys.stderr)
        sys.exit(1)
    device = torch.device("cuda")
    name = torch.cuda.get_device_name(device)
    major, minor = torch.cuda.get_device_capability(device)
    print(f"{name} (compute capability {major}.{minor}), torch {torch.__version__}, flash-attn "
          f"{'yes' if attention_module.FLASH_ATTN else 'no'}, FP8 {fp8_problem(device) or 'yes'}\n")
    print("| check | result |\n|---|---|")
    steps = 2 if args.quick else 3
    train_rows("d20", 8 if args.quick else 32, steps, device)
    if not args.quick:
        train_rows("gpt2", 16, steps, device, every_variant=False)
    decode_rows("d20", [1, 8] if args.quick else [1, 32], 64, device)
    plan_row(device)


if __name__ == "__main__":
    main()
