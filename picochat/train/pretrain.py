"""Pretraining: documents -> packed token rows -> a base model in a run dir."""

from __future__ import annotations

import dataclasses
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import distributed
from ..common import PicochatError, log, seed_everything
from ..config import DEPTH_PRESETS, PICOCHAT_FEATURES, SIZINGS, ModelConfig, ModelFeatures
from ..data.loader import PackingLoader, TokenDataset
from ..data.sources import TEXT_FILES, list_files
from ..decode_batch import GenRequest
from ..engine import Engine
from ..evals.bpb import evaluate_bpb
from ..memory import check_training_memory
from ..model import GPT, num_params, param_counts
from ..optim import OptimConfig
from ..run_dir import check_tokenizer
from ..settings import check, setting
from ..tokenizer import MIN_VOCAB_SIZE, Tokenizer, train_tokenizer
from .loop import Callbacks
from .stage import Controls, Stage, TrainPlan, compiles, exact_accum


BUDGETS = ("picochat", "nanochat")
BATCH_REF, DEPTH_REF = 2 ** 19, 12  # nanochat's: the batch (tokens) and depth its rates were tuned at


@dataclass
class PretrainConfig:
    data: list[str] = setting(help=f"the text to train on: {TEXT_FILES}", defines_run=False)
    save: str = setting(help="run dir to write", defines_run=False)
    tokenizer: str | None = setting(None, "tokenizer.json (default: train one on --data, of --vocab-size)",
                                    defines_run=False)
    vocab_size: int = setting(32768, "vocab of a tokenizer trained here", low=MIN_VOCAB_SIZE, defines_run=False)
    depth: int = setting(4, f"model size: layers; width and heads follow by --sizing (the table's depths: "
                            f"{', '.join(map(str, DEPTH_PRESETS))})", low=1)
    sizing: str = setting("table", "width and heads from the depth: picochat's table, or nanochat's rule (64 x "
                                   "depth, 128-wide heads; the same from depth 12 on)", choices=SIZINGS)
    seq_len: int = setting(1024, "context length in tokens", low=1)
    window_pattern: str = setting("SSSL", "per-layer attention, repeated: S(liding window) or L(ong, the whole "
                                          "context); the last layer is always L")
    window: int = setting(0, "sliding window in tokens, the query's own included (default: by --window-rule)",
                          low=0)
    # the network of PICOCHAT_FEATURES by default; a run dir from before a feature existed resumes
    # without it (the field's own default: settings.py)
    features: ModelFeatures = setting(factory=lambda: dataclasses.replace(PICOCHAT_FEATURES))
    batch_size: int = setting(8, "rows per micro-batch", low=1)
    total_batch_tokens: int = setting(0, "tokens per optimizer step, by gradient accumulation (default: by "
                                         "--budget)", low=0)
    steps: int = setting(0, "optimizer steps (default: --tokens-params-ratio tokens per parameter)", low=0)
    tokens_params_ratio: float = setting(20.0, "training tokens per parameter when --steps is not given "
                                               "(Chinchilla's 20; nanochat counts only the matrices and the head, "
                                               "12 at a time, 8 in its speedrun)", low=0)
    budget: str = setting("picochat", "how steps, batch and rates follow from the model: picochat (tokens per "
                                      "parameter; the batch one micro-batch unless given) or nanochat (tokens per "
                                      "matrix and head parameter; the batch 2^19 x (D / D_ref)^0.383 rounded to a "
                                      "power of 2 unless given, D_ref a depth-12 model's; learning rates x sqrt(B / "
                                      "2^19), the matrices' weight decay x sqrt(B / 2^19) x D_ref / D)",
                          choices=BUDGETS)
    optim: OptimConfig = setting(factory=OptimConfig)
    eval_every: int = setting(0, "validation bpb every N steps (and at the end)", low=0, defines_run=False)
    eval_tokens: int = setting(65536, "validation tokens per bpb evaluation", low=1, defines_run=False)
    sample_every: int = setting(0, "print a greedy sample every N steps (0: never)", low=0, defines_run=False)
    sample_prompt: str = setting("The", cli=False, defines_run=False)
    cache_dir: str | None = setting(None, "where tokenized data is cached (default: <save>.cache)",
                                    defines_run=False)
    controls: Controls = setting(factory=Controls)


def model_config(cfg: PretrainConfig, vocab_size: int) -> ModelConfig:
    """The model a pretraining config trains, for a tokenizer of `vocab_size`."""
    return ModelConfig.from_depth(cfg.depth, cfg.sizing, vocab_size=vocab_size, sequence_len=cfg.seq_len,
                                  window_pattern=cfg.window_pattern, window=cfg.window,
                                  **dataclasses.asdict(cfg.features))


def plan_pretrain(cfg: PretrainConfig, config: ModelConfig, world: int) -> TrainPlan:
    """Steps, accumulation and the rates' scales of pretraining `config`: --total-batch-tokens of
    micro-batches from every process, for --steps, or --tokens-params-ratio tokens per parameter,
    as --budget counts them (picochat's, or nanochat's base_train at HEAD)."""
    micro = cfg.batch_size * cfg.seq_len * world

    def accumulation(total: int) -> int:
        return exact_accum(total, micro, "--total-batch-tokens", "batch size x seq len x processes")
    if cfg.budget == "nanochat":  # D tokens for the matrices and the head, the batch and rates by D
        tokens = int(cfg.tokens_params_ratio * _scaling_params(config))
        ref = cfg.tokens_params_ratio * _scaling_params(model_config(dataclasses.replace(cfg, depth=DEPTH_REF),
                                                                     config.vocab_size))
        total = cfg.total_batch_tokens or 2 ** round(math.log2(BATCH_REF * (tokens / ref) ** 0.383))
        rate = (total / BATCH_REF) ** 0.5  # AdamW's sqrt(B) rule, for Muon too
        return TrainPlan(cfg.steps or max(1, tokens // total), cfg.batch_size, cfg.seq_len, accumulation(total), world,
                         lr_scale=rate, wd_scale=rate * ref / tokens)
    accum = accumulation(cfg.total_batch_tokens) if cfg.total_batch_tokens else 1
    steps = cfg.steps or max(1, round(cfg.tokens_params_ratio * num_params(config) / (micro * accum)))
    return TrainPlan(steps, cfg.batch_size, cfg.seq_len, accum, world)


def _scaling_params(config: ModelConfig) -> int:
    """The parameters nanochat's scaling laws count: the hidden matrices and the head."""
    counts = param_counts(config)
    return counts["matrix"] + counts["head"]


def budget_optim(cfg: PretrainConfig, plan: TrainPlan) -> OptimConfig:
    """The optimizer settings with the budget's scales: the learning rates (not the gates', which
    nanochat keeps fixed) and the matrices' weight decay."""
    o, s = cfg.optim, plan.lr_scale
    return dataclasses.replace(o, matrix_lr=o.matrix_lr * s, embedding_lr=o.embedding_lr * s, head_lr=o.head_lr * s,
                               scalar_lr=o.scalar_lr * s, weight_decay=o.weight_decay * plan.wd_scale)


def _check_inputs(cfg: PretrainConfig) -> None:
    """Everything the user typed, before anything is announced or loaded."""
    check(cfg)
    list_files(cfg.data)  # every data path exists and has text files
    if cfg.tokenizer and not Path(cfg.tokenizer).is_file():
        raise PicochatError(f"--tokenizer {cfg.tokenizer}: no such file")
    model_config(cfg, MIN_VOCAB_SIZE)  # the pattern and sizes make a model


def pretrain(cfg: PretrainConfig) -> dict:
    _check_inputs(cfg)
    cache = Path(cfg.cache_dir or str(cfg.save) + ".cache")
    fresh = not cache.exists()
    try:
        return _pretrain(cfg, cache)
    except BaseException:
        # a run that fails before its first checkpoint takes the token cache it made with it
        if fresh and not Path(cfg.save).exists() and distributed.is_main():
            shutil.rmtree(cache, ignore_errors=True)
        raise


def _pretrain(cfg: PretrainConfig, cache: Path) -> dict:
    stage = Stage("base", cfg)
    cfg = stage.restored(cfg)
    world, device, dtype = stage.world, stage.device, stage.dtype
    if stage.resumed is not None:
        tok, model = stage.resumed.tokenizer, stage.resumed.model
        config = model.config
    else:
        if cfg.tokenizer:
            tok = Tokenizer.load(cfg.tokenizer)
        elif world > 1:
            raise PicochatError("under torchrun give --tokenizer (train one first: picochat tokenizer train), "
                                "so that every process uses the same one")
        else:
            log(f"no --tokenizer given: training one (vocab {cfg.vocab_size:,}) on the data")
            tok = train_tokenizer(cfg.data, cfg.vocab_size)
        config = model_config(cfg, tok.vocab_size)
        check_tokenizer(tok, config)
    params = num_params(config)
    plan = plan_pretrain(cfg, config, world)
    if stage.resumed is None:
        est = check_training_memory(config, cfg.batch_size, cfg.seq_len, dtype, cfg.controls.grad_checkpoint, device,
                                    compiled=compiles(cfg, device))
        log(f"memory: about {est.describe()} per process")
        seed_everything(cfg.controls.seed)
        with torch.device(device):
            model = GPT(config)
    model.grad_checkpoint = cfg.controls.grad_checkpoint

    with distributed.main_first():  # rank 0 tokenizes into the cache, the others read it
        dataset = TokenDataset.build(cfg.data, tok, cache_dir=cache)
    train_data = PackingLoader(dataset, "train", cfg.batch_size, cfg.seq_len, seed=cfg.controls.seed, rank=stage.rank,
                               world_size=world)
    log(f"model: depth {config.n_layer}, dim {config.n_embd}, heads {config.n_head}/{config.n_kv_head} kv, "
        f"{params / 1e6:.1f}M params | {plan.steps} steps x {plan.tokens_per_step:,} tokens "
        f"({plan.grad_accum} micro-batches{f' x {world} processes' if world > 1 else ''}) | "
        + (f"rates x{plan.lr_scale:.3f}, weight decay x{plan.wd_scale:.3f} | " if cfg.budget != "picochat" else "")
        + f"{device.type} {str(dtype).removeprefix('torch.')} | "
        f"{dataset.num_tokens:,} tokens in {dataset.num_docs:,} documents")

    token_bytes = torch.tensor(tok.token_byte_lengths(), dtype=torch.float32, device=device)
    val = PackingLoader(dataset, "val", cfg.batch_size, cfg.seq_len, seed=cfg.controls.seed, rank=stage.rank,
                        world_size=world)

    def evaluate() -> dict:
        val.reset()  # the same validation tokens every time (split between the processes)
        n = max(1, cfg.eval_tokens // (cfg.batch_size * cfg.seq_len * world))
        return {"val_bpb": round(evaluate_bpb(model, val, n, token_bytes, device, dtype), 6)}

    def sample() -> str:
        ids = [tok.bos_id] + tok.encode(cfg.sample_prompt)
        (_, (completion,)), = Engine(model).complete([GenRequest(ids, max_tokens=32, temperature=0.0)])
        return cfg.sample_prompt + tok.decode(completion.tokens)

    return stage.train(cfg, model, tok, train_data, budget_optim(cfg, plan), plan,
                       Callbacks(evaluate=evaluate, eval_every=cfg.eval_every, sample=sample,
                                 sample_every=cfg.sample_every))
