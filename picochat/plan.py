"""A speedrun's plan, before any of it runs: every stage with its data, steps, tokens and batch;
the datasets there and to download; the parameter count; the memory it needs on this device; and
the wall time each stage should take here, from a few real training steps of the preset's model
timed on this device (train/measure.py).

    plan = make_plan(preset, data_root, device, dtype, measure_steps=1)
    print(plan.describe())

`picochat speedrun --dry-run` prints it and stops; a real run prints it (untimed) before it starts.
Making a plan writes nothing and downloads nothing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .common import PicochatError, first_line, format_count, format_duration
from .data.datasets import DATASETS, HubShards, is_present, shard_files
from .fp8 import fp8_problem
from .lora import LoraConfig
from .memory import GiB, available_memory, estimate_training_memory
from .presets import CHARS_PER_TOKEN, Preset
from .train.pretrain import plan_pretrain
from .train.rl import plan_rl
from .train.sft import plan_chat
from .train.stage import TrainPlan, compiles

# measured on 2 cores (bench/bench_tokenizer.py): the tokenizer trains on about 6 MB of text a
# second and encodes about 3.6 MB a second per core (7.2 on 2 threads)
TOKENIZER_TRAIN_BYTES_PER_S = 6e6
ENCODE_BYTES_PER_S_PER_CORE = 3.6e6
# RL trains on the sampled replies only, about half their cap long; sampling them costs about two
# training passes over the same tokens (the tiny preset's RL on 2 CPU cores: 46 s measured, 61 s
# estimated so); rough, and rougher on an accelerator
RL_REPLY_FRACTION = 0.5
RL_SAMPLING_FACTOR = 2.0


@dataclass
class StagePlan:
    """A row of the plan: a stage, what it reads, its TrainPlan (the one the stage itself will
    derive), the tokens it trains on and the time it should take here."""
    name: str
    reads: str
    train: TrainPlan | None  # None: the tokenizer
    tokens: int | None = None  # trained on, about (None: not known before the data is there)
    batch: str = ""
    seconds: float | None = None
    note: str = ""
    estimated: bool = False  # steps from an estimate of the data's tokens (the tokenizer does not exist yet)

    @property
    def steps(self) -> int | None:
        return self.train.steps if self.train is not None else None


@dataclass
class Fit:
    """Whether a stage's micro-batch fits this device, and with which switch."""
    rows: int
    seq_len: int
    plain: int  # bytes without --grad-checkpoint
    checkpointed: int  # with it
    available: int | None
    where: str = "this device"  # or "it": a device the plan was not made on

    @property
    def grad_checkpoint(self) -> bool:
        """Switch recomputation on when only it makes the stage fit."""
        return self.available is not None and self.plain > self.available and self.checkpointed <= self.available

    @property
    def fits(self) -> bool:
        return self.available is None or min(self.plain, self.checkpointed) <= self.available

    def describe(self) -> str:
        have = "unknown" if self.available is None else f"{self.available / GiB:.1f} GiB"
        need = f"{self.plain / GiB:.1f} GiB ({self.checkpointed / GiB:.1f} GiB with --grad-checkpoint); " \
               f"{self.where} has {have}"
        if self.available is None:
            return need
        if self.plain <= self.available:
            return need + ": fits"
        if self.grad_checkpoint:
            return need + ": fits with --grad-checkpoint, which the speedrun switches on"
        return need + ": DOES NOT FIT (a bigger machine, or a smaller preset)"


def memory_fit(preset: Preset, rows: int, seq_len: int, device: torch.device, dtype: torch.dtype, world: int = 1,
               available: int | None = None, lora: LoraConfig | None = None, compiled: bool = False) -> Fit:
    """The stage's micro-batch on `device` (the optimizer's state shared by `world` processes;
    with `lora`, adapters on the frozen model; `compiled` or eager), against the memory it has (or
    `available` bytes)."""
    config = preset.model_config()
    plain, ckpt = (estimate_training_memory(config, rows, seq_len, dtype, g, world, lora, device_type=device.type,
                                            compiled=compiled).total for g in (False, True))
    if available is None:
        return Fit(rows, seq_len, plain, ckpt, available_memory(device))
    return Fit(rows, seq_len, plain, ckpt, available, where="it")


GPU_BYTES = 80 * 10 ** 9  # an H100's, for the plan of a GPU preset made elsewhere
# what Metal lets a 16 GB Apple-silicon Mac's GPU hold (its recommendedMaxWorkingSetSize, which
# torch.mps.recommended_max_memory reports and the memory check uses there): about two thirds
MAC_BYTES = 16 * GiB * 2 // 3


@dataclass
class DataStatus:
    name: str
    present: bool
    detail: str
    download_mb: float = 0.0


def data_status(preset: Preset, root: Path) -> list[DataStatus]:
    """Every dataset the preset reads, with what is there and what a run would download."""
    out = []
    for name in preset.datasets(evals=True):
        d = DATASETS[name]
        if isinstance(d.source, HubShards):
            have = len(shard_files(name, root))
            missing = max(0, preset.shards - have)
            detail = f"{preset.shards} shards; {have} here" + (f", {missing} to download" if missing else "")
            out.append(DataStatus(name, missing == 0, detail, missing * d.mb))
        else:
            here = is_present(name, root)
            out.append(DataStatus(name, here, "here" if here else "to download", 0.0 if here else d.mb))
    return out


def mixture_size(spec: str, seed: int = 42) -> tuple[int, float]:
    """(examples in one pass, mean tokens per example, estimated from characters) of a mixture."""
    from .tasks.mixture import build_mixture
    mixture = build_mixture(spec, split="train", seed=seed)
    n = len(mixture)
    take = range(0, n, max(1, n // 2000))
    chars = [sum(len(m.get("content") or "") for m in ex.get("messages", [])) + len(ex.get("text", ""))
             for ex in (mixture[i] for i in take)]
    return n, sum(chars) / max(1, len(chars)) / CHARS_PER_TOKEN + 8  # + the special tokens of each turn


@dataclass
class Plan:
    preset: Preset
    device: torch.device
    dtype: torch.dtype
    world: int
    data_root: Path
    data: list[DataStatus]
    stages: list[StagePlan]
    fits: dict[str, Fit]
    timing: str = ""  # how the times were measured, or why not
    # a preset planned on another device than it is meant for: its fits there, under a heading
    # ("on one 80 GB CUDA GPU (bf16)": the downloading presets; "on a 16 GB Apple-silicon Mac": the Mac's)
    elsewhere: dict[str, dict[str, Fit]] = field(default_factory=dict)
    evals: list[str] = field(default_factory=list)
    next: str = ""  # the command that runs it

    @property
    def download_mb(self) -> float:
        return sum(d.download_mb for d in self.data)

    def describe(self) -> str:
        p, c = self.preset, self.preset.model_config()
        dtype = str(self.dtype).removeprefix("torch.")
        lines = [f"plan: preset {p.name}: {p.about}",
                 f"  model     depth {c.n_layer}, width {c.n_embd}, {c.n_head}/{c.n_kv_head} heads, context "
                 f"{c.sequence_len:,}, vocab {c.vocab_size:,}, windows {c.window_pattern}: {p.params:,} parameters "
                 f"({p.params / 1e6:.1f}M)",
                 f"  device    {self.device.type}, {dtype}" + (f", {self.world} processes" if self.world > 1 else "")]
        if p.fp8:  # the preset's preference; --fp8 / --no-fp8 decide otherwise
            problem = fp8_problem(self.device)
            lines[-1] += ", pretraining in FP8" if problem is None else f", pretraining in bf16 (not FP8: {problem})"
        if self.data:
            lines.append(f"  data dir  {self.data_root}")
            for d in self.data:
                size = f" ({_mb(d.download_mb)})" if d.download_mb else ""
                lines.append(f"    {d.name:<12} {d.detail}{size}")
            if self.download_mb:
                lines.append(f"    to download: {_mb(self.download_mb)}")
        lines.append("  stages")
        width = max(len(s.reads) for s in self.stages)
        for s in self.stages:
            steps = ("" if s.name == "tokenizer" else f"{'~' if s.estimated else ''}{s.steps:,} steps"
                     if s.steps is not None else "one pass")
            tokens = f"{format_count(s.tokens)} tokens" if s.tokens else ""
            time_ = f"~{format_duration(s.seconds)}" if s.seconds is not None else ""
            lines.append(f"    {s.name:<9} {s.reads:<{width}}  {steps:>13}  {tokens:>14}  {s.batch:<26} {time_:>9}"
                         .rstrip())
            if s.note:
                lines.append(f"              {s.note}")
        total = [s.seconds for s in self.stages if s.seconds is not None]
        if total and len(total) == len(self.stages):
            lines.append(f"    total about {format_duration(sum(total))} of compute here, not counting evals and "
                         "downloads")
        if self.evals:
            lines.append(f"  evals     {', '.join(self.evals)}")
        lines.append("  memory")
        for stage, fit in self.fits.items():
            lines.append(f"    {stage:<9} {fit.rows} x {fit.seq_len:,} rows: {fit.describe()}")
        for heading, fits in self.elsewhere.items():
            lines.append(f"  {heading}")
            for stage, fit in fits.items():
                lines.append(f"    {stage:<9} {fit.rows} x {fit.seq_len:,} rows: {fit.describe()}")
        if self.timing:
            lines.append(f"  time      {self.timing}")
        return "\n".join(lines)


def _mb(mb: float) -> str:
    return f"{mb / 1000:.1f} GB" if mb >= 1000 else f"{mb:.0f} MB" if mb >= 10 else f"{mb:.1f} MB"


def make_plan(preset: Preset, data_root: Path, device: torch.device, dtype: torch.dtype, world: int = 1,
              measure_steps: int = 0, text_chars: int | None = None, own_text: bool = False) -> Plan:
    """The plan of `preset` on this device: each stage's TrainPlan made by the stage's own planner
    from the config the speedrun will run (Preset.configs). measure_steps > 0 times that many real
    training steps of the preset's model here for the wall-time column; text_chars: the
    pretraining text's size when it is the user's own (own_text) or the offline corpus (None: the
    preset's shards)."""
    data = data_status(preset, data_root) if preset.downloads else []
    here = all(d.present for d in data)
    configs = preset.configs(Path("."), data_root, world)
    context = preset.pretrain.seq_len
    pre = plan_pretrain(configs["pretrain"], preset.model_config(), world)
    trains = {"pretrain": pre}
    chats = [name for name in ("mid", "sft") if name in configs]
    for name in chats:
        trains[name] = plan_chat(configs[name], context, world, None)
    if "rl" in configs:
        trains["rl"] = plan_rl(configs["rl"], context, world)
    def fits_on(device, dtype, available=None):
        return {name: memory_fit(preset, t.rows, t.seq_len, device, dtype, world, available,
                                 getattr(configs[name], "adapters", None), compiles(configs[name], device))
                for name, t in trains.items()}
    fits = fits_on(device, dtype)
    elsewhere = {}
    if device.type != "cuda" and preset.downloads and preset.mps_dtype == "auto":
        elsewhere["on one 80 GB CUDA GPU (bf16)"] = fits_on(torch.device("cuda"), torch.bfloat16, GPU_BYTES)
    if device.type != "mps" and preset.mps_dtype != "auto":
        elsewhere[f"on a 16 GB Apple-silicon Mac ({preset.mps_dtype}; Metal lets its GPU hold "
                  f"{MAC_BYTES / GiB:.1f} GiB)"] = fits_on(
            torch.device("mps"), torch.bfloat16 if preset.mps_dtype == "bf16" else torch.float32, MAC_BYTES)

    timing, per_token, opt = "", None, None
    if measure_steps:
        timing, per_token, opt = _measure(preset, device, dtype, measure_steps, fits["pretrain"])

    def cost(tokens: float | None, steps: int | None) -> float | None:
        if per_token is None or tokens is None or steps is None:
            return None
        return (tokens * per_token + steps * opt) / world

    stages = []
    chars = text_chars if text_chars is not None else preset.shards * DATASETS[preset.pretrain_data].source.chars_per_shard
    tok_chars = min(chars, preset.tokenizer_chars)
    text = "your text" if own_text else preset.pretrain_data
    stages.append(StagePlan("tokenizer", f"{format_count(tok_chars)} chars of {text}", None, None,
                            f"vocab {preset.pretrain.vocab_size:,}", tok_chars / TOKENIZER_TRAIN_BYTES_PER_S,
                            note="then pretraining tokenizes its text first: "
                                 f"~{format_duration(chars / (ENCODE_BYTES_PER_S_PER_CORE * (os.cpu_count() or 1)))}"))
    budget = configs["pretrain"]
    stages.append(StagePlan("pretrain", text, pre, pre.tokens, f"{pre.rows} x {pre.seq_len:,} x {pre.grad_accum}"
                            f"{f' x {world}' if world > 1 else ''} = {pre.tokens_per_step:,}",
                            cost(pre.tokens, pre.steps),
                            f"nanochat's budget: {budget.tokens_params_ratio:g} tokens per matrix and head parameter; "
                            f"learning rates x{pre.lr_scale:.3f}, weight decay x{pre.wd_scale:.3f}"
                            if budget.budget == "nanochat" else ""))
    for name in chats:
        cfg, train = configs[name], trains[name]
        tokens, note, estimated = train.tokens, "", False
        if here:
            try:
                n, mean = mixture_size(cfg.data, cfg.controls.seed)
            except PicochatError as e:
                n, mean, note = 0, 0.0, f"cannot read its data: {first_line(e)}"
            if n and cfg.packed:  # packed rows of the mixture's tokens, estimated from its characters
                train = plan_chat(cfg, context, world, n * mean / (train.seq_len + 1))
                tokens, estimated = train.tokens, not cfg.steps
            elif n:  # one conversation per row, padded: the steps are exact, the tokens about
                train = plan_chat(cfg, context, world, n)
                tokens = int(train.steps * train.rows_per_step * min(mean, train.seq_len))
            note = note or (f"{n:,} examples a pass" if n else "")
        trains[name] = train
        stages.append(StagePlan(name, _short(cfg.data), train, tokens,
                                f"{train.rows} x {train.seq_len:,}" + (f" x {train.grad_accum}" if train.grad_accum > 1
                                                                       else ""),
                                cost(tokens, train.steps), note, estimated))
    if "rl" in configs:
        cfg, train = configs["rl"], trains["rl"]
        tokens = int(train.steps * train.rows_per_step * cfg.max_tokens * RL_REPLY_FRACTION)
        stages.append(StagePlan("rl", _short(cfg.task), train, tokens,
                                f"{cfg.prompts_per_step} prompts x {cfg.group_size} samples",
                                cost(tokens * (1 + RL_SAMPLING_FACTOR), train.steps),
                                "sampling counted as two training passes: rough"))
    return Plan(preset, device, dtype, world, data_root, data, stages, fits, timing, elsewhere, preset.eval_names())


def _short(spec: str) -> str:
    """A mixture spec without its paths: "smoltalk:{data}/smoltalk:=10000,gsm8k::1" -> "smoltalk =10000,
    gsm8k 1"."""
    items = [item.split(":") for item in spec.split(",")]
    return ", ".join(f"{parts[0]} {parts[-1]}" if len(parts) > 1 else parts[0] for parts in items)


def _measure(preset: Preset, device: torch.device, dtype: torch.dtype, steps: int, fit: Fit):
    """(what was measured, seconds per trained token, seconds per optimizer update), or a reason
    and Nones. On a CPU a micro-batch of about 2K tokens is timed (the time grows with the rows), on an
    accelerator the preset's own micro-batch; the time per token is taken to stay the same for
    the preset's own micro-batch."""
    from .train.measure import time_training_step
    seq_len, batch = preset.pretrain.seq_len, preset.pretrain.batch_size
    # a CPU: rows enough for about 2K tokens (its throughput flattens out there), nothing to warm up
    rows, warmup = (min(batch, max(1, 2048 // seq_len)), 0) if device.type == "cpu" else (batch, 1)
    small = memory_fit(preset, rows, seq_len, device, dtype)
    if not small.fits:
        return (f"not measured: even one {rows} x {seq_len:,} step needs {small.checkpointed / GiB:.1f} GiB, "
                f"more than this device's {small.available / GiB:.1f} GiB"), None, None
    try:
        t, _ = time_training_step(preset.model_config(), rows, device, dtype, steps=steps, warmup=warmup,
                                  grad_checkpoint=small.grad_checkpoint or fit.grad_checkpoint)
    except (RuntimeError, torch.OutOfMemoryError) as e:
        return f"not measured: one step failed here ({first_line(e)})", None, None
    return (f"from {steps} timed step(s) of {rows} x {seq_len:,} tokens here"
            + (" after one warm-up" if warmup else "") + ": "
            f"{t.step_seconds:.2f} s/step, {rows * seq_len / t.step_seconds:,.0f} tok/s, MFU "
            f"{100 * t.mfu:.0f}%, optimizer {t.optimizer_seconds:.2f} s"), t.seconds_per_token, t.optimizer_seconds
