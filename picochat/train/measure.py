"""A few real training steps of a model on random tokens, timed: what a run's plan bases its wall
time on (speedrun --dry-run) and what bench/bench_train.py reports. The step is the real one
(Trainer.train_step: forward, backward, Muon + AdamW), so the numbers are the ones a run will see,
less the data loading, which is not the bottleneck of a packed token stream."""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass

import torch

from ..config import ModelConfig
from ..model import GPT, flops_per_token
from ..optim import OptimConfig, build_optimizer
from .loop import LoopConfig, Trainer


class RandomTokens:
    """A data source of uniformly random token rows (timing only: what the tokens are does not
    change the work)."""

    def __init__(self, batch: int, seq: int, vocab: int):
        self.g = torch.Generator().manual_seed(0)
        self.shape, self.vocab = (batch, seq + 1), vocab

    def next_batch(self):
        row = torch.randint(0, self.vocab, self.shape, generator=self.g)
        return row[:, :-1], row[:, 1:]

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


@dataclass
class StepTiming:
    rows: int  # per micro-batch
    seq_len: int
    step_seconds: float  # one optimizer step of one micro-batch (median)
    optimizer_seconds: float  # of which the optimizer's update
    warmup_seconds: float  # the first steps (allocation, compilation)
    mfu: float  # of the step, against common.peak_flops

    @property
    def seconds_per_token(self) -> float:
        """Forward and backward, per token."""
        return (self.step_seconds - self.optimizer_seconds) / (self.rows * self.seq_len)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def time_training_step(config: ModelConfig, rows: int, device: torch.device, dtype: torch.dtype, steps: int = 2,
                       warmup: int = 1, accum: int = 1, grad_checkpoint: bool = False, compile: bool = False,
                       optim: OptimConfig | None = None, fp8: bool = False) -> tuple[StepTiming, int]:
    """Time `steps` optimizer steps (after `warmup`) of a fresh model of `config` training on
    `rows` x config.sequence_len micro-batches, `accum` per step. Returns the timing and the
    model's parameter count; the model is freed."""
    torch.manual_seed(0)
    with torch.device(device):
        model = GPT(config)
    model.grad_checkpoint = grad_checkpoint
    optim = optim or OptimConfig()
    trainer = Trainer(model, build_optimizer(model, optim), optim, LoopConfig(steps=10 ** 9, grad_accum=accum),
                      device, dtype, flops_per_token=flops_per_token(config), compile=compile, fp8=fp8)
    opt_seconds: list[float] = []
    step = trainer.optimizer.step

    def timed_step():
        sync(device)
        t = time.perf_counter()
        step()
        sync(device)
        opt_seconds.append(time.perf_counter() - t)

    trainer.optimizer.step = timed_step
    data = RandomTokens(rows, config.sequence_len, config.vocab_size)
    t0 = time.perf_counter()
    for _ in range(warmup):
        float(trainer.train_step(data)[0])
    warm = time.perf_counter() - t0
    opt_seconds.clear()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        float(trainer.train_step(data)[0])  # reading the loss syncs the device
        times.append(time.perf_counter() - t0)
    dt = sorted(times)[len(times) // 2]
    tokens = rows * config.sequence_len * accum
    params = model.num_params()
    timing = StepTiming(rows=rows * accum, seq_len=config.sequence_len, step_seconds=dt,
                        optimizer_seconds=sorted(opt_seconds)[len(opt_seconds) // 2], warmup_seconds=warm,
                        mfu=flops_per_token(config) * tokens / dt / trainer.peak)
    del trainer, model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return timing, params
