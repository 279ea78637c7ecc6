"""What a new user typed wrong: each gets one `error:` line and exit 2 (or a warning where the input
is usable), and nothing on disk is lost or left half-made."""

import json
import shutil

from .conftest import run_cli


def _error(result) -> str:
    assert result.returncode == 2, (result.stdout, result.stderr[-2000:])
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.stderr, result.stderr
    return lines[0]


def _pretrain(corpus, tok, save, *extra):
    return run_cli("pretrain", "--data", str(corpus), "--tokenizer", str(tok), "--depth", "2", "--seq-len", "64",
                   "--batch-size", "4", "--device", "cpu", "--save", str(save), *extra)


def test_negative_and_zero_steps(small_corpus, small_tokenizer, tiny_base, tmp_path):
    assert _error(_pretrain(small_corpus, small_tokenizer, tmp_path / "a", "--steps", "-5")) == \
        "error: --steps must be at least 0, not -5"
    assert _error(run_cli("sft", "--load", str(tiny_base), "--data", "arithmetic::1", "--save", str(tmp_path / "b"),
                          "--steps", "-1")) == "error: --steps must be at least 0, not -1"
    assert "--steps must be at least 1, not 0" in _error(run_cli(
        "rl", "--load", str(tiny_base), "--task", "arithmetic::1", "--save", str(tmp_path / "c"), "--steps", "0"))
    assert not any(tmp_path.iterdir())  # nothing written


def test_a_resume_that_contradicts_the_run_is_refused_and_more_steps_extend_it(small_corpus, small_tokenizer,
                                                                              tmp_path):
    run = tmp_path / "run"
    assert _pretrain(small_corpus, small_tokenizer, run, "--steps", "12").returncode == 0
    before = (run / "model.safetensors").read_bytes()
    err = _error(run_cli("pretrain", "--data", str(small_corpus), "--depth", "4", "--steps", "14", "--save", str(run),
                         "--resume", "--device", "cpu"))
    assert err == (f"error: --resume: {run} was trained with other settings: --depth 4, but the run has 2. Leave "
                   "them out to resume it as it was, or start a new run (another --save, or --overwrite)")
    assert (run / "model.safetensors").read_bytes() == before
    err = _error(run_cli("pretrain", "--data", str(small_corpus), "--steps", "8", "--save", str(run), "--resume",
                         "--device", "cpu"))
    assert "--steps 8, but the run is already at step 12" in err
    r = run_cli("pretrain", "--data", str(small_corpus), "--steps", "14", "--save", str(run), "--resume",
                "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert f"resuming {run} at step 12; training on to step 14 (the run was planned for 12)" in r.stdout
    assert json.loads(r.stdout.strip().splitlines()[-1])["steps"] == 14


def test_a_torn_metrics_line_is_tolerated_and_real_corruption_refused(tiny_base, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_base, run)
    metrics = run / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + '{"step": 6, "lo')  # killed while appending
    r = run_cli("sample", "--load", str(run), "--prompt", "To", "--max-tokens", "4", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert "its last line is incomplete" in r.stdout + r.stderr
    lines = metrics.read_text().splitlines()
    metrics.write_text("\n".join(["garbage"] + lines[1:]) + "\n")
    err = _error(run_cli("sample", "--load", str(run), "--device", "cpu"))
    assert err.startswith(f"error: corrupt run dir {run}: metrics.jsonl line 1 is not a JSON object")


def test_a_config_of_the_wrong_types_names_the_field(tiny_base, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_base, run)
    meta = json.loads((run / "config.json").read_text())
    meta["model"]["n_layer"] = "two"
    (run / "config.json").write_text(json.dumps(meta))
    assert _error(run_cli("sample", "--load", str(run), "--device", "cpu")) == \
        f"error: corrupt run dir {run}: config.json: model config key 'n_layer' must be an integer, not \"two\""


def test_a_file_given_as_a_run_dir(small_tokenizer):
    assert "is a file, not a run dir" in _error(run_cli("sample", "--load", str(small_tokenizer)))


def test_binary_garbage_as_text_is_warned_about(tmp_path):
    junk = tmp_path / "junk.txt"
    junk.write_bytes(bytes(range(256)) * 400)
    r = run_cli("tokenizer", "train", "--data", str(junk), "--vocab-size", "300", "--save", str(tmp_path / "t.json"))
    assert f"warning: {junk} does not look like text" in r.stdout + r.stderr


def test_one_long_line_fails_clearly_and_leaves_no_token_cache(small_tokenizer, tmp_path):
    line = tmp_path / "line.txt"
    line.write_text("the cat sat on the mat " * 20000 + "\n")
    save = tmp_path / "run"
    err = _error(_pretrain(line, small_tokenizer, save, "--steps", "2"))
    assert "only 1 document(s)" in err and "blank lines" in err and "txt_split" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["line.txt"]  # no run dir, no run.cache


def test_inputs_are_checked_before_anything_is_announced(small_corpus, tmp_path):
    r = run_cli("pretrain", "--data", str(tmp_path / "missing"), "--save", str(tmp_path / "run"), "--device", "cpu")
    assert _error(r) == f"error: data path not found: {tmp_path / 'missing'}" and r.stdout == ""
