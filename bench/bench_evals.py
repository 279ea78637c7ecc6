"""How long each full eval takes on this machine: run every eval on its first --limit examples,
time it, and scale to the task's full size. Prints a table.

    python bench/bench_evals.py --base runs/speedrun/base --chat runs/speedrun/sft --data ../shared/data

CORE runs on --base (a base model), the chat evals on --chat. A full run of everything at depth 4
takes hours on 2 CPU cores; --limit 0 runs the full evals instead of scaling.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from picochat.common import format_duration
from picochat.data.datasets import LOCATIONS
from picochat.evals.chat_eval import build_eval_task, evaluate_task
from picochat.evals.core import evaluate_core, load_tasks, resolve_bundle
from picochat.inference import LoadOptions, open_for_inference
from picochat.tasks.registry import EVALS


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", help="base run dir, for CORE")
    ap.add_argument("--chat", help="chat run dir, for the chat evals")
    ap.add_argument("--data", required=True, help="directory laid out like ../shared/data")
    ap.add_argument("--limit", type=int, default=50, help="examples per task (0: all)")
    ap.add_argument("--generative-limit", type=int, default=16, help="examples per generative task (0: all)")
    args = ap.parse_args()
    rows = []
    device = dtype = None

    if args.base:
        run = open_for_inference(LoadOptions(args.base))
        device, dtype = run.device, run.dtype
        bundle = resolve_bundle(args.data)
        sizes = {t["label"]: sum(1 for _ in open(t["path"])) for t in load_tasks(bundle) if t["path"].is_file()}
        result = evaluate_core(run.model, run.tokenizer, bundle, device, dtype, limit=args.limit or None)
        for label, r in result["tasks"].items():
            rows.append((f"core/{label}", r["n"], r["seconds"], sizes[label]))

    if args.chat:
        run = open_for_inference(LoadOptions(args.chat))
        device, dtype = run.device, run.dtype
        for name, spec in EVALS.items():
            if spec.dataset and not (Path(args.data) / LOCATIONS[spec.dataset]).exists():
                continue
            task = build_eval_task(name, args.data)
            limit = args.limit if spec.eval.kind == "categorical" else args.generative_limit
            t0 = time.perf_counter()
            r = evaluate_task(run, name, task, limit=limit or None, save=False)
            rows.append((name, r["n"], time.perf_counter() - t0, len(task)))

    print(f"\ndevice {device}, dtype {dtype}; base {args.base}, chat {args.chat}\n")
    print("| eval | examples run | seconds | examples/s | full size | full eval (scaled) |")
    print("|---|---:|---:|---:|---:|---:|")
    totals = {"core": 0.0, "chat": 0.0}
    for name, n, sec, full in rows:
        est = sec / max(n, 1) * full
        totals["core" if name.startswith("core/") else "chat"] += est
        print(f"| {name} | {n} | {sec:.1f} | {n / sec:.2f} | {full} | {format_duration(est)} |")
    for k, v in totals.items():
        if v:
            print(f"| **all of {k}** | | | | | **{format_duration(v)}** |")


if __name__ == "__main__":
    main()
