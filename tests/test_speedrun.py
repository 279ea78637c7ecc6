import dataclasses
import json
import os
import re
import signal
import subprocess
import sys

import pytest

from picochat.common import PicochatError

from .conftest import REPO, run_cli
from .hub_server import FakeHub, fill, hub_env


def assert_the_plan_is_the_run(out) -> None:
    """What the speedrun's plan said of each stage (speedrun.json) is what the stage derived and did:
    the same steps, rows, accumulation, sequence length and tokens per step (config.json's plan),
    and the step it ended at."""
    planned = json.loads((out / "speedrun.json").read_text())["notes"]["plan"]
    assert {"pretrain", "sft"} <= set(planned)
    for stage, plan in planned.items():
        meta = json.loads((out / ("base" if stage == "pretrain" else stage) / "config.json").read_text())
        assert meta["plan"] == plan, stage
        assert meta["step"] == plan["steps"], stage


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
    assert_the_plan_is_the_run(out)
    assert "![report-loss](report-loss.png)" in report
    # a second run into the same directory refuses, with one error line
    again = run_cli("speedrun", "--preset", "smoke", "--save", str(out), "--device", "cpu", cwd=tmp_path)
    assert again.returncode == 2 and again.stderr.strip().startswith("error:") and "already exists" in again.stderr


# ----------------------------------------------------------------------------- presets and the plan

def test_preset_numbers_are_the_recipes():
    """d20 is nanochat's 561M speedrun; picochat-335m the MacBook Air model card's 335M."""
    from picochat.presets import PRESETS
    d20, mac = PRESETS["d20"], PRESETS["picochat-335m"]
    plan = d20.pretrain_plan()  # nanochat's base_train at HEAD gives d20 4,980 steps of 2^20 tokens (its own code)
    assert d20.params == 896_533_746 and (plan.steps, plan.tokens_per_step) == (4_980, 1_048_576)
    assert (round(plan.lr_scale, 4), round(plan.wd_scale, 4)) == (1.4142, 0.3578) and d20.shards == 112
    gpt2 = PRESETS["gpt2"].pretrain_plan()  # runs/speedrun.sh: d24, 8 tokens per matrix and head parameter
    assert (gpt2.steps, gpt2.tokens_per_step, gpt2.rows, gpt2.grad_accum) == (5_568, 1_048_576, 16, 32)
    c = mac.model_config()
    assert (c.n_layer, c.n_embd, c.n_head, c.n_kv_head, c.sequence_len, c.vocab_size) == (16, 1024, 8, 8, 1024, 65536)
    plan = mac.pretrain_plan()
    assert mac.params == 335_544_352 and plan.steps == 54_000 and round(plan.tokens / 1e6) == 442
    assert mac.mid.steps * mac.mid.batch_size * mac.pretrain.seq_len == 32_768_000
    assert mac.sft.steps == 1000 and mac.sft.batch_size == 8
    assert mac.mps_dtype == "bf16" and mac.rl is None
    for name in ("d8", "d12", "d20", "gpt2"):  # nanochat's recipe at HEAD: its network, optimizer, budget and SFT
        p = PRESETS[name]
        assert p.pretrain.budget == "nanochat" and p.pretrain.features.smear and p.pretrain.optim.muon_eq
        assert p.mid is None and p.sft.packed and "smoltalk" in p.sft.data and p.downloads
        assert (p.rl is not None and "gsm8k" in p.rl.task) == (name != "gpt2")
    # they differ only in scale, so the d20 miniature below runs d8's and d12's stages and data too;
    # so do the offline presets, whose miniature the tiny one's test runs
    assert [name for name, p in PRESETS.items() if p.fp8] == ["d20", "gpt2"]  # FP8 where the GPU has it
    for names in (("d8", "d12", "d20"), ("smoke", "tiny", "small")):
        mini = [dataclasses.replace(PRESETS[n].miniature(), name="", about="", fp8=False) for n in names]
        assert mini[0] == mini[1] == mini[2]
    assert not PRESETS["tiny"].downloads and "pydocs" in PRESETS["tiny"].sft.data


def _dry_run(preset: str, tmp_path, *more: str) -> str:
    data = tmp_path / "data"
    r = run_cli("speedrun", "--preset", preset, "--dry-run", "--data-dir", str(data), "--save", str(tmp_path / "run"),
                "--device", "cpu", "--dtype", "fp32", *more, cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert not data.exists() and not (tmp_path / "run").exists()  # a dry run writes nothing
    return r.stdout


def test_dry_run_plans_d20_and_the_macbook_model(tmp_path):
    out = _dry_run("gpt2", tmp_path, "--measure-steps", "0")  # nanochat's runs/speedrun.sh
    assert "depth 24, width 1536, 12/12 heads, context 2,048, vocab 32,768" in out
    assert re.search(r"pretrain +climbmix +5,568 steps +5\.84B tokens +16 x 2,048 x 32 = 1,048,576", out)
    assert ("nanochat's budget: 8 tokens per matrix and head parameter; learning rates x1.414, "
            "weight decay x0.213") in out
    assert re.search(r"sft +smoltalk 1, mmlu 3, gsm8k 4 +one pass", out) and "rl " not in out.split("evals")[0]
    out = _dry_run("d20", tmp_path, "--measure-steps", "0")
    assert "896,533,746 parameters (896.5M)" in out
    assert re.search(r"pretrain +climbmix +4,980 steps +5\.22B tokens +32 x 2,048 x 16 = 1,048,576", out)
    assert "climbmix     112 shards; 0 here, 112 to download (10.6 GB)" in out
    for name in ("smoltalk", "mmlu", "gsm8k", "arc", "humaneval", "words", "core"):
        assert re.search(rf"^    {name} +to download \(", out, re.M), name
    assert re.search(r"rl +gsm8k 1 +467 steps", out) and "mid " not in out.split("evals")[0]
    assert re.search(r"pretrain +32 x 2,048 rows: [0-9.]+ GiB \([0-9.]+ GiB with --grad-checkpoint\); this device "
                     r"has [0-9.]+ GiB", out)
    assert "Next: picochat speedrun --preset d20" in out
    gpu = out.split("on one 80 GB CUDA GPU (bf16)")[1]  # nanochat's batch, without recomputing anything
    assert re.search(r"pretrain +32 x 2,048 rows: [0-9.]+ GiB \([0-9.]+ GiB with --grad-checkpoint\); it has "
                     r"74\.5 GiB: fits$", gpu, re.M)
    out = _dry_run("picochat-335m", tmp_path, "--measure-steps", "0")
    assert "depth 16, width 1024, 8/8 heads, context 1,024, vocab 65,536" in out
    assert "335,544,352 parameters (335.5M)" in out and "11 shards; 0 here, 11 to download" in out
    assert re.search(r"pretrain +fineweb-edu +54,000 steps +442\.4M tokens", out)
    assert re.search(r"mid +text 1, smoltalk 1,.* +4,000 steps +32\.8M tokens", out)
    assert re.search(r"sft +smoltalk =10000, gsm8k 1, arc-easy 1, arc-challenge 1, identity =1000, spelling =600 +"
                     r"1,000 steps", out)
    assert "rl " not in out.split("evals")[0].split("stages")[1]  # the MacBook recipe has no RL
    mac = out.split("on a 16 GB Apple-silicon Mac (bf16; Metal lets its GPU hold 10.7 GiB)")[1]
    assert re.search(r"sft +8 x 1,024 rows: 9\.8 GiB \(7\.1 GiB with --grad-checkpoint\); it has 10\.7 GiB: fits$",
                     mac, re.M)
    # LoRA fine-tuning: the frozen weights take no gradients or optimizer state
    out = _dry_run("picochat-335m", tmp_path, "--measure-steps", "0", "--lora", "16")
    mac = out.split("on a 16 GB Apple-silicon Mac")[1]
    assert re.search(r"sft +8 x 1,024 rows: 6\.4 GiB \(3\.3 GiB with --grad-checkpoint\); it has 10\.7 GiB: fits$",
                     mac, re.M)
    assert re.search(r"pretrain +8 x 1,024 rows: 9\.8 GiB", mac) and "--lora 16" in out.split("Next:")[1]


def test_dry_run_times_real_steps_here(tmp_path):
    out = _dry_run("tiny", tmp_path, "--measure-steps", "2")
    m = re.search(r"from 2 timed step\(s\) of 8 x 256 tokens here: ([0-9.]+) s/step, ([0-9,]+) tok/s", out)
    assert m and float(m.group(1)) > 0
    assert re.search(r"pretrain +builtin +150 steps +1\.2M tokens +16 x 256 x 2 = 8,192 +~\d", out)
    assert re.search(r"total about \S+ of compute here", out)
    assert "evals     arithmetic, pydocs" in out


def test_the_offline_presets_in_miniature_run_as_planned(tmp_path):
    """smoke, tiny and small have the same miniature (test_preset_numbers_are_the_recipes): tiny's."""
    out = tmp_path / "run"
    r = run_cli("speedrun", "--preset", "tiny", "--miniature", "--save", str(out), "--device", "cpu", cwd=tmp_path,
                timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    assert_the_plan_is_the_run(out)


def test_derived_steps_are_planned_as_they_run(tiny_base, small_corpus, small_tokenizer, tmp_path):
    """The numbers a stage derives when they are not given: pretraining's steps from the tokens per
    parameter, and SFT's one pass over its conversations, rounded up: 1,000 conversations at 16 a
    step are 63 steps (the last one wraps into the next pass), in the plan and in the run."""
    from picochat.model import num_params
    from picochat.run_dir import load_run
    from picochat.tasks import build_mixture
    from picochat.tokenizer import Tokenizer
    from picochat.train.pretrain import PretrainConfig, model_config, plan_pretrain, pretrain
    from picochat.train.sft import SFTConfig, chat_train, plan_chat

    from .conftest import cpu_controls
    cfg = PretrainConfig(data=[str(small_corpus)], save=str(tmp_path / "base"), tokenizer=str(small_tokenizer),
                         depth=2, seq_len=64, batch_size=4, total_batch_tokens=512, tokens_params_ratio=0.01,
                         controls=cpu_controls(dtype="fp32"))
    config = model_config(cfg, Tokenizer.load(small_tokenizer).vocab_size)
    plan = plan_pretrain(cfg, config, world=1)
    assert plan.steps == round(0.01 * num_params(config) / 512) and plan.grad_accum == 2
    assert pretrain(cfg)["steps"] == plan.steps
    assert load_run(tmp_path / "base").meta["plan"] == plan.to_dict()

    sft = SFTConfig(load=str(tiny_base), data="arithmetic::=1000", save=str(tmp_path / "sft"), batch_size=16,
                    seq_len=32, controls=cpu_controls(dtype="fp32", log_every=100))
    conversations = len(build_mixture(sft.data, split="train", seed=sft.controls.seed))
    plan = plan_chat(sft, context=128, world=1, rows_per_pass=conversations)
    assert (conversations, plan.steps, plan.rows_per_step) == (1000, 63, 16)
    assert chat_train(sft)["steps"] == 63
    assert load_run(tmp_path / "sft").meta["plan"] == plan.to_dict()
    # accumulation is never rounded: a batch that does not divide is refused, by the plan as by the run
    with pytest.raises(PicochatError, match="--total-batch-tokens 500 is not a multiple of batch size x seq len"):
        plan_pretrain(dataclasses.replace(cfg, total_batch_tokens=500), config, world=1)


def test_memory_fit_switches_grad_checkpoint_on_only_when_it_is_what_fits():
    from picochat.plan import Fit
    gib = 1 << 30
    assert Fit(8, 1024, 4 * gib, 2 * gib, 8 * gib).describe().endswith(": fits")
    fit = Fit(8, 1024, 20 * gib, 7 * gib, 10 * gib)
    assert fit.grad_checkpoint and fit.fits and "switches on" in fit.describe()
    fit = Fit(8, 1024, 40 * gib, 12 * gib, 10 * gib)
    assert not fit.grad_checkpoint and not fit.fits and "DOES NOT FIT" in fit.describe()


# ----------------------------------------------------------------------------- the download presets in miniature

@pytest.fixture(scope="module")
def miniature_hub():
    with FakeHub() as hub:
        fill(hub)
        yield hub


def _speedrun(hub, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "picochat", "speedrun", "--device", "cpu", *args],
                          capture_output=True, text=True, env=hub_env(hub), timeout=timeout)


def test_d20_in_miniature_downloads_what_it_needs_and_runs_every_stage(miniature_hub, tmp_path):
    from picochat.tasks.pydocs import sample_questions
    data, out = tmp_path / "data", tmp_path / "run"
    r = _speedrun(miniature_hub, "--preset", "d20", "--miniature", "--data-dir", str(data), "--save", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    log = r.stdout
    assert log.index("plan: preset d20 (miniature)") < log.index("speedrun [1/9] data") < log.index("data: fetching")
    assert len(list((data / "climbmix").glob("shard_*.parquet"))) == 2  # what the budget needs, not all 6,543
    for stage in ("base", "sft", "rl"):  # nanochat's network, at toy scale; no midtraining at HEAD
        config = json.loads((out / stage / "config.json").read_text())["model"]
        assert (config["n_layer"], config["value_embeds"], config["smear"], config["backout"]) == (2, True, True, True)
    assert not (out / "mid").exists()
    sft = json.loads((out / "sft" / "config.json").read_text())["train"]
    assert sft["data"] == f"smoltalk:{data}/smoltalk:1,mmlu:{data}/mmlu:3,gsm8k:{data}/gsm8k:4" and sft["packed"]
    rl = json.loads((out / "rl" / "config.json").read_text())["train"]
    assert rl["task"] == f"gsm8k:{data}/gsm8k:1" and rl["steps"] == 2
    evals = {p.stem for p in (out / "sft" / "evals").glob("*.json")}
    assert {"arc-easy", "arc-challenge", "mmlu", "gsm8k", "humaneval", "spelling", "arithmetic", "pydocs"} <= evals
    assert (out / "base" / "evals" / "core.json").is_file()
    report = (out / "report.md").read_text()
    assert re.search(r"^\| \*\*ChatCORE\*\* \|", report, re.M) and re.search(r"^\| CORE \|", report, re.M)
    question = sample_questions()[0][0]
    assert f"| `{question}` |" in report  # the held-out Python questions, asked of every chat stage
    assert f"Next: picochat chat --load {out / 'rl'}" in log
    assert_the_plan_is_the_run(out)


def test_the_macbook_recipe_in_miniature_resumes_after_a_kill(miniature_hub, tmp_path):
    """SIGTERM in the middle of the run, then --resume: finished steps are skipped, nothing is
    downloaded twice, and the run ends as an uninterrupted one would."""
    data, out = tmp_path / "data", tmp_path / "run"
    args = ["--preset", "picochat-335m", "--miniature", "--data-dir", str(data), "--save", str(out)]
    proc = subprocess.Popen([sys.executable, "-m", "picochat", "speedrun", "--device", "cpu", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=hub_env(miniature_hub))
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith("speedrun [8/9] sft"):
            proc.send_signal(signal.SIGTERM)
            break
    proc.stdout.read()
    assert proc.wait(timeout=300) != 0, "".join(seen)[-2000:]
    state = json.loads((out / "speedrun.json").read_text())
    assert list(state["done"]) == ["data", "corpus", "tokenizer", "pretrain", "base evals", "mid", "mid evals"]
    fetched = len(miniature_hub.gets(".parquet"))
    r = _speedrun(miniature_hub, *args, "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    for step in ("data", "corpus", "tokenizer", "pretrain", "base evals", "mid", "mid evals"):
        assert f"] {step}: done before, skipped" in r.stdout
    assert len(miniature_hub.gets(".parquet")) == fetched  # nothing downloaded again
    assert json.loads((out / "sft" / "config.json").read_text())["step"] == 4
    assert list(json.loads((out / "speedrun.json").read_text())["done"])[-2:] == ["sft", "sft evals"]
    assert not (out / "rl").exists() and "Next: picochat chat --load" in r.stdout and str(out / "sft") in r.stdout
    assert_the_plan_is_the_run(out)
    # a resume with another preset is refused
    r = _speedrun(miniature_hub, "--preset", "d8", "--miniature", "--data-dir", str(data), "--save", str(out),
                  "--resume")
    assert r.returncode == 2 and r.stderr.startswith("error: --resume:") and "another run" in r.stderr


def test_wandb_mirrors_the_metrics_rows(tmp_path, small_corpus, small_tokenizer):
    """--wandb PROJECT sends every metrics.jsonl row to Weights & Biases (offline mode: to disk)."""
    save = tmp_path / "base"
    env = dict(os.environ, PYTHONPATH=str(REPO), WANDB_MODE="offline", WANDB_SILENT="true")
    r = subprocess.run([sys.executable, "-m", "picochat", "pretrain", "--data", str(small_corpus), "--tokenizer",
                        str(small_tokenizer), "--depth", "2", "--seq-len", "64", "--batch-size", "2", "--steps", "4",
                        "--eval-every", "2", "--device", "cpu", "--save", str(save), "--wandb", "picochat-test"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    runs = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1 and "wandb: mirroring metrics to project 'picochat-test'" in r.stdout
    logged = runs[0].read_bytes()
    rows = [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all("loss" in row for row in rows)
    for row in rows:  # every number of every row is in the W&B run's history records
        assert json.dumps(row["loss"]).encode() in logged
    assert b"val_bpb" in logged and json.dumps(rows[-1]["val_bpb"]).encode() in logged


def test_the_readme_shows_the_presets_table():
    from picochat.presets import preset_table
    assert preset_table() in (REPO / "README.md").read_text()
