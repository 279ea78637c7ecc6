"""What every training stage (pretrain, midtrain, SFT, RL) shares around the loop: the controls,
the plan a stage derives from its settings, the start-up (threads, device, dtype, process group,
the run dir), what a resume restores, and the checkpointing run dir the loop writes.

    stage = Stage("base", cfg)                   # cfg.controls: Controls
    cfg = stage.restored(cfg)                    # on --resume: the run's own settings
    plan = plan_pretrain(cfg, params, world)     # steps, batch, accumulation: a TrainPlan
    ...build the model and the data...
    return stage.train(cfg, model, tok, data, optim, plan)
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import MISSING, dataclass
from pathlib import Path

from .. import distributed
from ..common import (
    DEVICE_HELP,
    DTYPE_HELP,
    DTYPES,
    PicochatError,
    choose_compile,
    choose_device,
    choose_dtype,
    log,
    set_threads,
)
from ..fp8 import fp8_problem
from ..lora import Adapters, LoraConfig, lora_optimizer
from ..model import flops_per_token
from ..settings import default_of, flags_of, leaves, record, replaced, setting, show, typed
from .loop import LM, Callbacks, LoopConfig, Objective, Trainer


@dataclass
class Controls:
    """How a training stage runs, as opposed to what it trains: nested in every stage's config.
    Only the seed defines the run; the rest may change on a resume."""
    seed: int = setting(42, "random seed: on CPU the same seed gives the same numbers")
    device: str = setting("auto", DEVICE_HELP, defines_run=False)
    dtype: str = setting("auto", DTYPE_HELP, choices=DTYPES, defines_run=False)
    compile: bool | None = setting(None, "torch.compile the training step: a compile at the start, then "
                                         "faster steps (default: on CUDA, off elsewhere)", defines_run=False)
    fp8: bool | None = setting(None, "train the hidden matrices' products in FP8 with torchao (NVIDIA GPUs of "
                                     "compute capability 8.9+: H100, L4, RTX 4090); evals and samples stay bf16 "
                                     "(default: off; the speedrun: the preset's choice, where the GPU has FP8)",
                               defines_run=False)
    grad_checkpoint: bool = setting(False, "recompute activations in the backward pass: much less memory, "
                                           "about 30%% more compute (the speedrun switches it on where a stage "
                                           "needs it to fit)", defines_run=False)
    save_every: int = setting(0, "also checkpoint every N steps (0: by time, see --save-every-minutes)", low=0,
                              defines_run=False)
    save_every_minutes: float = setting(10.0, "checkpoint at least this often, by wall time (0: not by time); "
                                              "a run also checkpoints at its end and on Ctrl-C or SIGTERM", low=0,
                                        defines_run=False)
    log_every: int = setting(1, "print a progress line every N steps", low=1, defines_run=False)
    wandb: str | None = setting(None, "also send the metrics to this Weights & Biases project (pip install "
                                      "'picochat[wandb]'; WANDB_MODE=offline keeps them on disk)", metavar="PROJECT",
                                defines_run=False)
    stop_at: int = setting(0, "stop after this step with a resumable run dir (0: run to the end)", low=0,
                           defines_run=False)
    resume: bool = setting(False, "continue the run in --save exactly where it stopped, with its own settings",
                           defines_run=False)
    overwrite: bool = setting(False, "replace an existing run dir", defines_run=False)
    # Which settings of the stage the caller chose, rather than left at their defaults: a resume
    # refuses any of them that contradicts the run. The CLI passes the flags typed; None (a
    # Python caller) counts every setting whose value differs from its default.
    given: frozenset[str] | None = setting(None, cli=False, defines_run=False)


# ----------------------------------------------------------------------------- the plan

@dataclass(frozen=True)
class TrainPlan:
    """What a stage derives from its settings before it trains: how many steps, of how many rows
    of how many positions. The stage trains by it and records it in config.json ("plan"); the
    speedrun's plan prints the same object, made by the same function (plan_pretrain,
    plan_chat, plan_rl), before anything runs."""
    steps: int | None  # None only in a speedrun's plan, for one pass over data not yet there
    rows: int  # rows per micro-batch, per process
    seq_len: int  # positions per row (SFT and RL pad each micro-batch to its longest row, at most this)
    grad_accum: int  # micro-batches per step, per process
    world: int = 1  # processes
    rows_per_step: int = 0  # rows in one step over all processes (0: rows x grad_accum x world)
    lr_scale: float = 1.0  # the learning rates' scale the budget derives (pretraining's --budget nanochat)
    wd_scale: float = 1.0  # and the hidden matrices' weight decay's

    def __post_init__(self):
        if not self.rows_per_step:
            object.__setattr__(self, "rows_per_step", self.rows * self.grad_accum * self.world)

    @property
    def tokens_per_step(self) -> int:
        """Positions per step: the tokens trained on where rows are packed (pretraining,
        midtraining), an upper bound where they are padded."""
        return self.rows_per_step * self.seq_len

    @property
    def tokens(self) -> int | None:
        return None if self.steps is None else self.steps * self.tokens_per_step

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "tokens_per_step": self.tokens_per_step}


def exact_accum(total: int, micro: int, total_name: str, micro_name: str) -> int:
    """Micro-batches per step for a step of `total` made of micro-batches of `micro` (x processes);
    a total that is not a multiple is an error, never rounded."""
    if total % micro:
        raise PicochatError(f"{total_name} {total:,} is not a multiple of {micro_name} = {micro:,}")
    return total // micro


def one_pass(units: float, per_step: int) -> int:
    """Steps for one pass over `units` rows at `per_step` a step: rounded up, so that every
    example is seen (the last step wraps into the next pass)."""
    return max(1, math.ceil(units / per_step))


def compiles(cfg, device) -> bool:
    """Whether a stage config's training step is compiled on `device`: as its --compile says
    (choose_compile), except a chat stage's padded rows, whose width changes every batch (sft.py)."""
    return getattr(cfg, "packed", True) and choose_compile(cfg.controls.compile, device)


class Stage:
    """One training stage from start-up to its saved run dir."""

    def __init__(self, name: str, cfg):
        self.name, self.cfg = name, cfg
        set_threads()
        self.device = distributed.local_device(choose_device(cfg.controls.device))
        self.dtype = choose_dtype(cfg.controls.dtype, self.device)
        if cfg.controls.fp8 and (problem := fp8_problem(self.device)):
            raise PicochatError(f"--fp8: {problem}")
        self.rank, self.world = distributed.setup(self.device)
        self.resumed = self._open_run()

    def _open_run(self):
        """The run dir to resume (model, tokenizer, trainer state), or None to start fresh; refuses
        to start over an existing run dir unless asked to."""
        from ..run_dir import load_run
        save, c = self.cfg.save, self.cfg.controls
        if c.resume:
            run = load_run(save, self.device, trainer_state=True, adapter="keep")
            if (run.meta.get("lora") or {}).get("merged"):
                raise PicochatError(f"--resume: {save} is a finished LoRA run whose adapter is merged into its "
                                    f"weights, which cannot be taken apart exactly: train on from it as a new run "
                                    f"(--load {save}), or keep the adapter apart next time (--no-lora-merge)")
            return run
        if Path(save).exists() and not c.overwrite:
            kind = "a file" if Path(save).is_file() else "a run dir"
            raise PicochatError(f"{save} already exists ({kind}): use --resume to continue it, or --overwrite")
        return None

    # ------------------------------------------------------------------ resume

    def restored(self, cfg):
        """The config to run with. Fresh: cfg itself. Resumed: cfg with the run's own value of every
        setting that defines the run (settings.setting's defines_run); a value the caller chose
        that contradicts the run is refused, naming each one, except more --steps, which extends
        it."""
        if self.resumed is None:
            return cfg
        saved = self.resumed.meta.get("train", {})
        done = self.resumed.trainer_state["step"]
        planned = self.resumed.meta.get("plan", {}).get("steps")
        given = cfg.controls.given
        flags = flags_of(type(cfg))
        keep, conflicts, notes = {}, [], []
        for leaf in leaves(cfg):
            name = leaf.field.name
            found, theirs = _recorded(saved, leaf.path)
            if not found and saved:  # the run predates the setting: it ran as the field's own default
                theirs = default_of(leaf.field)  # has it (see settings.setting), whatever a factory says now
                found = theirs is not MISSING
            if not leaf.defines_run or not found:
                continue
            theirs = typed(leaf, theirs)
            mine = getattr(leaf.holder, name)
            chosen = name in given if given is not None else mine != leaf.default
            if not chosen or mine == theirs or (name == "steps" and mine == planned):
                keep[leaf.path] = theirs
            elif name == "steps" and mine > done:
                notes.append(f"training on to step {mine} (the run was planned for {planned or theirs})")
            elif name == "steps":
                conflicts.append(f"--steps {mine}, but the run is already at step {done}")
            else:
                conflicts.append(f"{flags.get(name, name)} {show(mine)}, but the run has {show(theirs)}")
        if conflicts:
            raise PicochatError(f"--resume: {self.cfg.save} was trained with other settings: {'; '.join(conflicts)}. "
                                "Leave them out to resume it as it was, or start a new run (another --save, or "
                                "--overwrite)")
        log(f"resuming {self.cfg.save} at step {done}" + "".join(f"; {n}" for n in notes))
        return replaced(cfg, keep)

    # ------------------------------------------------------------------ training

    def adapters(self, model, lora: LoraConfig | None, controls: Controls) -> Adapters | None:
        """A LoRA run's adapters on the frozen model: the resumed run's, or new ones; None for a
        run that trains every weight."""
        if lora is None or not lora.lora:
            return None
        if controls.fp8:
            raise PicochatError("--fp8 with --lora: FP8 is for pretraining's products; adapters train in bf16")
        adapters = self.resumed.adapter if self.resumed is not None else None
        adapters = (adapters or Adapters.for_model(model, lora)).attach(model)
        distributed.broadcast_params(adapters)
        log(f"lora: rank {adapters.rank} adapters on {len(adapters.names)} projections: "
            f"{adapters.num_params() / 1e6:.2f}M parameters train, the model's {model.num_params() / 1e6:.1f}M "
            "are frozen")
        return adapters

    @staticmethod
    def meta(cfg, plan: TrainPlan) -> dict:
        """What config.json records of the stage: its settings and the plan derived from them."""
        return {"train": record(cfg), "plan": plan.to_dict()}

    def train(self, cfg, model, tok, data, optim_cfg, plan: TrainPlan, callbacks: Callbacks | None = None,
              objective: Objective = LM, lora: LoraConfig | None = None) -> dict:
        """Train `model` on `data` through the Trainer, as cfg.controls says, for plan.steps steps
        of plan.grad_accum micro-batches, checkpointing to the run dir cfg.save; returns a summary
        with every metric. With `lora` (a rank), adapters train on the frozen model: the run dir's
        checkpoints keep them apart, its last one merges them in unless lora.lora_merge is off."""
        from ..optim import build_optimizer
        from ..run_dir import save_run
        r, callbacks = cfg.controls, callbacks or Callbacks()
        adapters = self.adapters(model, lora, r)
        optimizer = lora_optimizer(adapters, lora.lora_lr) if adapters else build_optimizer(model, optim_cfg)
        loop = LoopConfig(steps=plan.steps, grad_accum=plan.grad_accum, log_every=r.log_every,
                          eval_every=callbacks.eval_every, sample_every=callbacks.sample_every, save_every=r.save_every,
                          save_every_minutes=r.save_every_minutes, stop_at=r.stop_at)
        trainer = Trainer(model, optimizer, optim_cfg, loop, self.device, self.dtype,
                          flops_per_token=flops_per_token(model.config),
                          compile=compiles(cfg, self.device), fp8=bool(r.fp8))
        if self.resumed is not None:
            trainer.load_state_dict(self.resumed.trainer_state, data, self.resumed.metrics)
        save, meta = cfg.save, self.meta(cfg, plan)

        def save_fn(step: int, trainer_state: dict, metrics: list) -> None:
            if distributed.is_main():  # one writer; the others wait so that no rank runs ahead of the run dir
                save_run(save, model, tok, stage=self.name, trainer_state=trainer_state, metrics=metrics,
                         extra={"step": step, **meta, "world_size": self.world}, adapter=adapters,
                         merged=step >= plan.steps and bool(lora and lora.lora_merge))
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



def _recorded(saved: dict, path: tuple[str, ...]) -> tuple[bool, object]:
    """(whether config.json's "train" has the setting at `path`, its value)."""
    node = saved
    for name in path:
        if not isinstance(node, dict) or name not in node:
            break
        node = node[name]
    else:
        return True, node
    if path[0] == "controls" and path[-1] in saved:  # run dirs from before the controls were recorded
        return True, saved[path[-1]]  # whole kept the seed at the top level
    return False, None
