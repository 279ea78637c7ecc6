"""The report card: what a pipeline run achieved, in one markdown file a reader takes in at a glance.

It is assembled from what the stages and evals left in their run dirs (config.json, metrics.jsonl,
evals/*.json), so `picochat report` can be run any time after them, on any machine. Plots are PNG
files next to report.md, embedded by relative links.
"""

from __future__ import annotations

import json
import platform
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import __version__
from .common import PicochatError, format_duration, log, write_atomic
from .config import ModelConfig
from .evals.results import load_evals
from .model import num_params
from .run_dir import read_metrics
from .settings import setting
from .tasks.registry import CHATCORE, EVALS, NANOCHAT_CHATCORE, TASKS

STAGE_ORDER = ["base", "mid", "sft", "rl"]
CHAT_ROWS = [(name, TASKS[name].label) for name in EVALS]


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


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


@dataclass
class StageRecord:
    """One run dir as the report sees it: no weights are loaded."""
    path: Path
    meta: dict
    metrics: list[dict]
    evals: dict[str, dict] = field(default_factory=dict)

    @property
    def stage(self) -> str:
        return self.meta.get("stage", "?")

    @property
    def seconds(self) -> float:
        return max((m.get("elapsed", 0.0) for m in self.metrics), default=0.0)

    @classmethod
    def read(cls, path: str | Path) -> StageRecord:
        path = Path(path)
        try:
            meta = json.loads((path / "config.json").read_text())
        except FileNotFoundError:
            raise PicochatError(f"report: {path} is not a run dir (no config.json)") from None
        except (OSError, ValueError) as e:
            raise PicochatError(f"report: cannot read {path / 'config.json'}: {e}") from None
        return cls(path, meta, read_metrics(path), load_evals(path))


def guess_price() -> tuple[float, str]:
    """US$ per hour of this machine at typical 2026 cloud rental prices (a rough guess; the report
    says it is one, and --usd-per-hour replaces it)."""
    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        return 2.5 * n, f"{n} × {torch.cuda.get_device_name()} at a guessed $2.50 per GPU-hour"
    if torch.backends.mps.is_available():
        return 0.0, "your own Mac"
    threads = torch.get_num_threads()
    return 0.025 * threads, f"{threads} CPU threads at a guessed $0.025 per vCPU-hour"


def _median(values: list[float]) -> float:
    values = sorted(values)
    return values[len(values) // 2] if values else 0.0


def plot_curves(stages: list[StageRecord], out_dir: Path, prefix: str) -> list[str]:
    """<prefix>-loss.png (training loss of every stage, end to end) and <prefix>-bpb.png
    (validation bpb): the file names written, relative to out_dir."""
    import matplotlib
    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt
    written = []
    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=110)
    offset = 0
    for s in stages:
        pts = [(offset + m["step"], m["loss"]) for m in s.metrics if "loss" in m]
        if pts:
            ax.plot(*zip(*pts), label=s.stage, linewidth=1.2)
            offset = pts[-1][0]
    if offset:
        ax.set(xlabel="optimizer step (stages end to end)", ylabel="training loss (nats/token)",
               title="Training loss")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out_dir / f"{prefix}-loss.png")
        written.append(f"{prefix}-loss.png")
    plt.close(fig)
    curves = [(s.stage, [(m["step"], m["val_bpb"]) for m in s.metrics if "val_bpb" in m]) for s in stages]
    curves = [(stage, pts) for stage, pts in curves if pts]
    if curves:
        fig, ax = plt.subplots(figsize=(7, 3.6), dpi=110)
        for stage, pts in curves:
            ax.plot(*zip(*pts), marker="o", markersize=3, label=stage)
        ax.set(xlabel="step", ylabel="validation bits per byte", title="Validation bpb")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out_dir / f"{prefix}-bpb.png")
        plt.close(fig)
        written.append(f"{prefix}-bpb.png")
    return written


def _pct(r: dict | None) -> str:
    if r is None:
        return "—"
    k = f" (pass@{r['num_samples']})" if r.get("num_samples", 1) > 1 else ""
    n = f" of {r['n']:,}" if "n" in r else ""
    return f"{100 * r['accuracy']:.1f}%{n}{k}"


def eval_table(stages: list[StageRecord]) -> str | None:
    """nanochat's summary table: a row per metric, a column per stage; CORE is the base model's,
    ChatCORE the chat stages'. Each cell says on how many examples it was measured; tasks nobody
    evaluated are named, not silently left out."""
    from .evals.chat_eval import chatcore
    cols = [s for s in stages if "core" in s.evals or any(name in s.evals for name, _ in CHAT_ROWS)]
    if not cols:
        return None
    rows = []
    if any("core" in s.evals for s in cols):
        rows.append(["CORE"] + [f"{s.evals['core']['core']:.4f}" if "core" in s.evals else "—" for s in cols])
    rows += [[label] + [_pct(s.evals.get(name)) for s in cols] for name, label in CHAT_ROWS
             if any(name in s.evals for s in cols)]
    cc = [chatcore(s.evals) if any(name in s.evals for name, _ in CHAT_ROWS) else None for s in cols]
    nano = [chatcore(s.evals, NANOCHAT_CHATCORE) for s in cols]

    def cell(c, bold=""):
        if not c or c["chatcore"] is None:
            return "—"
        return f"{bold}{c['chatcore']:.4f}{bold}" + (f" ({len(c['tasks'])} tasks)" if c["missing"] else "")

    if any(c and c["chatcore"] is not None for c in cc):
        rows.append(["**ChatCORE**"] + [cell(c, "**") for c in cc])
        if any(c["chatcore"] is not None for c in nano):
            rows.append(["ChatCORE, nanochat's 5"] + [cell(c) for c in nano])
    text = table(["metric"] + [s.stage.upper() for s in cols], rows)
    labels = ", ".join(TASKS[t].label for t in CHATCORE)
    text += (f"\n\nChatCORE is the mean centered accuracy, (acc - chance) / (1 - chance), of {labels}: "
             "nanochat's five tasks and spelling, which the models here are trained on; the row below it "
             "leaves spelling out, as nanochat's does. Percentages are of the n examples shown.")
    missing = sorted({m for c in cc if c for m in c["missing"]})
    if missing:
        said = "ChatCORE averages those that were." if any(c and c["chatcore"] is not None for c in cc) else \
            "ChatCORE needs at least one of them."
        text += f"\n\nNot evaluated (no data given): {', '.join(missing)}. {said}"
    return text


def headline(stages: list[StageRecord], cost: float) -> str:
    base = next((s for s in stages if s.stage == "base"), stages[0])
    model = base.meta.get("model", {})
    params = num_params(ModelConfig.from_dict(model)) if model else None
    bits = [f"depth {model.get('n_layer', '?')}, width {model.get('n_embd', '?')}, context "
            f"{model.get('sequence_len', '?')}, vocab {model.get('vocab_size', '?'):,}"
            + (f" ({params / 1e6:.1f}M parameters)" if params else "")]
    bpb = base.evals.get("bpb", {}).get("bpb") or next((m["val_bpb"] for m in reversed(base.metrics)
                                                        if "val_bpb" in m), None)
    if bpb is not None:
        bits.append(f"base validation **{bpb:.4f} bits/byte**")
    if "core" in base.evals:
        bits.append(f"**CORE {base.evals['core']['core']:.4f}**")
    from .evals.chat_eval import chatcore
    for s in stages:
        c = chatcore(s.evals)
        if s.stage != "base" and c["chatcore"] is not None:
            bits.append(f"{s.stage.upper()} ChatCORE {c['chatcore']:.4f}")
    arith = [(s.stage.upper(), s.evals["arithmetic"]["accuracy"]) for s in stages if "arithmetic" in s.evals]
    if arith:
        bits.append("arithmetic with the calculator " + " → ".join(f"{a:.0%} ({st})" for st, a in arith))
    total = sum(s.seconds for s in stages)
    bits.append(f"{format_duration(total)} of training" + (f", about ${cost:.2f}" if cost else ""))
    return "; ".join(bits) + "."


def report_card(runs: list[str | Path], save: str | Path, title: str = "picochat report card",
                usd_per_hour: float | None = None, extra: dict[str, str] | None = None, timings: dict | None = None) -> Path:
    """Write report.md (and its plots) for the run dirs of one pipeline: base, mid, sft, rl."""
    from .tokenizer import Tokenizer, eval_tokenizer, format_eval_table
    if not runs:
        raise PicochatError("report: give at least one run dir with --load")
    stages = sorted((StageRecord.read(r) for r in runs),
                    key=lambda s: STAGE_ORDER.index(s.stage) if s.stage in STAGE_ORDER else len(STAGE_ORDER))
    save = Path(save)
    save.parent.mkdir(parents=True, exist_ok=True)
    price_note = f"${usd_per_hour:.2f} per hour (--usd-per-hour)" if usd_per_hour is not None else None
    if usd_per_hour is None:
        usd_per_hour, price_note = guess_price()
    total_cost = sum(s.seconds for s in stages) / 3600 * usd_per_hour
    parts = [f"# {title}", headline(stages, total_cost)]

    rows = []
    for s in stages:
        m = s.metrics[len(s.metrics) // 10:]  # past the warm-up steps
        cost = f"${s.seconds / 3600 * usd_per_hour:.3f}" if usd_per_hour else "—"
        rows.append([s.stage, f"`{s.path}`", s.meta.get("step", "?"), f"{sum(x.get('tokens', 0) for x in s.metrics):,}",
                     next((x["loss"] for x in reversed(s.metrics) if "loss" in x), "—"),
                     f"{_median([x['tok_per_s'] for x in m if 'tok_per_s' in x]):,.0f}",
                     f"{100 * _median([x['mfu'] for x in m if 'mfu' in x]):.1f}%", format_duration(s.seconds), cost])
    parts.append("## Stages\n" + table(["stage", "run dir", "steps", "tokens", "final loss", "median tok/s",
                                        "median MFU", "train time", "cost"], rows)
                 + f"\n\nCost: training time × {price_note}.")
    if timings:
        parts.append("## Wall time per step of the pipeline\n" + table(
            ["step", "time"], [[k, format_duration(v)] for k, v in timings.items()]
            + [["**total**", f"**{format_duration(sum(timings.values()))}**"]]))

    plots = plot_curves(stages, save.parent, save.stem)
    if plots:
        parts.append("## Curves\n" + "\n".join(f"![{p[:-4]}]({p})" for p in plots))

    base = next((s for s in stages if s.stage == "base"), None)
    if base is not None:
        lines = []
        evals = [m for m in base.metrics if "val_bpb" in m]
        if evals:
            lines.append(table(["step", "train loss", "validation bpb"],
                               [[m["step"], m.get("loss", ""), m["val_bpb"]] for m in evals]))
        if "bpb" in base.evals:
            b = base.evals["bpb"]
            lines.append(f"`picochat eval bpb` on {b.get('data', 'held-out text')}: **{b['bpb']:.4f}** bits per byte.")
        if "core" in base.evals:
            from .evals.core import format_core_table
            lines.append(format_core_table(base.evals["core"]))
        if lines:
            parts.append("## Base model\n" + "\n\n".join(lines))

    evals = eval_table(stages)
    if evals:
        parts.append("## Evals\n" + evals)
    tok_file = stages[0].path / "tokenizer.json"
    if tok_file.exists():
        parts.append("## Tokenizer\n" + format_eval_table(eval_tokenizer(Tokenizer.load(tok_file))))
    for heading, body in (extra or {}).items():
        parts.append(f"## {heading}\n{body}")
    parts.append("## System\n" + table(["", ""], [[k, v] for k, v in system_info().items()]))
    write_atomic(save, "\n\n".join(parts) + "\n")
    log(f"report: wrote {save}" + (f" and {', '.join(plots)}" if plots else ""))
    return save


@dataclass
class ReportConfig:
    load: list[str] = setting(help="run dirs: base, mid, sft, rl (any subset)")
    save: str = setting("report.md", "the markdown file to write (plots go next to it)")
    title: str = setting("picochat report card", "the report's title")
    usd_per_hour: float | None = setting(None, "the machine's price, for the cost column (default: a guess for the "
                                               "training device)", low=0)


def report(cfg: ReportConfig) -> Path:
    """`picochat report`."""
    return report_card(cfg.load, cfg.save, title=cfg.title, usd_per_hour=cfg.usd_per_hour)
