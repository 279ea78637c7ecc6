"""The one training loop: every stage (pretrain, midtrain, SFT, RL) runs its steps through here.

A stage supplies a data source (next_batch / state_dict / load_state_dict), an objective (the loss
and what counts as a target), and callbacks for evaluation, sampling and saving; the loop owns
gradient accumulation, the LR and momentum schedules, timing, MFU, metrics, progress and when to
checkpoint: every `save_every` steps, every `save_every_minutes` of wall time, at the end, and
when the process is asked to stop (Ctrl-C, SIGTERM: the step in flight finishes, the run dir is
saved, and Stopped says how to resume).
"""

from __future__ import annotations

import signal
import threading
import time
from dataclasses import dataclass
from typing import Callable, Protocol

import torch

from .. import distributed
from ..common import PicochatError, Progress, first_line, log, peak_flops
from ..fp8 import fp8_layers, fp8_training_view
from ..linear import free_inference_copies
from ..optim import OptimConfig, lr_multiplier, muon_momentum, wd_multiplier


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


@dataclass(frozen=True)
class Objective:
    """What a step minimizes. `loss(model, batch)` is the loss summed over the batch's targets, or
    (that, {name: tensor}) with statistics to sum over the step; `count(batch)` is the number of
    targets (the step divides by the total); `summarize` turns the step's summed statistics into
    numbers for its metrics row."""
    loss: Callable = lm_loss
    count: Callable = lm_count
    summarize: Callable[[dict], dict] | None = None


LM = Objective()


@dataclass
class LoopConfig:
    steps: int
    grad_accum: int = 1
    log_every: int = 1
    eval_every: int = 0  # 0: only at the end
    sample_every: int = 0  # 0: never during training
    save_every: int = 0  # 0: by time and at the end only
    save_every_minutes: float = 0.0  # 0: not by time
    stop_at: int = 0  # stop (and save) after this step, to resume later; 0: run to the end


@dataclass
class Callbacks:
    save: Callable[[int, dict, list], None] | None = None  # (step, trainer_state, metrics) -> writes the run dir
    evaluate: Callable[[], dict] | None = None  # -> {"val_bpb": ...}, every eval_every steps and at the end
    eval_every: int = 0
    sample: Callable[[], str] | None = None  # -> text, every sample_every steps (0: never)
    sample_every: int = 0
    record: Callable[[dict], None] | None = None  # every metrics row as it is made (--wandb)


class Stopped(PicochatError):
    """The run was asked to stop (SIGINT, SIGTERM) and saved: exit 128 + the signal's number."""
    label = "stopped"

    def __init__(self, signum: int, step: int, saved: bool):
        self.exit_code = 128 + signum
        name = signal.Signals(signum).name
        what = (f"saved at step {step}; continue with the same command and --resume" if saved else
                "stopped before the first step; nothing to save")
        super().__init__(f"{name}: {what}")


class _StopRequests:
    """SIGINT and SIGTERM, while the loop runs, ask it to stop after the step in flight instead of
    killing it mid-step; a second Ctrl-C stops at once (the last checkpoint stays as it was)."""

    def __init__(self):
        self.signum = 0
        self.previous: dict = {}

    def _handle(self, signum, frame):
        if self.signum and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        log(f"\n{signal.Signals(signum).name}: finishing this step, then saving (Ctrl-C again to quit now)")

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # signals reach the main thread only
            for s in (signal.SIGINT, signal.SIGTERM):
                self.previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


class Trainer:
    def __init__(self, model, optimizer, optim_cfg: OptimConfig, loop: LoopConfig, device, dtype,
                 flops_per_token: float, compile: bool = False, fp8: bool = False):
        self.model, self.optimizer, self.optim_cfg, self.loop = model, optimizer, optim_cfg, loop
        self.device, self.dtype = device, dtype
        self.flops_per_token = flops_per_token
        self.peak = peak_flops(device, dtype) * distributed.world_size()  # FP8 too: MFU against bf16's peak
        distributed.broadcast_params(model)
        # what the forward and backward passes run: the model, or its FP8 view over the same weights
        self.step_model = model
        if fp8:
            self.step_model = fp8_training_view(model, device)
            log(f"fp8: {fp8_layers(self.step_model)} Linear layers train in FP8 (torchao, tensorwise scaling)")
        self.train_model = torch.compile(self.step_model, dynamic=False) if compile else self.step_model
        self.compiled_once = False  # a compiled micro-batch has run (see _forward_backward)
        self.step = 0
        self.elapsed = 0.0  # training seconds, excluding evaluation and checkpoints
        self.metrics: list[dict] = []

    # ------------------------------------------------------------------ resume
    def state_dict(self, data: DataSource) -> dict:
        """Exact-resume state: the optimizer's, gathered from the ranks' shares into one process's
        (every rank must call this; rank 0's is the one saved), and every rank's data position and
        RNG (RL's rollouts are per rank)."""
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
    def train_step(self, data: DataSource, objective: Objective = LM) -> tuple[torch.Tensor, int, dict]:
        """One optimizer step over grad_accum micro-batches. Returns (mean loss per token, tokens,
        the objective's statistics summed over the step), the loss still on the device so that
        reading it is the caller's choice of sync."""
        cfg, total = self.optim_cfg, self.loop.steps
        self.optimizer.set_schedule(
            lr_multiplier(self.step, total, cfg.warmup_frac, cfg.warmdown_frac, cfg.final_lr_frac, cfg.warmup_steps),
            muon_momentum(self.step, cfg, total), wd_multiplier(self.step, total, cfg.wd_schedule))
        batches = [data.next_batch() for _ in range(self.loop.grad_accum)]
        free_inference_copies()  # those of evals, samples and rollouts go stale at this step
        # counted on the host (no device sync), over the whole global batch: every rank divides by
        # the same total, so the gradients summed over ranks are the global batch's gradient
        total = int(distributed.sum_host([sum(objective.count(b) for b in batches)])[0])
        total = max(total, 1)
        loss = torch.zeros((), device=self.device)
        stats: dict = {}
        for batch in batches:
            batch = tuple(t.to(self.device, non_blocking=True) for t in batch)
            part, part_stats = self._forward_backward(objective.loss, batch, total)
            loss += part
            for k, v in part_stats.items():
                stats[k] = stats.get(k, 0) + v
        # under torchrun the optimizer sums the gradients over ranks itself (each rank receives its
        # share's: ZeRO-2); the loss becomes the global batch's
        distributed.all_reduce_([loss.view(1)])
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return loss, total, stats

    def _forward_backward(self, loss_fn, batch, total: int) -> tuple[torch.Tensor, dict]:
        """One micro-batch's share of the loss, its gradient accumulated. Should the first compiled
        micro-batch fail to compile (no C++ compiler, an op inductor cannot lower), training goes
        on without torch.compile, with one log line: compiling happens before any gradient is
        written, so the micro-batch is simply run again eagerly."""
        try:
            with self.step_model.computing_in(self.dtype):
                out = loss_fn(self.train_model, batch)
                loss, stats = out if isinstance(out, tuple) else (out, {})
                part = loss / total
            part.backward()
        except Exception as e:
            if self.train_model is self.step_model or self.compiled_once:
                raise
            log(f"torch.compile of the training step failed ({type(e).__name__}: {first_line(e)}); "
                "training without it")
            self.train_model = self.step_model
            return self._forward_backward(loss_fn, batch, total)
        self.compiled_once = self.train_model is not self.step_model
        return part.detach(), stats

    def fit(self, data: DataSource, callbacks: Callbacks, objective: Objective = LM) -> list[dict]:
        loop = self.loop
        progress = Progress(loop.steps, desc="step", every=loop.log_every, start=self.step)
        progress.update(self.step, "starting" if self.step == 0 else "resumed", force=True)
        end = min(loop.stop_at or loop.steps, loop.steps)
        last_save = time.monotonic()
        with _StopRequests() as stop:
            while self.step < end:
                t0 = time.perf_counter()
                loss, tokens, stats = self.train_step(data, objective)
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
                # the data source and the objective may report per-step numbers (RL: reward, KL...)
                shown = data.step_stats() if hasattr(data, "step_stats") else {}
                if objective.summarize is not None:
                    shown.update(objective.summarize(stats))
                record.update(shown)
                if callbacks.evaluate and ((loop.eval_every and self.step % loop.eval_every == 0) or last):
                    record.update(callbacks.evaluate())
                if callbacks.sample and loop.sample_every and (self.step % loop.sample_every == 0 or last):
                    record["sample"] = callbacks.sample()
                self.metrics.append(record)
                if callbacks.record is not None:
                    callbacks.record(record)
                if "loss" in record:
                    extra = "".join(f" | {k} {v:.4f}" for k, v in record.items() if k.startswith("val_"))
                    numbers = "".join(f" | {k} {v:.4g}" for k, v in shown.items())
                    progress.update(self.step, f"| loss {record['loss']:.4f}{numbers}{extra} | {tok_s:,.0f} tok/s "
                                               f"| mfu {100 * mfu:.1f}%", force=bool(extra))
                if "sample" in record:
                    log(f"sample: {record['sample']!r}")
                # every rank must agree to stop or save at the same step: one tiny host message
                due = bool(loop.save_every_minutes) and time.monotonic() - last_save >= 60 * loop.save_every_minutes
                stopping, due = (bool(x) for x in distributed.max_host([stop.signum, due]))
                if last or stopping or due or (loop.save_every and self.step % loop.save_every == 0):
                    if callbacks.save is not None:
                        callbacks.save(self.step, self.state_dict(data), self.metrics)
                    last_save = time.monotonic()
                if stopping:
                    progress.close()
                    signum = int(distributed.max_host([stop.signum])[0]) or signal.SIGTERM
                    raise Stopped(signum, self.step, callbacks.save is not None)
            if stop.signum:  # asked to stop before any step ran
                raise Stopped(stop.signum, self.step, saved=False)
        progress.close()
        return self.metrics
