"""Midtraining and supervised fine-tuning: a run dir plus chat tasks -> a chat model in a new run dir.

Both render conversations with their loss masks (only the assistant's words, tool calls and
end-of-turn are targets) and train through the same loop as pretraining. They differ in batching
by default (--packed says which):
- midtrain packs conversations into full rows like pretraining (best-fit, BOS-aligned), so every
  token of compute carries text: it teaches the chat format and tool use cheaply (nanochat's SFT
  at HEAD packs too);
- sft gives each conversation its own row, padded to the longest in the batch, so no position
  attends across two conversations; padding is never a target.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import ClassVar

from ..common import PicochatError, log, seed_everything
from ..conversation import describe_cuts, render_example
from ..data.loader import PackingLoader, TokenDataset
from ..lora import LoraConfig
from ..memory import check_training_memory
from ..optim import OptimConfig, scale_lrs
from ..run_dir import load_run
from ..settings import check, setting
from ..tasks import build_mixture, parse_mixture
from .rows import EpochOrder, pad_rows
from .stage import Controls, Stage, TrainPlan, compiles, one_pass


def _chat_optim() -> OptimConfig:
    return OptimConfig(warmdown_frac=1.0)  # a fine-tune decays to zero over the whole stage


PACKED_HELP = ("pack conversations into full rows (best-fit, BOS-aligned, as pretraining packs text) instead of "
               "one a row, padded")


@dataclass
class ChatTrainConfig:
    """What midtraining and SFT share; MidtrainConfig and SFTConfig give each its defaults."""
    stage: ClassVar[str]
    load: str = setting(help="run dir to start from", defines_run=False)
    data: str = setting(help='the chat tasks to train on, a mixture: task[:path][:weight],... e.g. '
                             '"gsm8k:train.jsonl:1,arithmetic::0.5,chat.jsonl:2"')
    save: str = setting(help="run dir to write", defines_run=False)
    seq_len: int = setting(0, "longest row in tokens (default: the model's context)", low=0)
    batch_size: int = setting(8, "rows per micro-batch", low=1)
    grad_accum: int = setting(1, "micro-batches per optimizer step", low=1)
    steps: int = setting(0, "optimizer steps (default: one pass over the mixture)", low=0)
    lr_scale: float = setting(1.0, "multiplies the learning rates", low=0)
    packed: bool = setting(False, PACKED_HELP)
    optim: OptimConfig = setting(factory=_chat_optim, flags=())
    adapters: LoraConfig = setting(factory=LoraConfig)
    controls: Controls = setting(factory=Controls)


@dataclass
class MidtrainConfig(ChatTrainConfig):
    stage: ClassVar[str] = "mid"
    packed: bool = setting(True, PACKED_HELP)


@dataclass
class SFTConfig(ChatTrainConfig):
    stage: ClassVar[str] = "sft"
    # 10x gentler than midtraining: a fine-tune on a few thousand conversations should not undo
    # what the model knows (the CLI's default all along; the Python default used to be 1.0)
    lr_scale: float = setting(0.1, "multiplies the learning rates", low=0)


class PaddedConversations:
    """One conversation per row, in a seeded order that changes every epoch; resumable. Each call
    takes the global batch of batch_size * world_size conversations and returns rank `rank`'s
    rows, so the data does not depend on how many processes share it."""

    def __init__(self, task, tok, batch_size: int, seq_len: int, seed: int, rank: int = 0, world_size: int = 1):
        self.task, self.tok, self.batch_size, self.seq_len = task, tok, batch_size, seq_len
        self.rank, self.world_size = rank, world_size
        self.order = EpochOrder(len(task), seed)
        self.cuts: Counter = Counter()  # conversations cut to fit, counted as they are rendered (said at the end)
        self.rendered = 0

    def state_dict(self) -> dict:
        return self.order.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.order.load_state_dict(state)

    def next_batch(self):
        picks = self.order.take(self.batch_size * self.world_size)
        mine = picks[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
        rows = [render_example(self.tok, self.task[i], max_tokens=self.seq_len + 1, cuts=self.cuts)
                for i in mine]
        self.rendered += len(rows)
        return pad_rows(rows, self.tok.bos_id)


def _check_inputs(cfg: ChatTrainConfig) -> None:
    check(cfg)
    if not Path(cfg.load).is_dir():
        what = "a file, not a run dir" if Path(cfg.load).exists() else "no such run dir"
        raise PicochatError(f"--load {cfg.load}: {what}")
    parse_mixture(cfg.data)  # every task known, every path there


def plan_chat(cfg: ChatTrainConfig, context: int, world: int, rows_per_pass: float | None) -> TrainPlan:
    """Steps of --batch-size x --grad-accum rows from every process: --steps, or one pass over
    `rows_per_pass` rows (one a conversation; packed: rows of the mixture's tokens; None while
    that is not known, in a speedrun's plan)."""
    seq_len = cfg.seq_len or context
    if seq_len > context:
        raise PicochatError(f"--seq-len {seq_len} is longer than the model's context ({context})")
    per_step = cfg.batch_size * cfg.grad_accum * world
    steps = cfg.steps or (one_pass(rows_per_pass, per_step) if rows_per_pass is not None else None)
    return TrainPlan(steps, cfg.batch_size, seq_len, cfg.grad_accum, world)


def chat_train(cfg: ChatTrainConfig) -> dict:
    """`picochat midtrain` and `picochat sft`."""
    _check_inputs(cfg)
    stage = Stage(cfg.stage, cfg)
    cfg = stage.restored(cfg)
    if stage.resumed is not None:
        model, tok = stage.resumed.model, stage.resumed.tokenizer
    else:
        source = load_run(cfg.load, stage.device)
        model, tok = source.model, source.tokenizer
        seed_everything(cfg.controls.seed)
    context = model.config.sequence_len
    seq_len = plan_chat(cfg, context, stage.world, None).seq_len
    model.grad_checkpoint = cfg.controls.grad_checkpoint
    if not cfg.packed and cfg.controls.compile is not False:  # each batch its own width: every step would recompile
        if cfg.controls.compile:
            log(f"{cfg.stage}: --compile is for packed rows of a fixed width; padded ones vary, so it trains without")
        cfg = replace(cfg, controls=replace(cfg.controls, compile=False))
    check_training_memory(model.config, cfg.batch_size, seq_len, stage.dtype, cfg.controls.grad_checkpoint,
                          stage.device, cfg.adapters, compiled=compiles(cfg, stage.device))
    task = build_mixture(cfg.data, split="train", seed=cfg.controls.seed)
    if cfg.packed:
        cuts = Counter()
        rendered = [render_example(tok, task[i], max_tokens=seq_len + 1, cuts=cuts) for i in range(len(task))]
        if cuts:
            log(f"{cfg.stage}: {describe_cuts(cuts, len(task), seq_len + 1)}")
        dataset = TokenDataset.from_sequences(rendered, tok.bos_id)
        data = PackingLoader(dataset, "all", cfg.batch_size, seq_len, seed=cfg.controls.seed, rank=stage.rank,
                             world_size=stage.world)
        rows_per_pass = dataset.num_tokens / (seq_len + 1)
    else:
        data = PaddedConversations(task, tok, cfg.batch_size, seq_len, cfg.controls.seed, stage.rank, stage.world)
        rows_per_pass = len(task)
    plan = plan_chat(cfg, context, stage.world, rows_per_pass)
    log(f"{cfg.stage}: {len(task):,} conversations from {cfg.data!r}, {plan.steps} steps of "
        f"{plan.rows_per_step} rows{f' over {stage.world} processes' if stage.world > 1 else ''}, from {cfg.load}")
    result = stage.train(cfg, model, tok, data, scale_lrs(cfg.optim, cfg.lr_scale), plan, lora=cfg.adapters)
    if not cfg.packed and data.cuts:
        log(f"{cfg.stage}: {describe_cuts(data.cuts, data.rendered, seq_len + 1)}")
    return result
