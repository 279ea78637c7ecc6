"""Bits per byte: the loss measured per byte of text, so it compares across tokenizers.

Summed cross-entropy in nats over every target token, divided by ln 2 and by the UTF-8 bytes those
targets stand for. Special tokens (BOS between documents) are text of zero bytes: they are left
out of both sums, so the number depends on the text alone, not on how it is split or packed."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .. import distributed
from ..common import PicochatError, Progress, autocast, log
from ..data.loader import TokenDataset
from ..data.sources import TEXT_FILES, list_files
from ..inference import LoadOptions, open_for_inference
from ..settings import check, setting
from .results import eval_name, save_eval


def rows_desc(x: torch.Tensor) -> str:
    return f"{x.numel():,} tokens a batch"


@torch.no_grad()
def evaluate_bpb(model, batches, steps: int, token_bytes: torch.Tensor, device, dtype, progress: bool = False) -> float:
    """batches: anything with next_batch() -> (x, y) LongTensors; token_bytes[id] = bytes of id.
    progress: a progress line (batches, ETA) as it goes."""
    nats = torch.zeros((), dtype=torch.float64, device=device)
    nbytes = torch.zeros((), dtype=torch.float64, device=device)
    bar = Progress(steps, desc="bpb", every=max(1, steps // 20)) if progress else None
    for step in range(steps):
        x, y = (t.to(device) for t in batches.next_batch())
        with autocast(device, dtype):
            loss = model(x, y, loss_reduction="none").view(-1)
        y = y.view(-1)
        b = torch.where(y >= 0, token_bytes[y.clamp(min=0)], 0)
        nats += (loss.double() * (b > 0)).sum()
        nbytes += b.double().sum()
        if bar is not None:
            bar.update(step + 1, f"| {rows_desc(x)}")
    if bar is not None:
        bar.close()
    distributed.all_reduce_([nats.view(1), nbytes.view(1)])  # under torchrun each process saw its share
    return float(nats / (math.log(2) * nbytes.clamp(min=1)))


class _Sequential:
    """Every token of a dataset once, in order, as (B, T) rows: all of the text is held out."""

    def __init__(self, tokens, batch_size: int, seq_len: int):
        self.tokens, self.B, self.T, self.pos = tokens, batch_size, seq_len, 0

    def batches_left(self) -> int:
        return (len(self.tokens) - 1 - self.pos) // (self.B * self.T)

    def next_batch(self):
        n = self.B * self.T
        chunk = torch.from_numpy(self.tokens[self.pos:self.pos + n + 1].astype("int64"))
        self.pos += n
        return chunk[:-1].view(self.B, self.T), chunk[1:].view(self.B, self.T)


@dataclass
class BpbConfig:
    model: LoadOptions = setting(help="the model to use")
    data: list[str] = setting(help=f"held-out text: {TEXT_FILES}")
    seq_len: int = setting(0, "tokens per row (default: the model's context)", low=0)
    batch_size: int = setting(8, "rows per forward", low=1)
    max_tokens: int = setting(1_000_000, "evaluate at most this many tokens", low=1)


def eval_bpb(cfg: BpbConfig) -> float:
    """`picochat eval bpb`: bits per byte of a run dir's model on every token of `data` (up to
    max_tokens), with progress; the result goes into <run>/evals/bpb.json."""
    check(cfg)
    list_files(cfg.data)  # the data exists before the model loads
    run = open_for_inference(cfg.model)
    seq_len = cfg.seq_len or run.config.sequence_len
    if seq_len > run.config.sequence_len:
        raise PicochatError(f"--seq-len {seq_len} is longer than the model's context ({run.config.sequence_len})")
    ds = TokenDataset.build(cfg.data, run.tokenizer)
    rows = _Sequential(ds.tokens, cfg.batch_size, seq_len)
    steps = min(rows.batches_left(), max(1, cfg.max_tokens // (cfg.batch_size * seq_len)))
    if steps < 1:
        rows = _Sequential(ds.tokens, 1, min(seq_len, len(ds.tokens) - 1))
        steps = 1
    token_bytes = torch.tensor(run.tokenizer.token_byte_lengths(), dtype=torch.float32, device=run.device)
    tokens = steps * rows.B * rows.T
    log(f"bpb: {tokens:,} tokens of {ds.num_tokens:,}, {steps} batches of {rows.B} x {rows.T}")
    bpb = evaluate_bpb(run.model, rows, steps, token_bytes, run.device, run.dtype, progress=True)
    save_eval(run.path, eval_name(run, "bpb"), {"bpb": bpb, "data": ", ".join(map(str, cfg.data)),
                                                 "tokens": tokens, "n": tokens})
    return bpb
