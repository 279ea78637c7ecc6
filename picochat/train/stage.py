"""What every training stage (pretrain, midtrain, SFT, RL) shares around the loop: the run controls,
the start-up (threads, device, dtype, process group, the run dir), what a resume restores, and the
checkpointing run dir the loop writes.

    stage = Stage("base", cfg)                   # cfg.run: RunControls
    cfg = stage.restored(cfg, RESUME_KEYS)       # on --resume: the run's own settings
    ...build the model and the data...
    return stage.train(cfg, model, tok, data, optim, plan)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from .. import distributed
from ..common import DEVICES, DTYPES, PicochatError, choose_device, choose_dtype, log, set_threads
from ..settings import default_of, flags_of, setting
from .loop import LM, Callbacks, LoopConfig, Objective, Trainer


RUN_KEYS = ("seed",)  # the run controls that change what is trained: saved with the stage's settings


@dataclass
class RunControls:
    """How a training stage runs, as opposed to what it trains: nested in every stage's config."""
    seed: int = setting(42, "random seed: on CPU the same seed gives the same numbers")
    device: str = setting("auto", f"one of {', '.join(DEVICES)} or cuda:N (auto: cuda > mps > cpu)")
    dtype: str = setting("auto", "compute dtype (auto: bf16 on CUDA and on CPUs with native bf16, else fp32)",
                         choices=DTYPES)
    compile: bool = setting(False, "torch.compile the training step (pays a compile at the start; "
                                   "worth it for long runs)")
    grad_checkpoint: bool = setting(False, "recompute activations in the backward pass: much less memory, "
                                           "about 30%% more compute (the speedrun switches it on where a stage "
                                           "needs it to fit)")
    save_every: int = setting(0, "also checkpoint every N steps (0: by time, see --save-every-minutes)", low=0)
    save_every_minutes: float = setting(10.0, "checkpoint at least this often, by wall time (0: not by time); "
                                              "a run also checkpoints at its end and on Ctrl-C or SIGTERM", low=0)
    log_every: int = setting(1, "print a progress line every N steps", low=1)
    wandb: str | None = setting(None, "also send the metrics to this Weights & Biases project (pip install "
                                      "'picochat[wandb]'; WANDB_MODE=offline keeps them on disk)", metavar="PROJECT")
    stop_at: int = setting(0, "stop after this step with a resumable run dir (0: run to the end)", low=0)
    resume: bool = setting(False, "continue the run in --save exactly where it stopped, with its own settings")
    overwrite: bool = setting(False, "replace an existing run dir")
    # Which settings of the stage the caller chose, rather than left at their defaults: a resume
    # refuses any of them that contradicts the run. The CLI passes the flags typed; None (a
    # Python caller) counts every setting whose value differs from its default.
    given: frozenset[str] | None = setting(None, cli=False)


class Stage:
    """One training stage from start-up to its saved run dir."""

    def __init__(self, name: str, cfg):
        self.name, self.cfg = name, cfg
        set_threads()
        self.device = distributed.local_device(choose_device(cfg.run.device))
        self.dtype = choose_dtype(cfg.run.dtype, self.device)
        self.rank, self.world = distributed.setup(self.device)
        self.resumed = self._open_run()

    def _open_run(self):
        """The run dir to resume (model, tokenizer, trainer state), or None to start fresh; refuses
        to start over an existing run dir unless asked to."""
        from ..checkpoint import load_run
        save, c = self.cfg.save, self.cfg.run
        if c.resume:
            return load_run(save, self.device, trainer_state=True)
        if Path(save).exists() and not c.overwrite:
            kind = "a file" if Path(save).is_file() else "a run dir"
            raise PicochatError(f"{save} already exists ({kind}): use --resume to continue it, or --overwrite")
        return None

    # ------------------------------------------------------------------ resume

    def restored(self, cfg, keys: tuple[str, ...]):
        """The config to run with. Fresh: cfg itself. Resumed: cfg with the run's own values of
        `keys` (other shapes or seeds would not be the same run); a value the caller chose that
        contradicts the run is refused, naming each one, except more --steps, which extends it."""
        if self.resumed is None:
            return cfg
        saved = self.resumed.meta.get("train", {})
        done = self.resumed.trainer_state["step"]
        given = cfg.run.given
        flags = flags_of(type(cfg))
        keep, conflicts, notes = {}, [], []
        for key in keys:
            if key not in saved:
                continue
            holder = cfg.run if key in RUN_KEYS else cfg
            mine = getattr(holder, key)
            default = default_of(next(f for f in dataclasses.fields(holder) if f.name == key))
            chosen = key in given if given is not None else mine != default
            theirs = saved[key]
            planned = self.resumed.meta.get("plan", {}).get("steps", theirs) if key == "steps" else theirs
            if not chosen or mine in (theirs, planned):
                keep[key] = theirs
            elif key == "steps" and mine > done:
                notes.append(f"training on to step {mine} (the run was planned for {planned})")
            elif key == "steps":
                conflicts.append(f"--steps {mine}, but the run is already at step {done}")
            else:
                conflicts.append(f"{flags.get(key, key)} {_show(mine)}, but the run has {_show(theirs)}")
        if conflicts:
            raise PicochatError(f"--resume: {self.cfg.save} was trained with other settings: {'; '.join(conflicts)}. "
                                "Leave them out to resume it as it was, or start a new run (another --save, or "
                                "--overwrite)")
        log(f"resuming {self.cfg.save} at step {done}" + "".join(f"; {n}" for n in notes))
        run = dataclasses.replace(cfg.run, **{k: v for k, v in keep.items() if k in RUN_KEYS})
        return dataclasses.replace(cfg, run=run, **{k: v for k, v in keep.items() if k not in RUN_KEYS})

    # ------------------------------------------------------------------ training

    @staticmethod
    def meta(cfg, plan: dict | None = None) -> dict:
        """What config.json records of the stage: its settings (without the run controls, which
        do not change what is trained) and the plan derived from them."""
        train = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name != "run"}
        train = {k: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for k, v in train.items()}
        train.update({k: getattr(cfg.run, k) for k in RUN_KEYS})
        return {"train": train, "plan": plan or {}}

    def train(self, cfg, model, tok, data, optim_cfg, plan: dict, callbacks: Callbacks | None = None,
                  objective: Objective = LM) -> dict:
        """Train `model` on `data` through the Trainer, as cfg.run says, for plan["steps"] steps of
        plan.get("grad_accum", 1) micro-batches (the rest of the plan is recorded in config.json),
        checkpointing to the run dir cfg.save; returns a summary with every metric."""
        from ..checkpoint import save_run
        from ..optim import build_optimizer
        r, callbacks = cfg.run, callbacks or Callbacks()
        loop = LoopConfig(steps=plan["steps"], grad_accum=plan.get("grad_accum", 1), log_every=r.log_every,
                          eval_every=callbacks.eval_every, sample_every=callbacks.sample_every, save_every=r.save_every,
                          save_every_minutes=r.save_every_minutes, stop_at=r.stop_at)
        trainer = Trainer(model, build_optimizer(model, optim_cfg), optim_cfg, loop, self.device, self.dtype,
                          flops_per_token=model.config.flops_per_token(), compile=r.compile)
        if self.resumed is not None:
            trainer.load_state_dict(self.resumed.trainer_state, data, self.resumed.metrics)
        save, meta = cfg.save, self.meta(cfg, plan)

        def save_fn(step: int, trainer_state: dict, metrics: list) -> None:
            if distributed.is_main():  # one writer; the others wait so that no rank runs ahead of the run dir
                save_run(save, model, tok, stage=self.name, trainer_state=trainer_state, metrics=metrics,
                         extra={"step": step, **meta, "world_size": self.world})
            distributed.barrier()

        mirror = None
        if r.wandb and distributed.is_main():
            from .wandb_mirror import WandbMirror
            mirror = WandbMirror(r.wandb, save, self.name, meta)
        callbacks = dataclasses.replace(callbacks, save=save_fn, record=mirror)
        try:
            metrics = trainer.fit(data, callbacks, objective)
        finally:
            if mirror is not None:
                mirror.close()
        final = metrics[-1] if metrics else {}
        return {"run_dir": str(save), "steps": trainer.step, "params": model.num_params(),
                "train_seconds": trainer.elapsed, "final_loss": final.get("loss"),
                "val_bpb": final.get("val_bpb"), "metrics": metrics}


def _show(value) -> str:
    return " ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
