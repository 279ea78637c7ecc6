"""Linear: nn.Linear with faster paths for inference on CPU.

Its oneDNN path keeps a packed copy of each weight, outside the modules (so that a model still
deep-copies and pickles); free_inference_copies() drops them all, as the trainer does at every
step (a step changes the weights, and the copies cost their memory once more).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.weak import WeakIdKeyDictionary

# oneDNN's linear on a weight packed ahead of time (the op inductor uses for frozen CPU models).
ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
_PACKED = WeakIdKeyDictionary()  # weight -> ((data_ptr, version), packed weight)


def free_inference_copies() -> None:
    """Drop every packed weight copy (they are rebuilt when next needed)."""
    _PACKED.clear()


def has_packed_copy(weight: torch.Tensor) -> bool:
    return weight in _PACKED


class Linear(nn.Linear):
    """nn.Linear (no bias), with faster paths for inference on CPU, where BLAS is slow at the
    few-row products of decoding.

    Decoding is a matrix times a few vectors per layer (one per sequence of the batch), bound by
    reading the weights from memory. BLAS reads them slowly for so few rows: a one-row product
    runs on one thread at about half the memory bandwidth, and 2 to 16 rows are slower still
    (measured: the depth-4 head, 32768 x 384, 4.2 ms for 1 row = 12 GB/s, 10.3 ms for 2).
    - One row (or up to 16 on a smaller weight): cut into 2 or 4 row blocks, the product is a
      batched matmul whose blocks run on every core: 2.2 ms.
    - 2 to 256 rows, weights of 2^18 elements or more: oneDNN's linear on a copy of the weight
      packed for it, repacked when the weight changes (its version counter moves on every in-place
      update). At 8 rows 1.4x (the head) to 3x (a depth-8 MLP matrix) faster than BLAS, and 2x on
      the head at 32 to 64 rows (a prompt's prefill); at 512 rows it is no better, so BLAS keeps
      the bigger products (evals, training).
      The packed copy costs the weight's memory once more (the trainer frees it at each step).
    Small weights, which stay in cache, and training (autograd on) take F.linear. Under
    torch.compile the row blocks are what inductor turns into fused kernels of its own (F.linear
    would stay a BLAS call). bench/bench_decode.py measures the whole step."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, device=None, dtype=None):
        if bias:  # every path below computes x @ W.T alone
            raise ValueError("picochat's Linear has no bias")
        super().__init__(in_features, out_features, bias=False, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if w.dtype != x.dtype and not torch.is_autocast_enabled(x.device.type):
            w = w.to(x.dtype)  # bf16 activations of fp32 weights (GPT.computing_in)
        if x.device.type != "cpu" or (torch.is_grad_enabled() and (w.requires_grad or x.requires_grad)):
            return F.linear(x, w)
        rows = x.numel() // max(x.size(-1), 1)
        if 2 <= rows <= 256 and w.numel() >= 1 << 18 and ONEDNN and x.dtype == w.dtype == torch.float32 \
                and not torch.compiler.is_compiling():
            key = (w.data_ptr(), w._version)
            packed_key, packed = _PACKED.get(w, (None, None))
            if packed_key != key:
                # packed for 8 rows: measured as good as a packing for 1 at 1 to 16 rows, better above
                packed = torch.ops.mkldnn._reorder_linear_weight(w.detach(), 8)
                _PACKED[w] = (key, packed)
            y = torch.ops.mkldnn._linear_pointwise(x.reshape(rows, -1), packed, None, "none", [], "")
            return y.view(*x.shape[:-1], w.size(0))
        k = 4 if w.numel() >= 1 << 23 else 2
        if rows <= 16 and w.numel() >= 1 << 16 and w.size(0) % k == 0:
            # the rows as columns whose layout reads as transposed, (k, in, rows) with strides
            # (0, 1, in): a plain reshape's layout sends BLAS down a path 5x slower
            xs = x.reshape(1, rows, -1).expand(k, rows, -1).mT
            y = torch.bmm(w.view(k, -1, w.size(1)), xs)  # (k, out / k, rows)
            return y.permute(2, 0, 1).reshape(*x.shape[:-1], w.size(0))
        return F.linear(x, w)
