"""Midtraining and supervised fine-tuning: a run dir plus chat tasks -> a chat model in a new run dir.

Both render conversations with their loss masks (only the assistant's words, tool calls and
end-of-turn are targets) and train through the same loop as pretraining. They differ in batching:
- midtrain packs conversations into full rows like pretraining (best-fit, BOS-aligned), so every
  token of compute carries text: it teaches the chat format and tool use cheaply;
- sft gives each conversation its own row, padded to the longest in the batch, so no position
  attends across two conversations; padding is never a target.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ..checkpoint import load_run
from ..common import PicochatError, log, seed_everything
from ..conversation import render_conversation
from ..data.loader import PackingLoader, TokenDataset
from ..memory import check_training_memory
from ..optim import OptimConfig, scale_lrs
from ..tasks import build_mixture
from .loop import LoopConfig, restore_settings, run_stage, stage_meta, start_stage


@dataclass
class ChatTrainConfig:
    load: str  # the run dir to start from (a base model, or a midtrained one)
    data: str  # a task mixture, e.g. "gsm8k:train.jsonl:1,arithmetic::0.5"
    save: str
    stage: str = "sft"  # "mid" (packed rows) or "sft" (one conversation per row)
    seq_len: int = 0  # 0: the model's context
    batch_size: int = 8  # rows per micro-batch
    grad_accum: int = 1
    steps: int = 0  # 0: one pass over the mixture
    lr_scale: float = 1.0  # multiplies every base learning rate of `optim`
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(warmdown_frac=1.0))
    device: str = "auto"
    dtype: str = "auto"
    compile: bool = False
    grad_checkpoint: bool = False
    seed: int = 42
    save_every: int = 0
    log_every: int = 1
    stop_at: int = 0
    resume: bool = False
    overwrite: bool = False


class PaddedConversations:
    """One conversation per row, in a seeded order that changes every epoch; resumable. Each call
    takes the global batch of batch_size * world_size conversations and returns rank `rank`'s
    rows, so the data does not depend on how many processes share it."""

    def __init__(self, task, tok, batch_size: int, seq_len: int, seed: int, rank: int = 0, world_size: int = 1):
        self.task, self.tok, self.batch_size, self.seq_len, self.seed = task, tok, batch_size, seq_len, seed
        self.rank, self.world_size = rank, world_size
        self.epoch, self.cursor = 0, 0
        self._order = self._epoch_order(0)

    def _epoch_order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.task))

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.cursor = state["epoch"], state["cursor"]
        self._order = self._epoch_order(self.epoch)

    def next_batch(self):
        picks = []
        while len(picks) < self.batch_size * self.world_size:
            if self.cursor == len(self._order):
                self.epoch, self.cursor = self.epoch + 1, 0
                self._order = self._epoch_order(self.epoch)
            picks.append(int(self._order[self.cursor]))
            self.cursor += 1
        mine = picks[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
        rows = [render_conversation(self.tok, self.task[i], max_tokens=self.seq_len + 1) for i in mine]
        width = max(len(ids) for ids, _ in rows) - 1
        x = torch.full((self.batch_size, width), self.tok.bos_id, dtype=torch.long)
        y = torch.full((self.batch_size, width), -1, dtype=torch.long)
        for r, (ids, mask) in enumerate(rows):
            ids_t = torch.tensor(ids)
            x[r, :len(ids) - 1] = ids_t[:-1]
            y[r, :len(ids) - 1] = torch.where(torch.tensor(mask[1:]) == 1, ids_t[1:], -1)
        return x, y


def chat_train(cfg: ChatTrainConfig) -> dict:
    """`picochat midtrain` and `picochat sft`."""
    if cfg.stage not in ("mid", "sft"):
        raise PicochatError(f"unknown chat training stage {cfg.stage!r} (mid or sft)")
    device, dtype, rank, world, run = start_stage(cfg)
    if run is not None:
        restore_settings(cfg, run, ("data", "stage", "seq_len", "batch_size", "grad_accum", "steps", "seed",
                                    "lr_scale"))
        model, tok = run.model, run.tokenizer
    else:
        source = load_run(cfg.load, device)
        model, tok = source.model, source.tokenizer
        seed_everything(cfg.seed)
    cfg.seq_len = cfg.seq_len or model.config.sequence_len
    if cfg.seq_len > model.config.sequence_len:
        raise PicochatError(f"--seq-len {cfg.seq_len} is longer than the model's context "
                            f"({model.config.sequence_len})")
    model.grad_checkpoint = cfg.grad_checkpoint
    check_training_memory(model.config, cfg.batch_size, cfg.seq_len, dtype, cfg.grad_checkpoint, device)
    task = build_mixture(cfg.data, split="train", seed=cfg.seed)
    if cfg.stage == "mid":
        rendered = [render_conversation(tok, task[i], max_tokens=cfg.seq_len + 1) for i in range(len(task))]
        dataset = TokenDataset.from_sequences(rendered, tok.bos_id)
        data = PackingLoader(dataset, "all", cfg.batch_size, cfg.seq_len, seed=cfg.seed, rank=rank, world_size=world)
        rows_per_epoch = dataset.num_tokens / (cfg.seq_len + 1)
    else:
        data = PaddedConversations(task, tok, cfg.batch_size, cfg.seq_len, cfg.seed, rank, world)
        rows_per_epoch = len(task)
    rows_per_step = cfg.batch_size * cfg.grad_accum * world
    if not cfg.steps:
        cfg.steps = max(1, round(rows_per_epoch / rows_per_step))
    log(f"{cfg.stage}: {len(task):,} conversations from {cfg.data!r}, {cfg.steps} steps of "
        f"{rows_per_step} rows{f' over {world} processes' if world > 1 else ''}, from {cfg.load}")

    optim = scale_lrs(cfg.optim, cfg.lr_scale)
    loop = LoopConfig(steps=cfg.steps, grad_accum=cfg.grad_accum, log_every=cfg.log_every,
                      save_every=cfg.save_every, stop_at=cfg.stop_at)
    return run_stage(model, tok, data, optim, loop, save=cfg.save, stage=cfg.stage, meta=stage_meta(cfg),
                     device=device, dtype=dtype, compile=cfg.compile and cfg.stage == "mid", run=run)
