"""`picochat speedrun`: the whole pipeline in one command.

With no flags it needs no network and no data: it builds a corpus from the text this machine
already has (the installed Python's documentation and docstrings), trains a tokenizer on it,
pretrains a tiny model, measures validation bits per byte and samples; then midtrains and
fine-tunes it into a chat model that uses the calculator, improves its arithmetic with RL (GRPO,
rewards from the task's grader), measures its task accuracy after every stage, and writes a report.
`picochat chat --load <save>/sft` talks to the result.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from .checkpoint import LoadOptions, open_for_inference
from .common import DEVICES, DTYPES, PicochatError, autocast, log
from .data.datasets import LOCATIONS
from .sample import SampleConfig, SamplingOptions, sample
from .conversation import render_for_completion
from .optim import OptimConfig
from .settings import setting
from .tokenizer import train_tokenizer
from .train.pretrain import PretrainConfig, pretrain
from .train.rl import RLConfig, rl_train
from .train.sft import MidtrainConfig, SFTConfig, chat_train
from .train.stage import RunControls

# name -> pretraining settings, plus the midtraining and SFT steps (mid_steps, sft_steps), the RL steps
# and rollout batch (rl_steps; rl_batch = prompts per step, samples per prompt) and how many
# examples each eval task takes (eval_limit: categorical, generative, CORE per task;
# None = all).
# tiny is sized for 15-20 minutes on 2 CPU cores in fp32 (measured: 15m46s and 19m57s).
PRESETS: dict[str, dict] = {
    "smoke": dict(depth=2, seq_len=128, vocab_size=512, batch_size=4, total_batch_tokens=512, steps=10,
                  eval_every=5, eval_tokens=2048, mid_steps=5, sft_steps=5, rl_steps=2, rl_batch=(4, 4),
                  eval_limit=(10, 2, 4)),  # a one-minute check of the pipeline
    "tiny": dict(depth=4, seq_len=256, vocab_size=4096, batch_size=16, total_batch_tokens=8192, steps=150,
                 eval_every=25, eval_tokens=32768, mid_steps=40, sft_steps=150, rl_steps=30, rl_batch=(8, 8),
                 eval_limit=(200, 20, 40)),
    "small": dict(depth=6, seq_len=512, vocab_size=8192, batch_size=16, total_batch_tokens=32768, steps=1000,
                  eval_every=100, mid_steps=200, sft_steps=600, rl_steps=100, rl_batch=(8, 16),
                  eval_limit=(500, 50, 200)),
    "d8": dict(depth=8, seq_len=1024, vocab_size=32768, batch_size=16, total_batch_tokens=131072, steps=0,
               eval_every=250, mid_steps=500, sft_steps=1000, rl_steps=200, rl_batch=(16, 16),
               eval_limit=(None, None, None)),
    "d12": dict(depth=12, seq_len=2048, vocab_size=65536, batch_size=16, total_batch_tokens=524288, steps=0,
                eval_every=250, mid_steps=800, sft_steps=1000, rl_steps=300, rl_batch=(16, 16),
                eval_limit=(None, None, None)),
    "d20": dict(depth=20, seq_len=2048, vocab_size=65536, batch_size=32, total_batch_tokens=524288, steps=0,
                eval_every=250, mid_steps=800, sft_steps=1000, rl_steps=300, rl_batch=(16, 16),
                eval_limit=(None, None, None)),
}
# The chat stages need no download: the built-in identity conversations, and synthetic arithmetic
# that teaches the calculator tool, measured on arithmetic questions no stage trained on.
CHAT_DATA = "identity::100,arithmetic::1"  # 12 identity pairs x 100 vs 10,000 arithmetic questions
CHAT_PROMPTS = ["Who are you?", "What is 4821 * 377?"]
RL_MAX_TOKENS, RL_LR_SCALE = 64, 0.05  # arithmetic replies are ~30 tokens
SAMPLE_PROMPTS = ["The", "In Python, a list", "The function returns", "If the file"]


@dataclass
class SpeedrunConfig:
    preset: str = setting("tiny", "the recipe: smoke (one minute), tiny (offline, 15-20 min on 2 CPU cores), "
                                  "small, d8, d12, d20", choices=tuple(PRESETS))
    data: list[str] | None = setting(None, "your own text instead of the builtin offline corpus (default: the "
                                           "builtin corpus)")
    save: str = setting("runs/speedrun", "output directory")
    steps: int = setting(0, "pretraining steps (default: the preset's)", low=0)
    eval_data: str | None = setting(None, "a data dir laid out like ../shared/data (CORE bundle, ARC, MMLU, GSM8K, "
                                          "HumanEval, words) for the report card's evals (default: "
                                          "$PICOCHAT_DATA; without it only the built-in evals run)")
    usd_per_hour: float | None = setting(None, "the machine's price, for the report's cost column (default: a "
                                               "guess for the device)", low=0)
    overwrite: bool = setting(False, "replace an existing output directory")
    compile: bool = setting(False, "torch.compile the training steps (pays a compile per stage)")
    device: str = setting("auto", f"one of {', '.join(DEVICES)} or cuda:N (auto: cuda > mps > cpu)")
    dtype: str = setting("auto", "compute dtype (auto: bf16 on CUDA and on CPUs with native bf16, else fp32)",
                         choices=DTYPES)


def speedrun(cfg: SpeedrunConfig) -> Path:
    if cfg.preset not in PRESETS:
        raise PicochatError(f"unknown preset {cfg.preset!r} (choose from {', '.join(PRESETS)})")
    preset = dict(PRESETS[cfg.preset])
    eval_data = cfg.eval_data or os.environ.get("PICOCHAT_DATA")
    if eval_data and not Path(eval_data).is_dir():
        raise PicochatError(f"--eval-data: not a directory: {eval_data}")
    out = Path(cfg.save)
    if out.exists():
        if not cfg.overwrite:
            raise PicochatError(f"{out} already exists (use --overwrite to replace it)")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    if cfg.data:
        data = cfg.data
    else:
        from .data.builtin import build_builtin_corpus
        log("building the offline corpus from this machine's Python documentation")
        data = [str(p) for p in build_builtin_corpus(out / "corpus")]
    timings["corpus"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    vocab = preset.pop("vocab_size")
    mid_steps, sft_steps = preset.pop("mid_steps"), preset.pop("sft_steps")
    rl_steps, (rl_prompts, rl_group) = preset.pop("rl_steps"), preset.pop("rl_batch")
    limits = preset.pop("eval_limit")
    tok_path = out / "tokenizer.json"
    train_tokenizer(data, vocab, save=str(tok_path))
    timings["tokenizer"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    if cfg.steps:
        preset["steps"] = cfg.steps
    controls = RunControls(device=cfg.device, dtype=cfg.dtype, compile=cfg.compile)
    pcfg = PretrainConfig(data=data, save=str(out / "base"), tokenizer=str(tok_path), cache_dir=str(out / "token_cache"),
                          sample_every=0, optim=OptimConfig(), run=controls, **preset)
    result = pretrain(pcfg)
    timings["pretrain"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    load = LoadOptions(str(out / "base"), device=cfg.device, dtype=cfg.dtype)
    samples = {p: sample(SampleConfig(load, p, sampling=SamplingOptions(temperature=0.0, max_tokens=48)))[0]
               for p in SAMPLE_PROMPTS}
    timings["sample"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    _evaluate(out / "base", eval_data, limits, cfg)
    timings["base evals"] = time.perf_counter() - t0

    answers = {}
    for config, steps, load, lr_scale in ((MidtrainConfig, mid_steps, "base", 1.0), (SFTConfig, sft_steps, "mid", 0.5)):
        t0 = time.perf_counter()
        stage = config.stage
        chat_train(config(load=str(out / load), data=CHAT_DATA, save=str(out / stage), batch_size=16, steps=steps,
                          lr_scale=lr_scale, run=RunControls(device=cfg.device, dtype=cfg.dtype, log_every=10)))
        timings[stage] = time.perf_counter() - t0
        t0 = time.perf_counter()
        answers[stage] = _evaluate(out / stage, eval_data, limits, cfg)
        timings[f"{stage} evals"] = time.perf_counter() - t0

    # RL on the arithmetic task: rewards from its grader, the calculator on during rollouts; its
    # held-out accuracy is measured by _evaluate below, like every stage's
    t0 = time.perf_counter()
    rl_train(RLConfig(load=str(out / "sft"), task="arithmetic::1", save=str(out / "rl"), steps=rl_steps,
                      prompts_per_step=rl_prompts, group_size=rl_group, max_tokens=RL_MAX_TOKENS,
                      batch_size=rl_prompts * rl_group, rollout_rows=rl_prompts * rl_group, lr_scale=RL_LR_SCALE,
                      eval_examples=0, run=RunControls(device=cfg.device, dtype=cfg.dtype,
                                                       log_every=max(1, rl_steps // 10))))
    timings["rl"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    answers["rl"] = _evaluate(out / "rl", eval_data, limits, cfg)
    timings["rl evals"] = time.perf_counter() - t0

    from .report import report_card, table
    extra = {
        "Samples from the base model (greedy)": "\n".join(f"- `{p}` → {s[len(p):]!r}" for p, s in samples.items()),
        "Chat answers (greedy, calculator on)": table(["prompt"] + [s.upper() for s in answers],
                                                     [[f"`{p}`"] + [repr(a[p]) for a in answers.values()]
                                                      for p in CHAT_PROMPTS]),
        "Data": f"{len(data)} source(s): " + ", ".join(f"`{p}`" for p in data)
                + (f"; eval data from `{eval_data}`" if eval_data else
                   "; no eval data given (--eval-data or $PICOCHAT_DATA), so only the built-in evals ran"),
    }
    report = report_card([out / "base", out / "mid", out / "sft", out / "rl"], out / "report.md",
                         title=f"picochat speedrun — preset `{cfg.preset}`", usd_per_hour=cfg.usd_per_hour,
                         extra=extra, timings=timings)
    log(f"done: validation bpb {result['val_bpb']}; report at {report}")
    return report


def _evaluate(run_dir: Path, eval_data: str | None, limits: tuple, cfg: SpeedrunConfig) -> dict[str, str]:
    """A stage's evals, saved into its run dir for the report card: CORE for the base model (when
    the bundle is in the eval data); for chat stages the chat evals whose data is there, built-in
    arithmetic, and greedy answers to a few prompts."""
    from .engine import Engine
    from .evals.chat_eval import build_eval_task, evaluate_task
    from .tasks.registry import EVALS
    categorical, generative, core = limits
    run = open_for_inference(LoadOptions(str(run_dir), device=cfg.device, dtype=cfg.dtype))
    if run.meta["stage"] == "base":
        if eval_data and (Path(eval_data) / "core_eval_bundle").is_dir():
            from .evals.core import run_core
            run_core(run, Path(eval_data) / "core_eval_bundle", limit=core)
        return {}
    for name, spec in EVALS.items():
        if not spec.dataset or (eval_data and (Path(eval_data) / LOCATIONS[spec.dataset]).exists()):
            # arithmetic is cheap (short replies) and the one chat eval that always runs: take more
            limit = categorical if spec.eval.kind == "categorical" else max(generative or 0, 100) \
                if name == "arithmetic" else generative
            evaluate_task(run, name, build_eval_task(name, eval_data), limit=limit)
    engine = Engine(run.model, run.tokenizer)
    answers = {}
    with autocast(run.device, run.decode_dtype):
        for prompt in CHAT_PROMPTS:
            ids = render_for_completion(run.tokenizer, {"messages": [{"role": "user", "content": prompt}]})
            answers[prompt] = engine.generate_batch(ids, max_tokens=48, temperature=0.0)[0].text
    return answers
