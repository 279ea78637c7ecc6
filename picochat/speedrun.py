"""`picochat speedrun`: the whole pipeline in one command.

With no flags it needs no network and no data: it builds a corpus from the text this machine
already has (the installed Python's documentation and docstrings), trains a tokenizer on it,
pretrains a tiny model, measures validation bits per byte and samples; then midtrains and
fine-tunes it into a chat model that uses the calculator, measures its task accuracy before and
after SFT, and writes a report. `picochat chat --load <save>/sft` talks to the result.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from .common import PicochatError, log
from .conversation import render_for_completion
from .optim import OptimConfig
from .tokenizer import train_tokenizer
from .train.pretrain import PretrainConfig, pretrain
from .train.sft import ChatTrainConfig, chat_train

# name -> pretraining settings, plus the midtraining and SFT steps (mid_steps, sft_steps).
# tiny is sized for under 20 minutes on 2 CPU cores in fp32.
PRESETS: dict[str, dict] = {
    "smoke": dict(depth=2, seq_len=128, vocab_size=512, batch_size=4, total_batch_tokens=512, steps=10,
                  eval_every=5, eval_tokens=2048, mid_steps=5, sft_steps=5),  # a one-minute check of the pipeline
    "tiny": dict(depth=4, seq_len=256, vocab_size=4096, batch_size=16, total_batch_tokens=8192, steps=150,
                 eval_every=25, eval_tokens=32768, mid_steps=40, sft_steps=150),
    "small": dict(depth=6, seq_len=512, vocab_size=8192, batch_size=16, total_batch_tokens=32768, steps=1000,
                  eval_every=100, mid_steps=200, sft_steps=600),
    "d8": dict(depth=8, seq_len=1024, vocab_size=32768, batch_size=16, total_batch_tokens=131072, steps=0,
               eval_every=250, mid_steps=500, sft_steps=1000),
    "d12": dict(depth=12, seq_len=2048, vocab_size=65536, batch_size=16, total_batch_tokens=524288, steps=0,
                eval_every=250, mid_steps=800, sft_steps=1000),
    "d20": dict(depth=20, seq_len=2048, vocab_size=65536, batch_size=32, total_batch_tokens=524288, steps=0,
                eval_every=250, mid_steps=800, sft_steps=1000),
}
# The chat stages need no download: the built-in identity conversations, and synthetic arithmetic
# that teaches the calculator tool. Accuracy is measured on arithmetic questions no stage trained on.
CHAT_DATA = "identity::100,arithmetic::1"  # 12 identity pairs x 100 vs 10,000 arithmetic questions
HELD_OUT = dict(size=40, seed=12345)
CHAT_PROMPTS = ["Who are you?", "What is 4821 * 377?"]
SAMPLE_PROMPTS = ["The", "In Python, a list", "The function returns", "If the file"]


@dataclass
class SpeedrunConfig:
    preset: str = "tiny"
    data: list[str] | None = None  # None: the builtin offline corpus
    save: str = "runs/speedrun"
    steps: int = 0  # 0: the preset's
    overwrite: bool = False
    compile: bool = False
    device: str = "auto"
    dtype: str = "auto"


def speedrun(cfg: SpeedrunConfig) -> Path:
    if cfg.preset not in PRESETS:
        raise PicochatError(f"unknown preset {cfg.preset!r} (choose from {', '.join(PRESETS)})")
    preset = dict(PRESETS[cfg.preset])
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
    tok_path = out / "tokenizer.json"
    train_tokenizer(data, vocab, save=str(tok_path))
    timings["tokenizer"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    if cfg.steps:
        preset["steps"] = cfg.steps
    pcfg = PretrainConfig(data=data, save=str(out / "base"), tokenizer=str(tok_path), device=cfg.device,
                          dtype=cfg.dtype, compile=cfg.compile, cache_dir=str(out / "token_cache"),
                          sample_every=0, optim=OptimConfig(), **preset)
    result = pretrain(pcfg)
    timings["pretrain"] = time.perf_counter() - t0

    from .sample import sample
    t0 = time.perf_counter()
    samples = {p: sample(str(out / "base"), p, max_tokens=48, temperature=0.0, device=cfg.device)[0]
               for p in SAMPLE_PROMPTS}
    timings["sample"] = time.perf_counter() - t0

    chat = {}
    for stage, steps, load, lr_scale in (("mid", mid_steps, "base", 1.0), ("sft", sft_steps, "mid", 0.5)):
        t0 = time.perf_counter()
        chat_train(ChatTrainConfig(load=str(out / load), data=CHAT_DATA, save=str(out / stage), stage=stage,
                                   batch_size=16, steps=steps, lr_scale=lr_scale, device=cfg.device, dtype=cfg.dtype,
                                   log_every=10))
        timings[stage] = time.perf_counter() - t0
        t0 = time.perf_counter()
        chat[stage] = _chat_checks(out / stage, cfg.device)
        timings[f"{stage} eval"] = time.perf_counter() - t0

    from .report import speedrun_report
    report = out / "report.md"
    speedrun_report(report, cfg.preset, data, tok_path, result, samples, timings, chat)
    log(f"done: validation bpb {result['val_bpb']}, arithmetic accuracy {chat['mid']['accuracy']:.2f} before SFT "
        f"and {chat['sft']['accuracy']:.2f} after; report at {report}")
    return report


def _chat_checks(run_dir: Path, device: str) -> dict:
    """Held-out arithmetic accuracy (tools on, greedy) and greedy answers to a few prompts."""
    from .checkpoint import load_run
    from .common import choose_device
    from .engine import Engine
    from .evals.generative import generative_accuracy
    from .tasks.arithmetic import Arithmetic
    run = load_run(run_dir, choose_device(device))
    engine = Engine(run.model, run.tokenizer)
    accuracy = generative_accuracy(engine, Arithmetic(**HELD_OUT), max_tokens=48)["accuracy"]
    answers = {}
    for prompt in CHAT_PROMPTS:
        ids = render_for_completion(run.tokenizer, {"messages": [{"role": "user", "content": prompt}]})
        answers[prompt] = engine.generate_batch(ids, max_tokens=48, temperature=0.0)[0].text
    return {"accuracy": accuracy, "answers": answers}
