import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from picochat.config import NANOCHAT_FEATURES, PICOCHAT_FEATURES, ModelFeatures
from picochat.optim import NANOCHAT_OPTIM, OptimConfig
from picochat.run_dir import load_run
from picochat.train.pretrain import PretrainConfig, pretrain

from .conftest import REPO, cpu_controls, run_cli

RUN_FIELDS = ("seed", "device", "dtype", "compile", "grad_checkpoint", "save_every", "save_every_minutes", "log_every",
              "stop_at", "resume", "overwrite")


def _cfg(corpus, tok, save, **kw) -> PretrainConfig:
    controls = {k: kw.pop(k) for k in list(kw) if k in RUN_FIELDS}
    base = dict(data=[str(corpus)], save=str(save), tokenizer=str(tok), depth=2, seq_len=64, batch_size=4,
                total_batch_tokens=512, steps=20, eval_every=10, eval_tokens=1024,
                controls=cpu_controls(**{"dtype": "fp32", "seed": 3, **controls}), optim=OptimConfig(warmdown_frac=0.5))
    base.update(kw)
    return PretrainConfig(**base)


RECIPES = {"picochat": {}, "nanochat": dict(features=NANOCHAT_FEATURES,
                                           optim=dataclasses.replace(NANOCHAT_OPTIM, warmup_steps=2))}


@pytest.mark.parametrize("recipe", RECIPES)
def test_resume_is_exact(small_corpus, small_tokenizer, tmp_path, cpu_path, recipe):
    """Down both CPU paths (auto = fp32, then bf16 autocast and bf16 Newton-Schulz), with picochat's
    recipe and nanochat's (value embeddings, smear, backout; Polar Express, NorMuon's second moment,
    cautious and scheduled weight decay, per-group AdamW): 12 steps
    straight, or 6 + resume + 6, give the same weights bit for bit, and the loss falls. Small
    (256 tokens a step): bf16 crawls on a CPU without bf16 hardware."""
    kw = dict(dtype="auto", total_batch_tokens=256, steps=12, eval_every=6, eval_tokens=512, **RECIPES[recipe])
    straight = pretrain(_cfg(small_corpus, small_tokenizer, tmp_path / "straight", **kw))
    first = pretrain(_cfg(small_corpus, small_tokenizer, tmp_path / "split", stop_at=6, **kw))
    assert first["steps"] == 6
    resumed = pretrain(_cfg(small_corpus, small_tokenizer, tmp_path / "split", resume=True, **kw))
    assert resumed["steps"] == 12

    losses = [m["loss"] for m in straight["metrics"]]
    assert [m["loss"] for m in resumed["metrics"]] == losses  # metrics replayed + continued, identical
    a = load_file(tmp_path / "straight" / "model.safetensors")
    b = load_file(tmp_path / "split" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # and it learned something: loss and validation bpb fell
    assert losses[-1] < losses[0] - 1.0
    evals = [m["val_bpb"] for m in straight["metrics"] if "val_bpb" in m]
    assert evals[-1] < evals[0]


def test_a_run_dir_from_before_a_setting_resumes_as_it_ran(small_corpus, small_tokenizer, tmp_path):
    """A run dir written before `features`, `sizing`, `budget` and the newer optimizer settings
    existed records none of them. Its resume takes each field's own default (the network and
    optimizer it ran with), not the command's newer default (PICOCHAT_FEATURES), and ends with the
    weights of a straight run made that way."""
    legacy = dict(features=ModelFeatures(), steps=8, eval_every=0)
    pretrain(_cfg(small_corpus, small_tokenizer, tmp_path / "straight", **legacy))
    pretrain(_cfg(small_corpus, small_tokenizer, tmp_path / "old", stop_at=4, **legacy))
    meta_path = tmp_path / "old" / "config.json"
    meta = json.loads(meta_path.read_text())
    train = meta["train"]
    for key in ("features", "sizing", "budget"):
        del train[key]
    before = {"matrix_lr", "embedding_lr", "head_lr", "scalar_lr", "adam_betas", "adam_eps", "weight_decay",
              "muon_momentum", "muon_momentum_start", "muon_momentum_warmup_steps", "ns_steps", "ns_dtype",
              "warmup_frac", "warmdown_frac", "final_lr_frac"}  # OptimConfig's fields at d76763b
    train["optim"] = {k: v for k, v in train["optim"].items() if k in before}
    meta_path.write_text(json.dumps(meta))

    # typed as the old command was: no --features, so the new default would be PICOCHAT_FEATURES
    resumed = pretrain(_cfg(small_corpus, small_tokenizer, tmp_path / "old", resume=True, steps=8, eval_every=0))
    assert resumed["steps"] == 8
    assert json.loads(meta_path.read_text())["train"]["features"] == dataclasses.asdict(ModelFeatures())
    a, b = load_file(tmp_path / "straight" / "model.safetensors"), load_file(tmp_path / "old" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # while a new run takes the command's default network
    fresh = pretrain(_cfg(small_corpus, small_tokenizer, tmp_path / "new", steps=1, eval_every=0))
    assert fresh["steps"] == 1
    assert json.loads((tmp_path / "new" / "config.json").read_text())["train"]["features"] == \
        dataclasses.asdict(PICOCHAT_FEATURES)


def test_run_dir_format_is_readable_by_standard_libraries(small_corpus, small_tokenizer, tmp_path):
    import tokenizers
    from safetensors import safe_open
    pretrain(_cfg(small_corpus, small_tokenizer, tmp_path / "run", steps=2, eval_every=0))
    run = tmp_path / "run"
    assert sorted(p.name for p in run.iterdir()) == [
        "config.json", "metrics.jsonl", "model.safetensors", "tokenizer.json", "trainer_state.pt"]
    meta = json.loads((run / "config.json").read_text())
    assert meta["stage"] == "base" and meta["model"]["n_layer"] == 2 and meta["step"] == 2
    with safe_open(run / "model.safetensors", "pt") as f:
        assert "wte.weight" in f.keys()
    hf = tokenizers.Tokenizer.from_file(str(run / "tokenizer.json"))
    loaded = load_run(run)
    text = "To be, or not to be"
    assert hf.encode(text, add_special_tokens=False).ids == loaded.tokenizer.encode(text)
    assert hf.encode(text).ids == [loaded.tokenizer.bos_id, *loaded.tokenizer.encode(text)]  # <|bos|> asked for
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]


# A run far too long to end by itself while a test stops it: the tests compare a few steps past where
# it stopped (--stop-at; the LR schedule stays the long run's), so every run they make is short.
LONG_ARGS = ["--depth", "2", "--seq-len", "64", "--batch-size", "4", "--steps", "100000", "--device", "cpu",
             "--dtype", "fp32", "--seed", "5", "--log-every", "1"]


def _same_weights_as_a_straight_run(args: list[str], victim: Path, stop: int, tmp_path: Path) -> None:
    straight = run_cli(*args, "--stop-at", str(stop), "--save", str(tmp_path / "straight"))
    assert straight.returncode == 0, straight.stderr
    a, b = load_file(tmp_path / "straight" / "model.safetensors"), load_file(victim / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_killed_run_resumes_to_the_same_weights(small_corpus, small_tokenizer, tmp_path):
    args = ["pretrain", "--data", str(small_corpus), "--tokenizer", str(small_tokenizer), *LONG_ARGS]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    victim = tmp_path / "victim"
    proc = subprocess.Popen([sys.executable, "-m", "picochat", *args, "--save", str(victim), "--save-every", "2"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600  # a safety net: the first checkpoint comes in seconds
    while not (victim / "config.json").exists():
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    step = json.loads((victim / "config.json").read_text())["step"]
    assert step >= 2  # killed mid-run, after a checkpoint
    resumed = run_cli(*args, "--save", str(victim), "--resume", "--stop-at", str(step + 6))
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming {victim} at step {step}" in resumed.stdout
    _same_weights_as_a_straight_run(args, victim, step + 6, tmp_path)


def _one_error_line(result) -> str:
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


def test_bad_input_gives_one_error_line(small_corpus, small_tokenizer, tmp_path):
    common = ["--tokenizer", str(small_tokenizer), "--depth", "2", "--seq-len", "64", "--steps", "2",
              "--device", "cpu"]
    # missing data
    err = _one_error_line(run_cli("pretrain", "--data", str(tmp_path / "nope.txt"), "--save", str(tmp_path / "r1"), *common))
    assert "nope.txt" in err and not (tmp_path / "r1").exists()
    # empty data
    (tmp_path / "empty.txt").write_text("\n\n")
    err = _one_error_line(run_cli("pretrain", "--data", str(tmp_path / "empty.txt"), "--save", str(tmp_path / "r2"), *common))
    assert "empty.txt" in err and not (tmp_path / "r2").exists()
    # a vocab too small for the special tokens
    err = _one_error_line(run_cli("tokenizer", "train", "--data", str(small_corpus), "--vocab-size", "100",
                                  "--save", str(tmp_path / "t.json")))
    assert "vocab" in err and not (tmp_path / "t.json").exists()
    # an unknown device
    err = _one_error_line(run_cli("pretrain", "--data", str(small_corpus), "--save", str(tmp_path / "r3"),
                                  *common[:-2], "--device", "tpu"))
    assert "tpu" in err and not (tmp_path / "r3").exists()

    good = tmp_path / "good"
    assert run_cli("pretrain", "--data", str(small_corpus), "--save", str(good), *common).returncode == 0
    # a sequence longer than the model's
    err = _one_error_line(run_cli("eval", "bpb", "--load", str(good), "--data", str(small_corpus),
                                  "--seq-len", "4096", "--device", "cpu"))
    assert "4096" in err
    # a tokenizer that does not match the checkpoint
    other = tmp_path / "other"
    other.mkdir()
    (other / "t.txt").write_text("completely different words " * 2000 + "\n\nand more text here " * 500)
    assert run_cli("tokenizer", "train", "--data", str(other / "t.txt"), "--vocab-size", "600",
                   "--save", str(other / "tokenizer.json")).returncode == 0
    swapped = tmp_path / "swapped"
    subprocess.run(["cp", "-r", str(good), str(swapped)], check=True)
    (swapped / "tokenizer.json").write_bytes((other / "tokenizer.json").read_bytes())
    err = _one_error_line(run_cli("sample", "--load", str(swapped), "--prompt", "hi", "--device", "cpu"))
    assert "tokenizer does not match" in err
    # a corrupt, truncated run dir
    corrupt = tmp_path / "corrupt"
    subprocess.run(["cp", "-r", str(good), str(corrupt)], check=True)
    data = (corrupt / "model.safetensors").read_bytes()
    (corrupt / "model.safetensors").write_bytes(data[: len(data) // 2])
    err = _one_error_line(run_cli("sample", "--load", str(corrupt), "--device", "cpu"))
    assert "corrupt run dir" in err
    # resuming a run dir that has no trainer state, or starting over one that exists
    err = _one_error_line(run_cli("pretrain", "--data", str(small_corpus), "--save", str(good), *common))
    assert "already exists" in err


def test_eval_bpb_and_sample_cli(small_corpus, small_tokenizer, tmp_path):
    run = tmp_path / "run"
    r = run_cli("pretrain", "--data", str(small_corpus), "--save", str(run), "--tokenizer", str(small_tokenizer),
                "--depth", "2", "--seq-len", "64", "--steps", "5", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    bpb = run_cli("eval", "bpb", "--load", str(run), "--data", str(small_corpus), "--device", "cpu",
                  "--max-tokens", "4096")
    assert bpb.returncode == 0, bpb.stderr
    value = json.loads(bpb.stdout.strip().splitlines()[-1])["bpb"]
    assert 0.5 < value < 10
    s = run_cli("sample", "--load", str(run), "--prompt", "ROMEO:", "--max-tokens", "8", "--temperature", "0",
                "--device", "cpu")
    assert s.returncode == 0 and s.stdout.startswith("ROMEO:")


def test_data_prepare_then_pretrain_from_parquet(small_corpus, small_tokenizer, tmp_path):
    import pyarrow.parquet as pq

    from picochat.data.sources import iter_documents
    r = run_cli("data", "prepare", "--data", str(small_corpus), "--save", str(tmp_path / "shards"))
    assert r.returncode == 0, r.stderr
    shards = sorted((tmp_path / "shards").glob("shard_*.parquet"))
    assert shards
    texts = [t for s in shards for t in pq.read_table(s).column("text").to_pylist()]
    assert texts == list(iter_documents([small_corpus]))
    r = run_cli("pretrain", "--data", str(tmp_path / "shards"), "--tokenizer", str(small_tokenizer), "--depth", "2",
                "--seq-len", "64", "--steps", "2", "--device", "cpu", "--save", str(tmp_path / "run"))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["steps"] == 2


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_saves_and_the_resumed_run_ends_like_a_straight_one(small_corpus, small_tokenizer, tmp_path, sig):
    """Ctrl-C or SIGTERM to a real training process: it finishes the step, saves (no --save-every
    needed), exits 130 or 143 with one line saying how to resume, and the resume ends with the
    straight run's weights."""
    args = ["pretrain", "--data", str(small_corpus), "--tokenizer", str(small_tokenizer), *LONG_ARGS]
    victim = tmp_path / "victim"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-m", "picochat", *args, "--save", str(victim)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:  # the run is past its third step
        if line.startswith("step 3/100000"):
            break
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=600)  # a safety net: the step in flight ends, then the save
    assert proc.returncode == 128 + sig, err
    step = json.loads((victim / "config.json").read_text())["step"]
    assert step >= 3
    assert err.strip().splitlines()[-1] == (f"stopped: {signal.Signals(sig).name}: saved at step {step}; "
                                            "continue with the same command and --resume")
    resumed = run_cli(*args, "--stop-at", str(step + 6), "--save", str(victim), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads((victim / "config.json").read_text())["step"] == step + 6
    _same_weights_as_a_straight_run(args, victim, step + 6, tmp_path)


def test_checkpoints_by_wall_time():
    """save_every_minutes: a checkpoint as soon as that much time has passed since the last one."""
    from picochat.config import ModelConfig
    from picochat.model import GPT
    from picochat.optim import OptimConfig, build_optimizer
    from picochat.train.loop import Callbacks, LoopConfig, Trainer

    class Data:
        def next_batch(self):
            return torch.zeros(1, 8, dtype=torch.long), torch.zeros(1, 8, dtype=torch.long)

        def state_dict(self):
            return {}

    model = GPT(ModelConfig(vocab_size=300, n_layer=1, n_embd=32, n_head=2, n_kv_head=1, sequence_len=8))
    saves = []
    for minutes, want in ((1e-9, [1, 2, 3]), (60.0, [3])):  # every step, or only at the end
        saves.clear()
        loop = LoopConfig(steps=3, save_every_minutes=minutes)
        trainer = Trainer(model, build_optimizer(model, OptimConfig()), OptimConfig(), loop, torch.device("cpu"),
                          torch.float32, flops_per_token=1.0)
        trainer.fit(Data(), Callbacks(save=lambda step, state, metrics: saves.append(step)))
        assert saves == want
