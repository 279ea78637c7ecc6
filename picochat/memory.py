"""Will this training config fit? A peak-memory estimate made before any model is built (the
parameters are counted on the meta device, model.param_counts).

Peak = weights + gradients (fp32, 4 bytes per parameter each) + the optimizer's state (Adam's two
moments for embeddings, head and scalars; Muon's momentum), which lives from the first step on,
+ the larger of
- the forward/backward peak: the activations autograd keeps for the micro-batch, plus the fp32
  logits and their gradient in flight, and
- the optimizer step's own: the stacked copy of the gradients Muon orthogonalizes and the
  Newton-Schulz products,
plus a fixed allowance for the runtime (the CUDA context, PyTorch's own libraries).

The activation counts per token were measured with autograd's saved-tensor hooks on this model
(tests/test_memory.py checks them against the same measurement): a full-attention layer keeps
about 4 d + 3 h + 3 kv values per token (d = model width, h = the MLP's inner width, 4 d; kv =
key/value width; SDPA keeps no T x T matrix), a sliding-window layer about 3 d more, a layer with
value embeddings kv + 2 per kv head more, the embedding about 3 d (smear: 2 d more; backout: d),
and the head d more (the gradient of its input, computed in the forward pass). The logits never
exist for more than one chunk of rows at a time (loss.py): the head's peak is a chunk's fp32
logits in flight, 3 x vocab values a token, and the head weight's gradient, kept from the forward
pass. With --grad-checkpoint a layer keeps only its input (d), and one layer's activations are
rebuilt at a time during the backward pass.

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
from .loss import chunk_rows
from .model import param_counts
from .optim import state_values

GiB = 1 << 30
RUNTIME_BYTES = GiB // 2
# The tensors counted above, measured against peak RSS of real CPU training steps (depth 4 and 8,
# with and without --grad-checkpoint), came out 0-15% short: the allocator's caching and the
# backward pass's short-lived buffers. The estimate adds that back.
ALLOCATOR_SLACK = 1.15


@dataclass
class MemoryEstimate:
    weights: int
    grads: int
    optimizer: int  # state kept between steps: Adam's moments, Muon's momentum
    optimizer_step: int  # in flight during a step only: Muon's stacked gradients and Newton-Schulz
    activations: int
    logits: int  # the head's: a chunk of fp32 logits in flight, the head weight's gradient
    runtime: int = RUNTIME_BYTES

    @property
    def total(self) -> int:
        tensors = self.weights + self.grads + self.optimizer + max(self.activations + self.logits, self.optimizer_step)
        return int(ALLOCATOR_SLACK * tensors) + self.runtime

    def describe(self) -> str:
        parts = (("weights", self.weights), ("grads", self.grads), ("optimizer", self.optimizer),
                 ("optimizer step", self.optimizer_step), ("activations", self.activations), ("logits", self.logits))
        return f"{self.total / GiB:.1f} GiB (" + ", ".join(f"{k} {v / GiB:.2f}" for k, v in parts) + ")"


def activation_values_per_token(config: ModelConfig, grad_checkpoint: bool) -> float:
    """Values autograd keeps per token through the backward pass (eager)."""
    d, kv = config.n_embd, config.n_kv_head * config.head_dim
    layers = [4 * d + 3 * config.mlp_hidden + 3 * kv + (3 * d if w else 0)
              + (kv + 2 * config.n_kv_head if config.has_value_embed(i) else 0)
              for i, w in enumerate(config.layer_windows())]
    embedding = 3 * d + (2 * d + 2 if config.smear else 0) + (d if config.backout else 0)
    head = d  # the loss's gradient with respect to the head's input, made in the forward pass
    if grad_checkpoint:  # every layer's input, plus one layer rebuilt at a time
        return embedding + config.n_layer * d + max(layers) + head
    return embedding + sum(layers) + head


def norm_inputs_per_token(config: ModelConfig, grad_checkpoint: bool) -> float:
    """Values a token feeds the RMSNorms whose inputs autograd keeps: a block's two and the
    queries' and keys' (3 d + kv), the embedding's and the final one (2 d)."""
    d, kv = config.n_embd, config.n_kv_head * config.head_dim
    return (1 if grad_checkpoint else config.n_layer) * (3 * d + kv) + 2 * d


def activation_bytes_per_token(config: ModelConfig, dtype: torch.dtype, grad_checkpoint: bool = False) -> float:
    """Bytes kept per token through the backward pass on the path a run takes. fp32: 4 a value.
    bf16 (GPT.computing_in): 2 a value, but 4 for each RMSNorm input, of which PyTorch's rms_norm
    keeps an fp32 copy in place of the input (measured with saved-tensor hooks: tests/test_memory.py).
    A compiled step is counted as an eager one: the compiled graph's saved tensors at d20's width
    (2 layers) came to 238 KiB a token against this count's 240 in fp32, and 119 against 145 in
    bf16: an upper bound."""
    size = 4 if dtype == torch.float32 else 2
    kept = size * activation_values_per_token(config, grad_checkpoint)
    if size == 2:
        kept += 2 * norm_inputs_per_token(config, grad_checkpoint)
    return kept


def head_bytes(config: ModelConfig, tokens: int) -> int:
    """The loss's own peak (loss.py): one chunk's fp32 logits in flight (the tanh, the logits and
    their gradient: 3 x vocab values a token) and the head weight's fp32 gradient."""
    return 4 * (3 * min(tokens, chunk_rows(config.vocab_size)) * config.vocab_size
                + config.padded_vocab * config.n_embd)


def estimate_training_memory(config: ModelConfig, rows: int, seq_len: int, dtype: torch.dtype,
                             grad_checkpoint: bool = False, world: int = 1, lora: LoraConfig | None = None
                             ) -> MemoryEstimate:
    """Peak bytes of one of `world` processes training `rows` x `seq_len` micro-batches (each keeps
    its share of the optimizer's state: muon.py, sharded_adamw.py), the whole model or, with
    `lora`, its adapters."""
    counts = param_counts(config)
    params = sum(counts.values())
    tokens = rows * seq_len
    kept = tokens * activation_bytes_per_token(config, dtype, grad_checkpoint)
    if dtype != torch.float32:  # each block matrix's bf16 copy, kept for the backward (checkpointed: one block's)
        kept += 2 * counts["matrix"] // (config.n_layer if grad_checkpoint else 1)
    if lora is None or not lora.lora:
        return MemoryEstimate(weights=4 * params, grads=4 * params, optimizer=4 * state_values(counts) // world,
                              optimizer_step=8 * counts["matrix"], activations=int(kept),
                              logits=head_bytes(config, tokens))
    trained, layers = adapter_shape(config, lora)
    kept += tokens * (4 if dtype == torch.float32 else 2) * lora.lora * layers // (
        config.n_layer if grad_checkpoint else 1)
    return MemoryEstimate(weights=4 * (params + trained), grads=4 * trained, optimizer=8 * trained // world,
                          optimizer_step=0, activations=int(kept), logits=head_bytes(config, tokens))


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
                          grad_checkpoint: bool, device: torch.device, lora: LoraConfig | None = None
                          ) -> MemoryEstimate:
    """The estimate; a clear error, before anything is allocated, when it cannot fit.
    PICOCHAT_MEMORY_CHECK=0 skips the refusal (the estimate is an estimate)."""
    est = estimate_training_memory(config, rows, seq_len, dtype, grad_checkpoint, distributed.world_size(), lora)
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
