"""The one training loop: every stage (pretrain, midtrain, SFT, RL) runs its steps through here.

A stage supplies a data source (next_batch / state_dict / load_state_dict), a loss function, and
callbacks for evaluation, sampling and saving; the loop owns gradient accumulation, the LR and
momentum schedules, timing, MFU, metrics, progress and checkpoint cadence.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import torch

from .. import distributed
from ..common import (PicochatError, Progress, autocast, choose_device, choose_dtype, first_line, log, peak_flops,
                      set_threads)
from ..model import PACKED_WEIGHTS
from ..optim import OptimConfig, lr_multiplier, muon_momentum


class DataSource(Protocol):
    def next_batch(self): ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...
    # optional: def step_stats(self) -> dict: numbers merged into each step's metric row and
    # progress line (called once per step, after its micro-batches)


def lm_loss(model, batch) -> torch.Tensor:
    """Summed next-token loss of an (inputs, targets) batch. Targets of -1 (padding, masked turns)
    are ignored."""
    x, y = batch
    return model(x, y, loss_reduction="sum")


def lm_count(batch) -> int:
    """How many targets of a batch count: the loop divides the step's summed loss by the total,
    so micro-batches with different numbers of real tokens weigh right."""
    return int((batch[1] != -1).sum())


@dataclass
class LoopConfig:
    steps: int
    grad_accum: int = 1
    log_every: int = 1
    eval_every: int = 0  # 0: only at the end
    sample_every: int = 0  # 0: never during training
    save_every: int = 0  # 0: only at the end
    stop_at: int = 0  # stop (and save) after this step, to resume later; 0: run to the end


@dataclass
class Callbacks:
    save: Callable[[int, dict, list], None]  # (step, trainer_state, metrics) -> writes the run dir
    evaluate: Callable[[], dict] | None = None  # -> {"val_bpb": ...}
    sample: Callable[[], str] | None = None


class Trainer:
    def __init__(self, model, optimizer, optim_cfg: OptimConfig, loop: LoopConfig, device, dtype,
                 flops_per_token: float, compile: bool = False):
        self.model, self.optimizer, self.optim_cfg, self.loop = model, optimizer, optim_cfg, loop
        self.device, self.dtype = device, dtype
        self.flops_per_token = flops_per_token
        self.peak = peak_flops(device, dtype) * distributed.world_size()
        distributed.broadcast_params(model)
        self.train_model = torch.compile(model, dynamic=False) if compile else model
        self.compiled_once = False  # a compiled micro-batch has run (see _forward_backward)
        self.step = 0
        self.elapsed = 0.0  # training seconds, excluding evaluation and checkpoints
        self.metrics: list[dict] = []

    # ------------------------------------------------------------------ resume
    def state_dict(self, data: DataSource) -> dict:
        """Exact-resume state. The optimizer state is the same on every rank; the data position
        and RNG may not be (RL's rollouts are per rank), so every rank's are kept."""
        mine = {"data": data.state_dict(), "rng": torch.get_rng_state()}
        return {"step": self.step, "elapsed": self.elapsed, "optimizer": self.optimizer.state_dict(),
                "ranks": distributed.all_gather_objects(mine)}

    def load_state_dict(self, state: dict, data: DataSource, metrics: list[dict]) -> None:
        ranks = state.get("ranks") or [{"data": state["data"], "rng": state["rng"]}]  # before torchrun support
        if len(ranks) != distributed.world_size():
            raise PicochatError(f"this run dir was written by {len(ranks)} process(es); resume it with as many "
                                f"(torchrun --nproc_per_node {len(ranks)}), not {distributed.world_size()}")
        self.step, self.elapsed = state["step"], state["elapsed"]
        self.optimizer.load_state_dict(state["optimizer"])
        mine = ranks[distributed.rank()]
        data.load_state_dict(mine["data"])
        torch.set_rng_state(mine["rng"])
        # the metrics file may hold lines logged after the checkpoint: they are replayed anyway
        self.metrics = [m for m in metrics if m.get("step", 0) <= self.step]

    # ------------------------------------------------------------------ the loop
    def train_step(self, data: DataSource, loss_fn=lm_loss, count_fn=lm_count) -> tuple[torch.Tensor, int]:
        """One optimizer step over grad_accum micro-batches. Returns (mean loss per token, tokens),
        the loss still on the device so that reading it is the caller's choice of sync."""
        cfg = self.optim_cfg
        self.optimizer.set_schedule(
            lr_multiplier(self.step, self.loop.steps, cfg.warmup_frac, cfg.warmdown_frac, cfg.final_lr_frac),
            muon_momentum(self.step, cfg))
        batches = [data.next_batch() for _ in range(self.loop.grad_accum)]
        PACKED_WEIGHTS.clear()  # inference copies (evals, samples, rollouts) go stale at this step
        # counted on the host (no device sync), over the whole global batch: every rank divides by
        # the same total, so the gradients summed over ranks are the global batch's gradient
        total = int(distributed.sum_host([sum(count_fn(b) for b in batches)])[0])
        total = max(total, 1)
        loss = torch.zeros((), device=self.device)
        for batch in batches:
            batch = tuple(t.to(self.device, non_blocking=True) for t in batch)
            loss += self._forward_backward(loss_fn, batch, total)
        if distributed.world_size() > 1:
            # one message: every gradient (a missing one as zeros, so all ranks send the same
            # layout) and the loss, which becomes the global batch's
            params = [p for p in self.model.parameters() if p.requires_grad]
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            distributed.all_reduce_([p.grad for p in params] + [loss.view(1)])
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return loss, total

    def _forward_backward(self, loss_fn, batch, total: int) -> torch.Tensor:
        """One micro-batch's share of the loss, its gradient accumulated. Should the first compiled
        micro-batch fail to compile (no C++ compiler, an op inductor cannot lower), training goes
        on without torch.compile, with one log line: compiling happens before any gradient is
        written, so the micro-batch is simply run again eagerly."""
        try:
            with autocast(self.device, self.dtype):
                part = loss_fn(self.train_model, batch) / total
            part.backward()
        except Exception as e:
            if self.train_model is self.model or self.compiled_once:
                raise
            log(f"torch.compile of the training step failed ({type(e).__name__}: {first_line(e)}); "
                "training without it")
            self.train_model = self.model
            return self._forward_backward(loss_fn, batch, total)
        self.compiled_once = self.train_model is not self.model
        return part.detach()

    def fit(self, data: DataSource, callbacks: Callbacks, loss_fn=lm_loss, count_fn=lm_count) -> list[dict]:
        loop = self.loop
        progress = Progress(loop.steps, desc="step", every=loop.log_every)
        progress.update(self.step, "starting" if self.step == 0 else "resumed", force=True)
        end = min(loop.stop_at or loop.steps, loop.steps)
        while self.step < end:
            t0 = time.perf_counter()
            loss, tokens = self.train_step(data, loss_fn, count_fn)
            record = {"step": self.step}
            last = self.step == end
            if self.step % loop.log_every == 0 or last:
                record["loss"] = round(float(loss), 6)  # the only host sync of a step
            dt = time.perf_counter() - t0
            self.elapsed += dt
            tok_s = tokens / dt
            mfu = self.flops_per_token * tok_s / self.peak
            record.update(tokens=tokens, tok_per_s=round(tok_s, 1), mfu=round(mfu, 4),
                          elapsed=round(self.elapsed, 3))
            # a data source may report per-step numbers of its own (RL: reward, pass@1, ...)
            stats = data.step_stats() if hasattr(data, "step_stats") else {}
            record.update(stats)
            if callbacks.evaluate and ((loop.eval_every and self.step % loop.eval_every == 0) or last):
                record.update(callbacks.evaluate())
            if callbacks.sample and loop.sample_every and (self.step % loop.sample_every == 0 or last):
                record["sample"] = callbacks.sample()
            self.metrics.append(record)
            if "loss" in record:
                extra = "".join(f" | {k} {v:.4f}" for k, v in record.items() if k.startswith("val_"))
                shown = "".join(f" | {k} {v:.4g}" for k, v in stats.items())
                progress.update(self.step, f"| loss {record['loss']:.4f}{shown}{extra} | {tok_s:,.0f} tok/s "
                                           f"| mfu {100 * mfu:.1f}%", force=bool(extra))
            if "sample" in record:
                log(f"sample: {record['sample']!r}")
            if (loop.save_every and self.step % loop.save_every == 0) or last:
                callbacks.save(self.step, self.state_dict(data), self.metrics)
        progress.close()
        return self.metrics


# ----------------------------------------------------------------------------- a stage, end to end

def start_stage(cfg):
    """What every training stage does first: take the cores, choose the device and dtype, join the
    process group under torchrun, and open the run dir. Returns (device, dtype, rank, world, run),
    run being the run dir to resume or None."""
    set_threads()
    device = distributed.local_device(choose_device(cfg.device))
    dtype = choose_dtype(cfg.dtype, device)
    rank, world = distributed.setup(device)
    return device, dtype, rank, world, open_run(cfg.save, cfg.resume, cfg.overwrite, device)


def open_run(save: str, resume: bool, overwrite: bool, device):
    """The run dir to resume (model, tokenizer, trainer state), or None to start fresh; refuses to
    start over an existing run dir unless asked to."""
    from ..checkpoint import load_run
    if resume:
        run = load_run(save, device, trainer_state=True)
        log(f"resuming {save} at step {run.trainer_state['step']}")
        return run
    if Path(save).exists() and not overwrite:
        raise PicochatError(f"run dir {save} already exists (use --resume to continue it, or --overwrite)")
    return None


def restore_settings(cfg, run, keys: tuple[str, ...]) -> None:
    """On resume the run's own settings win: other shapes or seeds would not be the same run."""
    saved = run.meta.get("train", {})
    for key in keys:
        if key in saved:
            setattr(cfg, key, saved[key])


def stage_meta(cfg) -> dict:
    """A stage config as saved in config.json (what resume restores), without the run controls."""
    meta = {k: v for k, v in dataclasses.asdict(cfg).items()
            if k not in ("resume", "overwrite", "stop_at", "optim")}
    meta["optim"] = dataclasses.asdict(cfg.optim)
    return meta


def run_stage(model, tok, data: DataSource, optim_cfg: OptimConfig, loop: LoopConfig, *, save: str, stage: str,
              meta: dict, device, dtype, compile: bool = False, run=None, evaluate=None, sample=None,
              loss_fn=lm_loss, count_fn=lm_count) -> dict:
    """Train `model` on `data` through the Trainer, checkpointing to the run dir `save`; `run` is the
    run being resumed, if any. Returns a summary with every metric."""
    from ..checkpoint import save_run
    from ..optim import build_optimizer
    trainer = Trainer(model, build_optimizer(model, optim_cfg), optim_cfg, loop, device, dtype,
                      flops_per_token=model.config.flops_per_token(), compile=compile)
    if run is not None:
        trainer.load_state_dict(run.trainer_state, data, run.metrics)

    def save_fn(step: int, trainer_state: dict, metrics: list) -> None:
        if distributed.is_main():  # one writer; the others wait so that no rank runs ahead of the run dir
            save_run(save, model, tok, stage=stage, trainer_state=trainer_state, metrics=metrics,
                     extra={"step": step, "train": meta, "world_size": distributed.world_size()})
        distributed.barrier()

    metrics = trainer.fit(data, Callbacks(save=save_fn, evaluate=evaluate, sample=sample), loss_fn, count_fn)
    final = metrics[-1] if metrics else {}
    return {"run_dir": str(save), "steps": trainer.step, "params": model.num_params(),
            "train_seconds": trainer.elapsed, "final_loss": final.get("loss"),
            "val_bpb": final.get("val_bpb"), "metrics": metrics}
