"""Reinforcement learning on graded chat tasks (GRPO): a chat run dir -> a better one, stage "rl".

Every step:
1. Rollouts. `prompts_per_step` prompts are taken from the task mixture (seeded order, epoch after
   epoch); the Engine samples `group_size` completions per prompt with the calculator on
   (Engine.complete, one GenRequest(n=group_size) per prompt, so a group shares its prefill; at
   most `rollout_rows` rows decode at once). Each request's seed derives from (seed, rollout
   number, prompt number): the data position IS the sampling RNG, so resume is exact.
2. Rewards: the task's grader (GSM8K's number after ####, ARC's letter, arithmetic's last number)
   plus `format_reward` when the reply holds a well-formed calculator call
   (<|python_start|>expr<|python_end|> answered by a forced output that is not an error).
3. Advantages, group-relative: A = r - mean(group), divided by the group's std unless std=False
   (a group whose rewards are all equal has std 0 and A = 0 everywhere). Such groups carry no
   signal: they are counted (`all_equal` in the metrics) and left out of training entirely
   (DAPO's dynamic sampling), so they add no gradient and no tokens to the normalizer.
4. The objective, per generated token t of a row with advantage A:
       ratio_t = exp(logp_t - old_logp_t)
       loss_t  = -min(ratio_t * A, clip(ratio_t, 1 - eps, 1 + eps) * A)  [+ beta * k3_t]
       k3_t    = exp(ref_t - logp_t) - (ref_t - logp_t) - 1   (KL to the frozen --load model)
   summed over the step's generated tokens and divided by their count (the objective's count,
   across micro-batches). Tokens the model did not sample are never targets: the
   prompt, padding and the calculator outputs the engine forced. With epochs = 1 the batch is used
   for one step and old_logp = logp.detach(): ratio = 1 and the gradient is A * grad(logp), i.e.
   REINFORCE with a group baseline. With epochs = K > 1 the rollouts are reused for K steps; their
   old_logp are taken (no grad) right after sampling, and the clip keeps the later steps near the
   sampling policy.

Training goes through the one shared loop (Stage.train): the Rollouts data source hands the
Trainer micro-batches of `batch_size` rows (ceil(rows / batch_size) per step; rows of all-equal
groups are dropped, so trailing micro-batches may be empty), the loss is `grpo_loss`, which also
returns its statistics (KL, clipping), and the rollout statistics reach metrics.jsonl and the
progress line through Rollouts.step_stats(). The held-out eval is evals.chat_eval.pass_at_k.

Rollouts stop at <|assistant_end|> only (not at <|bos|>, as chat does): a Completion drops its
stop token, and the trained sequence must end with the very token the model sampled.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .. import distributed
from ..common import PicochatError, autocast, log, seed_everything
from ..conversation import render_for_completion
from ..decode_batch import GenRequest
from ..engine import Completion, Engine
from ..evals.chat_eval import held_out_task, pass_at_k
from ..lora import LoraConfig
from ..memory import check_training_memory
from ..optim import OptimConfig, scale_lrs
from ..run_dir import load_run
from ..settings import check, setting
from ..tasks.mixture import Mixture, build_mixture
from ..tasks.registry import graded_names
from ..tokenizer import ASSISTANT_END, CHAT_TOKENS, OUTPUT_END, OUTPUT_START, PYTHON_END, PYTHON_START
from . import rows as rows_lib
from .loop import Callbacks, Objective
from .rows import EpochOrder
from .stage import Controls, Stage, TrainPlan


def _rl_optim() -> OptimConfig:
    return OptimConfig(warmdown_frac=1.0)


@dataclass
class RLConfig:
    load: str = setting(help="a chat run dir (midtrain or sft) to start from, and the KL reference")
    task: str = setting(help='the graded chat tasks to sample prompts from, a mixture: task[:path][:weight],... '
                             'e.g. "gsm8k:../data/gsm8k:1,arc:../data/arc:0.5,arithmetic::1" (weights are '
                             "sampling weights)", aliases=("--data",))
    save: str = setting(help="run dir to write", defines_run=False)
    group_size: int = setting(16, "completions sampled per prompt (advantages are relative to the group)", low=2)
    prompts_per_step: int = setting(8, "prompts per step (rows = this x group size)", low=1)
    steps: int = setting(100, "optimizer steps", low=1)
    max_tokens: int = setting(256, "reply length cap of a rollout", low=1)
    temperature: float = setting(1.0, "sampling temperature of the rollouts", low=0)
    top_k: int = setting(50, "sample from the k most likely tokens (0: from all)", low=0)
    epochs: int = setting(1, "optimizer steps per batch of rollouts (> 1: clipped importance ratio)", low=1)
    clip: float = setting(0.2, "clip range of the importance ratio", low=0, high=1)
    kl: float = setting(0.0, "KL penalty (k3) to the --load model; 0: none", low=0)
    std: bool = setting(True, "advantages = reward - group mean, not divided by the group's std")
    format_reward: float = setting(0.0, "reward added for a well-formed calculator call whose output is not an error")
    batch_size: int = setting(16, "training rows per micro-batch", low=1)
    rollout_rows: int = setting(64, "rows decoding at once during rollouts", low=1)
    lr_scale: float = setting(0.05, "multiplies the pretraining learning rates", low=0)
    optim: OptimConfig = setting(factory=_rl_optim, flags=())
    adapters: LoraConfig = setting(factory=LoraConfig)
    eval_task: str = setting("", "held-out mixture (default: the tasks' test split; synthetic tasks: a test seed)")
    eval_every: int = setting(0, "held-out pass@k every N steps (and at the end)", low=0, defines_run=False)
    eval_examples: int = setting(100, "held-out questions per eval (0: none)", low=0)
    eval_k: int = setting(1, "samples per question: pass@k (k=1: greedy)", low=1)
    controls: Controls = setting(factory=lambda: Controls(compile=False), flags=tuple(
        f.name for f in dataclasses.fields(Controls) if f.name != "compile"))  # rollouts change shape every step


# ----------------------------------------------------------------------------- rewards and advantages

def well_formed_call(tok, completion: Completion) -> bool:
    """Whether the reply calls the calculator properly: a sampled <|python_start|>expr<|python_end|>
    whose forced output (<|output_start|>result<|output_end|>) is not an error."""
    sid = tok.special_id
    start, end, out_start, out_end = sid(PYTHON_START), sid(PYTHON_END), sid(OUTPUT_START), sid(OUTPUT_END)
    toks, forced = completion.tokens, completion.forced
    i = 0
    while i < len(toks):
        if toks[i] == start and not forced[i]:
            try:
                j = toks.index(end, i + 1)
            except ValueError:
                return False
            if j == i + 1 or j + 1 >= len(toks) or toks[j + 1] != out_start or not forced[j + 1]:
                i = j + 1
                continue
            k = j + 2
            while k < len(toks) and forced[k] and toks[k] != out_end:
                k += 1
            if k < len(toks) and toks[k] == out_end and not tok.decode(toks[j + 2:k]).startswith("error"):
                return True
            i = k
        i += 1
    return False


def group_advantages(rewards: torch.Tensor, std: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """(groups, G) rewards -> (groups, G) advantages: reward - group mean, over the group's
    (population) std if asked; a group whose rewards are all equal gets 0."""
    adv = rewards - rewards.mean(dim=1, keepdim=True)
    if std:
        s = rewards.std(dim=1, unbiased=False, keepdim=True)
        adv = torch.where(s > eps, adv / s.clamp_min(eps), torch.zeros_like(adv))
    return adv


# ----------------------------------------------------------------------------- the loss

def token_logprobs(model, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """log p(y_t | x_<=t) per position (B, T); 0 where y == -1."""
    return -model(x, y, loss_reduction="none").view(y.shape)


def grpo_loss(model, batch, clip: float = 0.2, kl: float = 0.0) -> tuple[torch.Tensor, dict]:
    """The summed per-token GRPO loss of one micro-batch (the Trainer divides by the step's token
    count), and its statistics as sums over the batch's targets: tokens, clipped (epochs > 1), kl.
    batch = (x, y, advantages (B,), old_logp (B, T) or empty, ref_logp (B, T) or empty); targets y
    of -1 (prompt, forced tool output, padding) add nothing and get no gradient."""
    x, y, adv, old, ref = batch
    if y.numel() == 0:  # a micro-batch with no rows (all-equal groups were dropped)
        return torch.zeros((), device=x.device, requires_grad=True), {}
    logp = token_logprobs(model, x, y)
    mask = y != -1
    reused = old.numel() > 0  # epochs > 1: the policy has moved since sampling
    old = old if reused else logp.detach()
    ratio = torch.exp(logp - old)
    a = adv.view(-1, 1).to(logp.dtype)
    unclipped, clipped = ratio * a, ratio.clamp(1.0 - clip, 1.0 + clip) * a
    loss = -torch.minimum(unclipped, clipped)
    k3 = None
    if kl:
        d = (ref - logp).clamp(-20.0, 20.0)  # exp() cannot overflow, even far from the reference
        k3 = torch.exp(d) - d - 1.0
        loss = loss + kl * k3
    with torch.no_grad():
        stats = {"tokens": mask.sum()}
        if reused:
            stats["clipped"] = ((clipped < unclipped) & mask).sum()
        if k3 is not None:
            stats["kl"] = torch.where(mask, k3, 0.0).sum()
    return torch.where(mask, loss, 0.0).sum(), stats


def summarize_loss(stats: dict) -> dict:
    """A step's summed grpo_loss statistics as fractions per trained token (its metrics row)."""
    n = max(int(stats.get("tokens", 0)), 1)
    out = {}
    if "clipped" in stats:
        out["clipped"] = round(float(stats["clipped"]) / n, 4)
    if "kl" in stats:
        out["kl"] = round(float(stats["kl"]) / n, 6)
    return out


# ----------------------------------------------------------------------------- rollouts: the data source

def completion_row(prompt: list[int], c: Completion, end_id: int) -> tuple[list[int], list[bool]]:
    """A trained sequence: prompt + reply (+ the stop token it ended with), and per position
    whether that token is a target: sampled by the model, so not the prompt and not a forced tool
    output."""
    stop = c.finish_reason == "stop"
    seq = prompt + c.tokens + ([end_id] if stop else [])
    target = [False] * len(prompt) + [not f for f in c.forced] + ([True] if stop else [])
    return seq, target


def pad_rows(rows: list[tuple[list[int], list[bool], float]], pad_id: int):
    """(sequence, target flags, advantage) rows -> x (B, T) inputs, y (B, T) targets (-1 where not
    a target, and on the right padding), advantages (B,)."""
    x, y = rows_lib.pad_rows([(seq, target) for seq, target, _ in rows], pad_id)
    return x, y, torch.tensor([a for _, _, a in rows], dtype=torch.float32)


class Rollouts:
    """The RL data source: next_batch() hands out the micro-batches of the current rollout batch,
    sampling a new one (with the model as it is now) when they are used up. state_dict() holds the
    prompt cursor, the rollout counter (which seeds the sampling) and any micro-batches still to
    be reused (epochs > 1), so a resumed run draws exactly what the straight run would."""

    def __init__(self, model, tok, task: Mixture, cfg: RLConfig, plan: TrainPlan, device, dtype, ref_model=None):
        self.model, self.tok, self.task, self.cfg = model, tok, task, cfg
        self.device, self.dtype, self.ref_model = device, dtype, ref_model
        # stop at <|assistant_end|> only: the Completion drops its stop token, so it must be known
        self.end = tok.special_id(ASSISTANT_END)
        self.engine = Engine(model, tok, stops=(self.end,))
        # under torchrun each process samples and trains its share of every step's prompts
        self.rank, self.world = distributed.rank(), distributed.world_size()
        self.prompts = cfg.prompts_per_step // self.world
        self.rows = self.prompts * cfg.group_size
        self.micro_batches = plan.grad_accum
        self.order = EpochOrder(len(task), cfg.controls.seed)
        self.draws = 0  # rollout batches sampled so far: part of every sampling seed
        self.pending: list[tuple] = []  # micro-batches still to hand out (epochs x micro_batches)
        self.stats: dict = {}  # the statistics of the rollout batch being trained on

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> dict:
        return {**self.order.state_dict(), "draws": self.draws, "pending": [list(b) for b in self.pending],
                "stats": dict(self.stats)}

    def load_state_dict(self, state: dict) -> None:
        self.order.load_state_dict(state)
        self.draws = state["draws"]
        self.pending = [tuple(b) for b in state["pending"]]
        self.stats = dict(state["stats"])

    # ------------------------------------------------------------------ the loop's hooks
    def next_batch(self):
        if not self.pending:
            self._rollout()
        return self.pending.pop(0)

    def step_stats(self) -> dict:
        """What the Trainer merges into the step's metric row: the rollout batch's statistics."""
        return dict(self.stats)

    # ------------------------------------------------------------------ sampling
    def _seed(self, j: int) -> int:
        return int(np.random.SeedSequence([self.cfg.controls.seed, self.draws, j]).generate_state(1)[0])

    def sample_groups(self, indices: list[int], first: int = 0) -> list[tuple[dict, list[int], list[Completion]]]:
        """(conversation, prompt ids, group_size completions) per prompt, in order; `first` is the
        position of indices[0] in the step's prompts, which seeds the sampling."""
        cfg = self.cfg
        convs = [self.task[i] for i in indices]
        prompts = [self.engine.fit_prompt(render_for_completion(self.tok, c), cfg.max_tokens) for c in convs]
        requests = [GenRequest(p, cfg.group_size, cfg.max_tokens, cfg.temperature, cfg.top_k or None,
                               seed=self._seed(first + j), key=j) for j, p in enumerate(prompts)]
        with warnings.catch_warnings():  # ast.parse warns on model-made expressions like "3e"
            warnings.simplefilter("ignore", SyntaxWarning)
            out: dict[int, list[Completion]] = dict(self.engine.complete(requests, max_rows=cfg.rollout_rows))
        return [(convs[j], prompts[j], out[j]) for j in range(len(indices))]

    def _rollout(self) -> None:
        cfg = self.cfg
        t0 = time.perf_counter()
        first = self.rank * self.prompts
        groups = self.sample_groups(self.order.take(cfg.prompts_per_step)[first:first + self.prompts], first)
        self.draws += 1
        gen_seconds = time.perf_counter() - t0
        task_rewards = torch.tensor([[float(self.task.reward(conv, c.text)) for c in outs]
                                     for conv, _, outs in groups])
        correct = (task_rewards > 0).float()
        formatted = torch.zeros_like(task_rewards)
        if cfg.format_reward:
            formatted = torch.tensor([[float(well_formed_call(self.tok, c)) for c in outs] for _, _, outs in groups])
        rewards = task_rewards + cfg.format_reward * formatted
        adv = group_advantages(rewards, cfg.std)
        informative = (rewards.max(dim=1).values != rewards.min(dim=1).values).tolist()
        rows = []
        for (conv, prompt, outs), keep, a in zip(groups, informative, adv.tolist()):
            if keep:
                rows += [(*completion_row(prompt, c, self.end), adv_c) for c, adv_c in zip(outs, a)]
        rows = [r for r in rows if any(r[1])]  # rows with nothing sampled (no room) train nothing
        batches = self._micro_batches(rows)
        self.pending = [b for _ in range(cfg.epochs) for b in batches]
        # the statistics of the whole step, summed over the processes
        n_gen = sum(len(c.tokens) for _, _, outs in groups for c in outs)
        r_sum, c_sum, f_sum, gen, n, kept, g = distributed.sum_host(
            [float(rewards.sum()), float(correct.sum()), float(formatted.sum()), n_gen, rewards.numel(),
             sum(informative), len(informative)])
        self.stats = {
            "reward": round(r_sum / n, 4),
            "pass@1": round(c_sum / n, 4),
            **({"format": round(f_sum / n, 4)} if cfg.format_reward else {}),
            "response_len": round(gen / max(n, 1), 2),
            "all_equal": round(1.0 - kept / g, 4),
            "rollout_s": round(gen_seconds, 3),
            "gen_tok_per_s": round(gen / max(gen_seconds, 1e-9), 1),
        }

    def _micro_batches(self, rows: list) -> list[tuple]:
        """The rows, shortest first (less padding), in `micro_batches` right-padded micro-batches
        of at most batch_size rows; the ones left over are empty. With epochs > 1 or a KL penalty,
        the old policy's / reference's log-probs of every target are computed here, once."""
        cfg = self.cfg
        rows = sorted(rows, key=lambda r: len(r[0]))
        out = []
        for m in range(self.micro_batches):
            part = rows[m * cfg.batch_size:(m + 1) * cfg.batch_size]
            if not part:
                empty = torch.zeros(0, 1, dtype=torch.long)
                out.append((empty, empty.clone(), torch.zeros(0), torch.zeros(0, 0), torch.zeros(0, 0)))
                continue
            x, y, adv = pad_rows(part, self.tok.bos_id)
            old = self._logprobs(self.model, x, y) if cfg.epochs > 1 else torch.zeros(0, 0)
            ref = self._logprobs(self.ref_model, x, y) if cfg.kl else torch.zeros(0, 0)
            out.append((x, y, adv, old, ref))
        return out

    @torch.no_grad()
    def _logprobs(self, model, x, y) -> torch.Tensor:
        with autocast(self.device, self.dtype):
            return token_logprobs(model, x.to(self.device), y.to(self.device)).float().cpu()


# ----------------------------------------------------------------------------- the stage

def _check_task(task: Mixture, spec: str) -> None:
    for sub in task.tasks:
        if not sub.graded():
            raise PicochatError(f"rl: task {sub.name!r} in {spec!r} has no grader (RL needs graded tasks: "
                                f"{', '.join(graded_names())})")
        try:
            sub.reward(sub[0], "")
        except (KeyError, TypeError, IndexError, AttributeError) as e:
            raise PicochatError(f"rl: task {sub.name!r} in {spec!r}: its examples lack what its grader needs "
                                f"({type(e).__name__}: {e})") from None


def _check_chat_model(run, where: str) -> None:
    missing = [t for t in CHAT_TOKENS if t not in run.tokenizer.special_tokens]
    if missing:
        raise PicochatError(f"rl: the tokenizer of {where} lacks the chat tokens {', '.join(missing)}: "
                            "RL needs a chat model (midtrain/sft first)")
    stage = run.meta.get("stage")
    if stage == "base":
        raise PicochatError(f"rl: {where} is a base model (stage 'base'), never trained on the chat format: "
                            "RL needs a chat model (midtrain/sft first)")
    if run.meta.get("quantization"):
        raise PicochatError(f"rl: {where} is INT8-quantized (inference only): load the float run dir")


def plan_rl(cfg: RLConfig, context: int, world: int) -> TrainPlan:
    """--steps steps of --prompts-per-step x --group-size rows, split evenly over the processes and
    trained --batch-size rows at a time (the last micro-batch may be short, or empty where groups
    that all scored the same were dropped). Rows are at most the context long."""
    if cfg.prompts_per_step % world:
        raise PicochatError(f"rl: --prompts-per-step {cfg.prompts_per_step} does not split evenly over "
                            f"{world} processes")
    rows = cfg.prompts_per_step // world * cfg.group_size
    return TrainPlan(cfg.steps, cfg.batch_size, context, math.ceil(rows / cfg.batch_size), world,
                     rows_per_step=cfg.prompts_per_step * cfg.group_size)


def rl_train(cfg: RLConfig) -> dict:
    """`picochat rl`: GRPO on graded tasks, through the shared training loop."""
    check(cfg)
    if cfg.temperature <= 0:
        raise PicochatError(f"rl: --temperature must be > 0 for sampling groups, not {cfg.temperature}")
    if not Path(cfg.load).is_dir():
        raise PicochatError(f"--load {cfg.load}: {'a file, not a run dir' if Path(cfg.load).exists() else 'no such run dir'}")
    stage = Stage("rl", cfg)
    cfg = stage.restored(cfg)
    device, dtype, run = stage.device, stage.dtype, stage.resumed
    plan_rl(cfg, 1, stage.world)  # bad input fails here, before any model is loaded or step taken
    task = build_mixture(cfg.task, split="train", seed=cfg.controls.seed)
    _check_task(task, cfg.task)
    eval_task = None
    if cfg.eval_examples:
        eval_task = held_out_task(cfg.eval_task or cfg.task, explicit=bool(cfg.eval_task))
        _check_task(eval_task, cfg.eval_task or cfg.task)

    source = load_run(cfg.load, device)
    _check_chat_model(source, cfg.load)
    if run is not None:
        model, tok = run.model, run.tokenizer
        if tok.fingerprint() != source.tokenizer.fingerprint():
            raise PicochatError(f"rl: {cfg.save} and its --load {cfg.load} have different tokenizers")
    else:
        model, tok = source.model, source.tokenizer
        seed_everything(cfg.controls.seed)
    ref_model = None
    if cfg.kl:
        ref_model = source.model if run is not None else load_run(cfg.load, device).model
        ref_model.requires_grad_(False)
    del source

    model.grad_checkpoint = cfg.controls.grad_checkpoint
    check_training_memory(model.config, cfg.batch_size, model.config.sequence_len, dtype, cfg.controls.grad_checkpoint,
                          device, cfg.adapters)  # rows are at most the context long
    plan = plan_rl(cfg, model.config.sequence_len, stage.world)
    data = Rollouts(model, tok, task, cfg, plan, device, dtype, ref_model)
    log(f"rl: {len(task):,} prompts from {cfg.task!r}, {cfg.steps} steps of {cfg.prompts_per_step} prompts x "
        f"{cfg.group_size} samples ({data.rows} rows per process, {data.micro_batches} micro-batches of "
        f"{cfg.batch_size}), epochs {cfg.epochs}, from {cfg.load}")

    evaluate, eval_start = None, None
    if eval_task is not None:
        n = min(cfg.eval_examples, len(eval_task))
        temp = 0.0 if cfg.eval_k == 1 else cfg.temperature
        evaluate = functools.partial(pass_at_k, model, tok, eval_task, list(range(n)), cfg.eval_k, cfg.max_tokens,
                                     temp, cfg.top_k or None, cfg.controls.seed, max(cfg.rollout_rows, cfg.eval_k))
        if run is None:
            eval_start = evaluate()
            log("rl: before training, " + ", ".join(f"{k} {v:.4f}" for k, v in eval_start.items()))

    objective = Objective(loss=lambda m, batch: grpo_loss(m, batch, cfg.clip, cfg.kl), summarize=summarize_loss)
    result = stage.train(cfg, model, tok, data, scale_lrs(cfg.optim, cfg.lr_scale), plan,
                         Callbacks(evaluate=evaluate, eval_every=cfg.eval_every), objective, lora=cfg.adapters)
    result["eval_start"] = eval_start
    result["eval_end"] = {k: v for k, v in (result["metrics"][-1] if result["metrics"] else {}).items()
                          if k.startswith("val_")} or None
    return result
