"""`picochat speedrun`: the whole pipeline in one command.

With no flags it needs no network and no data: it builds a corpus from the text this machine
already has (the installed Python's documentation and docstrings), trains a tokenizer on it,
pretrains a tiny model, measures validation bits per byte, samples, and writes a report.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from .common import PicochatError, log
from .optim import OptimConfig
from .tokenizer import train_tokenizer
from .train.pretrain import PretrainConfig, pretrain

# name -> pretraining settings. tiny is sized for ~15 minutes on 2 CPU cores in fp32.
PRESETS: dict[str, dict] = {
    "tiny": dict(depth=4, seq_len=256, vocab_size=4096, batch_size=16, total_batch_tokens=8192, steps=200,
                 eval_every=25, eval_tokens=32768),
    "small": dict(depth=6, seq_len=512, vocab_size=8192, batch_size=16, total_batch_tokens=32768, steps=1000,
                  eval_every=100),
    "d8": dict(depth=8, seq_len=1024, vocab_size=32768, batch_size=16, total_batch_tokens=131072, steps=0,
               eval_every=250),
    "d12": dict(depth=12, seq_len=2048, vocab_size=65536, batch_size=16, total_batch_tokens=524288, steps=0,
                eval_every=250),
    "d20": dict(depth=20, seq_len=2048, vocab_size=65536, batch_size=32, total_batch_tokens=524288, steps=0,
                eval_every=250),
}
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

    from .report import speedrun_report
    from .sample import sample
    t0 = time.perf_counter()
    samples = {p: sample(str(out / "base"), p, max_tokens=48, temperature=0.0, device=cfg.device)[0]
               for p in SAMPLE_PROMPTS}
    timings["sample"] = time.perf_counter() - t0
    report = out / "report.md"
    speedrun_report(report, cfg.preset, data, tok_path, result, samples, timings)
    log(f"done: validation bpb {result['val_bpb']}, report at {report}")
    return report
