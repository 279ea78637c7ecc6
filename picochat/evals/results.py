"""Eval results in a run dir: <run>/evals/<name>.json (the summary) and <name>.jsonl (a row per
example). The report card reads them back."""

from __future__ import annotations

import json
from pathlib import Path

from ..common import log, write_atomic
from ..run_dir import RunDir

EVALS = "evals"


def eval_name(run: RunDir, name: str) -> str:
    """The name an eval's results go under: a model quantized at load time (--int8) files them
    apart, so that they never stand for the float model's."""
    return f"{name}.int8" if run.meta.get("quantized_on_load") else name


def save_eval(run_dir: str | Path, name: str, summary: dict, rows: list[dict] | None = None) -> Path:
    """Write an eval's summary (and per-example rows) into <run>/evals/, atomically. A result over
    fewer examples than the one already there does not replace it: it is kept next to it, as
    <name>.n<examples>.json, and said."""
    out = Path(run_dir) / EVALS
    out.mkdir(exist_ok=True)
    stem = name
    n = summary.get("n")
    old = out / f"{name}.json"
    if n is not None and old.is_file():
        try:
            before = json.loads(old.read_text()).get("n")
        except (OSError, ValueError, AttributeError):
            before = None
        if isinstance(before, int) and before > n:
            stem = f"{name}.n{n}"
            log(f"{name}: kept the result on {before:,} examples in {old}; this one, on {n:,}, is {out / stem}.json")
    if rows is not None:
        write_atomic(out / f"{stem}.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    write_atomic(out / f"{stem}.json", json.dumps(summary, indent=1) + "\n")
    return out / f"{stem}.json"


def load_evals(run_dir: str | Path) -> dict[str, dict]:
    """Every eval summary of a run dir, by name (those kept aside on fewer examples excluded)."""
    out = {}
    for f in sorted((Path(run_dir) / EVALS).glob("*.json")):
        if ".n" in f.stem and f.stem.rsplit(".n", 1)[1].isdigit():
            continue
        try:
            out[f.stem] = json.loads(f.read_text())
        except (OSError, ValueError) as e:
            log(f"warning: {f} is unreadable ({e}); left out")
    return out
