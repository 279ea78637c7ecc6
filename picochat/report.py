"""Markdown reports: what a run achieved, readable at a glance."""

from __future__ import annotations

import platform
import subprocess
from pathlib import Path

import torch

from . import __version__
from .common import format_duration, write_atomic


def system_info() -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else (
        "Apple MPS" if torch.backends.mps.is_available() else "none")
    return {"picochat": __version__, "git commit": commit, "python": platform.python_version(),
            "torch": torch.__version__, "platform": platform.platform(), "cpu": cpu,
            "cpu threads": torch.get_num_threads(), "gpu": gpu}


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def speedrun_report(path: Path, preset: str, data: list[str], tok_path: Path, result: dict,
                    samples: dict[str, str], timings: dict[str, float], chat: dict | None = None) -> None:
    from .tokenizer import Tokenizer, eval_tokenizer, format_eval_table
    metrics = result["metrics"]
    last = metrics[-1]
    evals = [m for m in metrics if "val_bpb" in m]
    tok_s = [m["tok_per_s"] for m in metrics[len(metrics) // 10:]] or [0]
    mfu = [m["mfu"] for m in metrics[len(metrics) // 10:]] or [0]
    data_bytes = sum(f.stat().st_size for p in data for f in ([Path(p)] if Path(p).is_file() else Path(p).rglob("*"))
                     if f.is_file())
    parts = [
        f"# picochat speedrun — preset `{preset}`",
        f"**Validation bits per byte: {result['val_bpb']:.4f}** after {result['steps']} steps "
        f"({result['params'] / 1e6:.1f}M parameters, {format_duration(sum(timings.values()))} in all).",
        "## Stages\n" + _table(["stage", "time"], [[k, format_duration(v)] for k, v in timings.items()]),
        "## Data\n" + f"{len(data)} source(s), {data_bytes / 1e6:.1f} MB: " + ", ".join(f"`{p}`" for p in data),
        "## Tokenizer\n" + format_eval_table(eval_tokenizer(Tokenizer.load(tok_path))),
        "## Training\n" + _table(
            ["steps", "tokens", "final loss", "median tok/s", "median MFU", "train time"],
            [[result["steps"], f"{sum(m['tokens'] for m in metrics):,}", last.get("loss"),
              f"{sorted(tok_s)[len(tok_s) // 2]:,.0f}", f"{100 * sorted(mfu)[len(mfu) // 2]:.1f}%",
              format_duration(result["train_seconds"])]]),
        "## Validation bpb\n" + _table(["step", "loss", "val bpb"],
                                        [[m["step"], m.get("loss", ""), m["val_bpb"]] for m in evals]),
        "## Samples (greedy)\n" + "\n".join(f"- `{p}` → {s[len(p):]!r}" for p, s in samples.items()),
    ]
    if chat:
        parts[1] += (f" Held-out arithmetic with the calculator: **{chat['mid']['accuracy']:.0%} before SFT, "
                     f"{chat['sft']['accuracy']:.0%} after**.")
        parts.append("## Chat (midtraining, then SFT)\n" + _table(
            ["stage", "arithmetic accuracy (held out, tools on)"] + [f"`{p}`" for p in chat["sft"]["answers"]],
            [[stage, f"{c['accuracy']:.1%}"] + [repr(a) for a in c["answers"].values()] for stage, c in chat.items()]))
    parts.append("## System\n" + _table(["", ""], [[k, v] for k, v in system_info().items()]))
    write_atomic(path, "\n\n".join(parts) + "\n")
