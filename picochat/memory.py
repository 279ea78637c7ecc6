"""Will this training config fit? A peak-memory estimate made before any model is built (the
parameters are counted on the meta device, model.param_counts).

Peak = weights + gradients (fp32, 4 bytes per parameter each) + the optimizer's state (Adam's two
moments for embeddings, head and scalars; Muon's momentum), which lives from the first step on,
+ the larger of
- the forward/backward peak: the activations autograd keeps for the micro-batch, plus the fp32
  logits and their gradient in flight, and
- the optimizer step's own: the stacked copy of the gradients Muon orthogonalizes and the
  Newton-Schulz products,
times what the allocator holds besides (allocator_slack: measured per path on CPU), plus a fixed
allowance for the runtime (the CUDA context, PyTorch's own libraries).

The activations a token keeps (activation_bytes_per_token) were measured with autograd's
saved-tensor hooks on this model (tests/test_memory.py checks the count against the same
measurement): about 5 d + 2 kv + h values a layer (d = model width, h = the MLP's inner width,
kv = key/value width; ops.py's norms and ReLU^2 keep nothing more, SDPA no T x T matrix). The
logits never exist for more than one chunk of rows at a time (loss.py): the head's peak is a
chunk's logits in flight, 2 fp32 values a logit (head_bytes), and the head weight's gradient,
kept from the forward pass.

With LoRA (lora.py) the model's weights are frozen: only the adapters (and the special tokens'
rows) have gradients and AdamW's two moments; the head still makes a whole weight gradient, of
which its special rows are kept. Each adapted layer keeps its rank's values a token more; the
frozen layers' activations are counted as the full model's (an upper bound: a frozen Linear keeps
no input for a weight gradient).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from . import distributed
from .common import PicochatError
from .config import ModelConfig
from .lora import LoraConfig, adapter_shape
from .loss import chunk_rows, traced_when_compiled
from .model import param_counts
from .optim import state_values

GiB = 1 << 30
RUNTIME_BYTES = GiB // 2


def allocator_slack(device_type: str, dtype: torch.dtype, compiled: bool) -> float:
    """What the allocator holds besides the live tensors, as a factor on them. Measured on CPU
    against the peak RSS of real training steps at depth 4, 8 and 12 (bench/bench_memory.py):
    - eager fp32: 1.35. glibc's malloc serves blocks under its (rising) mmap threshold from its
      heap, where freed ones stay resident: with the threshold fixed (MALLOC_MMAP_THRESHOLD_) the
      peak is the tensors', but each step is 30% slower, so users run with the heap as it is;
    - eager bf16 and compiled steps (inductor reuses its buffers): 1.0, the tensors themselves.
    CUDA's caching allocator and MPS are unmeasured: 1.15, the one allowance this estimate had for
    every path before the CPU's were measured apart."""
    if device_type != "cpu":
        return 1.15
    return 1.35 if dtype == torch.float32 and not compiled else 1.0


@dataclass
class MemoryEstimate:
    weights: int
    grads: int
    optimizer: int  # state kept between steps: Adam's moments, Muon's momentum
    optimizer_step: int  # in flight during a step only: Muon's stacked gradients and Newton-Schulz
    activations: int
    logits: int  # the head's: a chunk of fp32 logits in flight, the head weight's gradient
    slack: float  # allocator_slack
    runtime: int = RUNTIME_BYTES

    @property
    def total(self) -> int:
        tensors = self.weights + self.grads + self.optimizer + max(self.activations + self.logits, self.optimizer_step)
        return int(self.slack * tensors) + self.runtime

    def describe(self) -> str:
        parts = (("weights", self.weights), ("grads", self.grads), ("optimizer", self.optimizer),
                 ("optimizer step", self.optimizer_step), ("activations", self.activations), ("logits", self.logits))
        return f"{self.total / GiB:.1f} GiB (" + ", ".join(f"{k} {v / GiB:.2f}" for k, v in parts) + ")"


def activation_bytes_per_token(config: ModelConfig, dtype: torch.dtype, grad_checkpoint: bool = False) -> float:
    """Bytes autograd keeps per token through the backward pass (eager), `dtype` the activations'
    (fp32, or bf16 under GPT.computing_in): s bytes a value, and 4 for each row's fp32 reciprocal
    RMS (a norm's) and log-normalizer (attention's, one per head).

    A layer keeps its input (for its residual scalar's gradient), the two norms' outputs (which
    the Linears after them keep anyway), the queries, keys and values, attention's output and
    the MLP's pre-activation: 5 d + 2 kv + h values (ops.py keeps no more). A sliding-window layer
    keeps attention's padded blocks besides (banded_attention: the queries, and keys and values
    reaching one window further back), a layer with value embeddings the embedding and its gate.
    The embedding keeps its norm's output (smear: the previous token's too; backout: the middle
    layer's output), the head the final norm's output and the gradient of its input, made in the
    forward pass (loss.py); and the backward pass, entering a layer, holds gradients of its width
    and its MLP's. With --grad-checkpoint a layer keeps only its inputs, and one layer's
    activations are rebuilt at a time during the backward pass.

    A compiled step keeps the same tensors (at d20's width, 2 layers, 2,048 tokens: 76 KiB a token
    in bf16 either way), so they are counted alike; what differs is the head (head_bytes) and the
    allocator (allocator_slack)."""
    s = 4 if dtype == torch.float32 else 2
    d, kv, n = config.n_embd, config.n_kv_head * config.head_dim, config.sequence_len

    def layer(i: int, window: int) -> float:
        values = 5 * d + 2 * kv + config.mlp_hidden
        if window and window < n:
            values += d + 2 * kv * (1 + window / n)
        if config.has_value_embed(i):
            values += kv + 2 * config.n_kv_head
        return s * values + 4 * (2 + 2 * config.n_head + config.n_kv_head)

    layers = [layer(i, w) for i, w in enumerate(config.layer_windows())]
    embedding = s * d + 4 + (s * (d + 2) if config.smear else 0) + (s * d if config.backout else 0)
    head = 2 * s * d + 4
    backward = s * (config.mlp_hidden + d)  # a layer's gradients in flight, when its backward pass begins
    if grad_checkpoint:  # every layer's inputs (its residual stream, its value embedding), one layer rebuilt
        inputs = s * sum(d + (kv if config.has_value_embed(i) else 0) for i in range(config.n_layer))
        return embedding + inputs + max(layers) + head + backward
    return embedding + sum(layers) + head + backward


def head_bytes(config: ModelConfig, tokens: int, dtype: torch.dtype = torch.float32, compiled: bool = False) -> int:
    """The loss's own peak (loss.py): one chunk's logits in flight (their fp32 tanh and softmax; in
    bf16 the bf16 gradient besides: 8 or 10 bytes a logit) and the head weight's fp32 gradient.
    torch.compile traces the loss through when the micro-batch's fp32 logits are small enough
    (loss.traced_when_compiled), and then its chunk is the whole micro-batch."""
    per_logit = 8 if dtype == torch.float32 else 10
    traced = compiled and traced_when_compiled(tokens, config.vocab_size)
    rows = tokens if traced else min(tokens, chunk_rows(config.vocab_size))
    return per_logit * rows * config.vocab_size + 4 * config.padded_vocab * config.n_embd


def estimate_training_memory(config: ModelConfig, rows: int, seq_len: int, dtype: torch.dtype,
                             grad_checkpoint: bool = False, world: int = 1, lora: LoraConfig | None = None, *,
                             device_type: str, compiled: bool = False) -> MemoryEstimate:
    """Peak bytes of one of `world` processes training `rows` x `seq_len` micro-batches (each keeps
    its share of the optimizer's state: muon.py, sharded_adamw.py), the whole model or, with
    `lora`, its adapters, on a device of `device_type` ("cpu", "cuda", "mps"), `compiled` or eager."""
    counts = param_counts(config)
    params = sum(counts.values())
    tokens = rows * seq_len
    kept = tokens * activation_bytes_per_token(config, dtype, grad_checkpoint)
    logits, slack = head_bytes(config, tokens, dtype, compiled), allocator_slack(device_type, dtype, compiled)
    if dtype != torch.float32:  # each block matrix's bf16 copy, kept for the backward (checkpointed: one block's)
        kept += 2 * counts["matrix"] // (config.n_layer if grad_checkpoint else 1)
    if lora is None or not lora.lora:
        return MemoryEstimate(weights=4 * params, grads=4 * params, optimizer=4 * state_values(counts) // world,
                              optimizer_step=8 * counts["matrix"], activations=int(kept), logits=logits, slack=slack)
    trained, layers = adapter_shape(config, lora)
    kept += tokens * (4 if dtype == torch.float32 else 2) * lora.lora * layers // (
        config.n_layer if grad_checkpoint else 1)
    return MemoryEstimate(weights=4 * (params + trained), grads=4 * trained, optimizer=8 * trained // world,
                          optimizer_step=0, activations=int(kept), logits=logits, slack=slack)


def available_memory(device: torch.device) -> int | None:
    """Bytes this process may use on `device`, or None when unknown."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    if device.type == "mps":
        return int(torch.mps.recommended_max_memory())
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        avail = int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        try:
            avail = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
    return avail // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))  # torchrun's CPU processes share it


def check_training_memory(config: ModelConfig, rows: int, seq_len: int, dtype: torch.dtype,
                          grad_checkpoint: bool, device: torch.device, lora: LoraConfig | None = None,
                          compiled: bool = False) -> MemoryEstimate:
    """The estimate; a clear error, before anything is allocated, when it cannot fit.
    PICOCHAT_MEMORY_CHECK=0 skips the refusal (the estimate is an estimate)."""
    est = estimate_training_memory(config, rows, seq_len, dtype, grad_checkpoint, distributed.world_size(), lora,
                                   device_type=device.type, compiled=compiled)
    have = available_memory(device)
    if have is None or os.environ.get("PICOCHAT_MEMORY_CHECK", "1") == "0" or est.total <= have:
        return est
    hints = [] if grad_checkpoint else ["--grad-checkpoint"]
    if rows > 1:
        hints.append("a smaller --batch-size (keep the batch with --total-batch-tokens / --grad-accum)")
    hints.append("a smaller --depth or --seq-len")
    raise PicochatError(f"this config needs about {est.describe()} on {device.type}, which has "
                        f"{have / GiB:.1f} GiB available: try {', or '.join(hints)} "
                        "(PICOCHAT_MEMORY_CHECK=0 to try anyway)")
