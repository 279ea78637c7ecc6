"""Pretraining: documents -> packed token rows -> a base model in a run dir."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .. import distributed
from ..checkpoint import check_tokenizer
from ..common import PicochatError, log, seed_everything
from ..config import ModelConfig
from ..data.loader import PackingLoader, TokenDataset
from ..engine import generate
from ..evals.bpb import evaluate_bpb
from ..memory import check_training_memory
from ..model import GPT
from ..optim import OptimConfig
from ..tokenizer import Tokenizer, train_tokenizer
from .loop import LoopConfig, restore_settings, run_stage, stage_meta, start_stage


@dataclass
class PretrainConfig:
    data: list[str]
    save: str
    tokenizer: str | None = None  # tokenizer.json; None: train one on the data
    vocab_size: int = 32768  # only when training a tokenizer here
    depth: int = 4
    seq_len: int = 1024
    window_pattern: str = "SSSL"
    window: int = 0  # 0: seq_len // 4
    batch_size: int = 8  # rows per micro-batch
    total_batch_tokens: int = 0  # tokens per optimizer step; 0: one micro-batch
    steps: int = 0  # 0: derived from tokens_params_ratio
    tokens_params_ratio: float = 20.0  # Chinchilla's 20 tokens per parameter
    optim: OptimConfig = field(default_factory=OptimConfig)
    device: str = "auto"
    dtype: str = "auto"
    compile: bool = False
    grad_checkpoint: bool = False  # recompute activations in the backward pass: less memory, ~30% more compute
    seed: int = 42
    eval_every: int = 0
    eval_tokens: int = 65536  # validation tokens per bpb evaluation
    sample_every: int = 0
    sample_prompt: str = "The"
    save_every: int = 0
    stop_at: int = 0  # stop after this step with a resumable run dir (time-sliced jobs)
    log_every: int = 1
    resume: bool = False
    overwrite: bool = False
    cache_dir: str | None = None  # token cache; default: <save>.cache next to the run dir


def _grad_accum(cfg: PretrainConfig, world: int) -> int:
    rows_tokens = cfg.batch_size * cfg.seq_len * world
    if not cfg.total_batch_tokens:
        return 1
    if cfg.total_batch_tokens % rows_tokens:
        raise PicochatError(f"--total-batch-tokens {cfg.total_batch_tokens} is not a multiple of "
                            f"batch size x seq len x processes = {rows_tokens}")
    return cfg.total_batch_tokens // rows_tokens


def pretrain(cfg: PretrainConfig) -> dict:
    device, dtype, rank, world, run = start_stage(cfg)
    if run is not None:
        restore_settings(cfg, run, ("depth", "seq_len", "batch_size", "total_batch_tokens", "steps", "seed",
                                    "window", "window_pattern"))
        tok, model = run.tokenizer, run.model
    else:
        if cfg.tokenizer:
            tok = Tokenizer.load(cfg.tokenizer)
        elif world > 1:
            raise PicochatError("under torchrun give --tokenizer (train one first: picochat tokenizer train), "
                                "so that every process uses the same one")
        else:
            log(f"no --tokenizer given: training one (vocab {cfg.vocab_size}) on the data")
            tok = train_tokenizer(cfg.data, cfg.vocab_size)
        config = ModelConfig.from_depth(cfg.depth, vocab_size=tok.vocab_size, sequence_len=cfg.seq_len,
                                        window_pattern=cfg.window_pattern, window=cfg.window)
        check_tokenizer(tok, config)
        est = check_training_memory(config, cfg.batch_size, cfg.seq_len, dtype, cfg.grad_checkpoint, device)
        log(f"memory: about {est.describe()} per process")
        seed_everything(cfg.seed)
        with torch.device(device):
            model = GPT(config)
    config = model.config
    model.grad_checkpoint = cfg.grad_checkpoint

    grad_accum = _grad_accum(cfg, world)
    with distributed.main_first():  # rank 0 tokenizes into the cache, the others read it
        dataset = TokenDataset.build(cfg.data, tok, cache_dir=cfg.cache_dir or str(cfg.save) + ".cache")
    train_data = PackingLoader(dataset, "train", cfg.batch_size, cfg.seq_len, seed=cfg.seed, rank=rank,
                               world_size=world)
    tokens_per_step = cfg.batch_size * cfg.seq_len * grad_accum * world
    if not cfg.steps:
        cfg.steps = max(1, round(cfg.tokens_params_ratio * model.num_params() / tokens_per_step))
    log(f"model: depth {config.n_layer}, dim {config.n_embd}, heads {config.n_head}/{config.n_kv_head} kv, "
        f"{model.num_params() / 1e6:.1f}M params | {cfg.steps} steps x {tokens_per_step:,} tokens "
        f"({grad_accum} micro-batches{f' x {world} processes' if world > 1 else ''}) | {device.type} "
        f"{str(dtype).removeprefix('torch.')} | "
        f"{dataset.num_tokens:,} tokens in {dataset.num_docs:,} documents")

    token_bytes = torch.tensor(tok.token_byte_lengths(), dtype=torch.float32, device=device)

    val = PackingLoader(dataset, "val", cfg.batch_size, cfg.seq_len, seed=cfg.seed, rank=rank, world_size=world)

    def evaluate() -> dict:
        val.reset()  # the same validation tokens every time (split between the processes)
        steps = max(1, cfg.eval_tokens // (cfg.batch_size * cfg.seq_len * world))
        return {"val_bpb": round(evaluate_bpb(model, val, steps, token_bytes, device, dtype), 6)}

    def sample() -> str:
        ids = [tok.bos_id] + tok.encode(cfg.sample_prompt)
        out = generate(model, ids, max_tokens=32, temperature=0.0)
        return cfg.sample_prompt + tok.decode(out)

    loop = LoopConfig(steps=cfg.steps, grad_accum=grad_accum, log_every=cfg.log_every, eval_every=cfg.eval_every,
                      sample_every=cfg.sample_every, save_every=cfg.save_every, stop_at=cfg.stop_at)
    return run_stage(model, tok, train_data, cfg.optim, loop, save=cfg.save, stage="base", meta=stage_meta(cfg),
                     device=device, dtype=dtype, compile=cfg.compile, run=run, evaluate=evaluate, sample=sample)
