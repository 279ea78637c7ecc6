import json
import re

from .conftest import run_cli


def test_offline_speedrun_smoke_preset_runs_the_whole_pipeline(tmp_path):
    """`picochat speedrun` with no data: builtin corpus -> tokenizer -> base -> mid -> sft -> rl -> report."""
    out = tmp_path / "speedrun"
    r = run_cli("speedrun", "--preset", "smoke", "--save", str(out), "--device", "cpu", cwd=tmp_path, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert sorted(p.name for p in (out / "corpus").glob("*.txt"))  # the corpus is there to read
    for stage in ("base", "mid", "sft", "rl"):
        assert json.loads((out / stage / "config.json").read_text())["stage"] == stage
    report = (out / "report.md").read_text()
    bpb = float(re.search(r"base validation \*\*([0-9.]+) bits/byte\*\*", report).group(1))
    assert 0.5 < bpb < 8
    arith = {s: json.loads((out / s / "evals" / "arithmetic.json").read_text()) for s in ("mid", "sft", "rl")}
    assert all(a["n"] == 100 and 0 <= a["accuracy"] <= 1 for a in arith.values())
    assert (f"arithmetic with the calculator {arith['mid']['accuracy']:.0%} (MID) → {arith['sft']['accuracy']:.0%} (SFT)"
            f" → {arith['rl']['accuracy']:.0%} (RL)") in report
    assert re.search(r"^\| metric \|.*\| SFT \| RL \|$", report, re.M)  # the eval table has its RL column
    for section in ("## Stages", "## Curves", "## Base model", "## Evals", "## Tokenizer", "## Samples",
                    "## Chat answers", "## System"):
        assert section in report
    assert (out / "report-loss.png").read_bytes().startswith(b"\x89PNG")
    assert "![report-loss](report-loss.png)" in report
    # a second run into the same directory refuses, with one error line
    again = run_cli("speedrun", "--preset", "smoke", "--save", str(out), "--device", "cpu", cwd=tmp_path)
    assert again.returncode == 2 and again.stderr.strip().startswith("error:") and "already exists" in again.stderr
