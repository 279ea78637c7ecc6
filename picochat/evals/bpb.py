"""Bits per byte: the loss measured per byte of text, so it compares across tokenizers.

Summed cross-entropy in nats over every target token, divided by ln 2 and by the UTF-8 bytes those
targets stand for. Special tokens (BOS between documents) are text of zero bytes: they are left
out of both sums, so the number depends on the text alone, not on how it is split or packed."""

from __future__ import annotations

import json
import math

import torch

from .. import distributed
from ..common import autocast


@torch.no_grad()
def evaluate_bpb(model, batches, steps: int, token_bytes: torch.Tensor, device, dtype) -> float:
    """batches: anything with next_batch() -> (x, y) LongTensors; token_bytes[id] = bytes of id."""
    nats = torch.zeros((), dtype=torch.float64, device=device)
    nbytes = torch.zeros((), dtype=torch.float64, device=device)
    for _ in range(steps):
        x, y = (t.to(device) for t in batches.next_batch())
        with autocast(device, dtype):
            loss = model(x, y, loss_reduction="none").view(-1)
        y = y.view(-1)
        b = torch.where(y >= 0, token_bytes[y.clamp(min=0)], 0)
        nats += (loss.double() * (b > 0)).sum()
        nbytes += b.double().sum()
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


def eval_bpb_files(load: str, data: list[str], seq_len: int = 0, batch_size: int = 8,
                   max_tokens: int = 1_000_000, device: str = "auto", dtype: str = "auto",
                   int8: bool = False) -> float:
    """`picochat eval bpb`: bits per byte of a run dir's model on every token of `data`."""
    from ..checkpoint import load_run
    from ..common import PicochatError, choose_device, choose_dtype, log, set_threads, write_atomic
    from ..data.loader import TokenDataset

    set_threads()
    dev = choose_device(device)
    run = load_run(load, dev, int8=int8)
    seq_len = seq_len or run.config.sequence_len
    if seq_len > run.config.sequence_len:
        raise PicochatError(f"--seq-len {seq_len} is longer than the model's context ({run.config.sequence_len})")
    ds = TokenDataset.build(data, run.tokenizer)
    rows = _Sequential(ds.tokens, batch_size, seq_len)
    steps = min(rows.batches_left(), max(1, max_tokens // (batch_size * seq_len)))
    if steps < 1:
        rows = _Sequential(ds.tokens, 1, min(seq_len, len(ds.tokens) - 1))
        steps = 1
    token_bytes = torch.tensor(run.tokenizer.token_byte_lengths(), dtype=torch.float32, device=dev)
    tokens = steps * rows.B * rows.T
    log(f"bpb: {tokens:,} tokens of {ds.num_tokens:,}")
    bpb = evaluate_bpb(run.model, rows, steps, token_bytes, dev, choose_dtype(dtype, dev))
    from .chat_eval import eval_stem
    (run.path / "evals").mkdir(exist_ok=True)  # for the report card
    write_atomic(run.path / "evals" / f"{eval_stem(run, 'bpb')}.json",
                 json.dumps({"bpb": bpb, "data": ", ".join(map(str, data)), "tokens": tokens}) + "\n")
    return bpb
