import json
import re

from .conftest import run_cli


def test_offline_speedrun_smoke_preset_runs_the_whole_pipeline(tmp_path):
    """`picochat speedrun` with no data: builtin corpus -> tokenizer -> base -> mid -> sft -> report."""
    out = tmp_path / "speedrun"
    r = run_cli("speedrun", "--preset", "smoke", "--save", str(out), "--device", "cpu", cwd=tmp_path, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert sorted(p.name for p in (out / "corpus").glob("*.txt"))  # the corpus is there to read
    for stage in ("base", "mid", "sft"):
        assert json.loads((out / stage / "config.json").read_text())["stage"] == stage
    report = (out / "report.md").read_text()
    bpb = float(re.search(r"Validation bits per byte: ([0-9.]+)", report).group(1))
    assert 0.5 < bpb < 8
    assert re.search(r"arithmetic with the calculator: \*\*\d+% before SFT, \d+% after\*\*", report)
    for section in ("## Tokenizer", "## Validation bpb", "## Samples", "## Chat", "## System"):
        assert section in report
    # a second run into the same directory refuses, with one error line
    again = run_cli("speedrun", "--preset", "smoke", "--save", str(out), "--device", "cpu", cwd=tmp_path)
    assert again.returncode == 2 and again.stderr.strip().startswith("error:") and "already exists" in again.stderr
