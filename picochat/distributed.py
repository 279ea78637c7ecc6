"""Data-parallel training under torchrun: process group, who is rank 0, and the few collectives.

`torchrun --nproc_per_node N -m picochat pretrain ...` starts N copies of the same command with
RANK / WORLD_SIZE / LOCAL_RANK set; `setup()` sees them and joins the process group (NCCL on CUDA,
gloo on CPU). Without torchrun every function here is a no-op for a world of one, so the stages
call them unconditionally.

The data-parallel recipe, in one place:
- every rank builds the same model from the same seed (then rank 0's weights are broadcast, so
  nothing depends on init being bitwise deterministic across devices);
- each rank takes its own slice of every global batch (the loaders' `rank` / `world_size`);
- a step's summed loss is divided by the token count of the WHOLE global batch, so the gradients
  summed across ranks equal one process's gradient on the global batch — 2 ranks x B/2 rows train
  the same weights as 1 rank x B;
- the optimizer's state is sharded (ZeRO-2): each rank reduce-scatters the gradients, keeps the
  state of its share of the weights, updates that share and all-gathers it (muon.py,
  sharded_adamw.py); a checkpoint gathers the shares into one process's state;
- rank 0 alone logs and writes run dirs; every rank reads the run dir to resume.
Counts and statistics that live on the host are summed over a gloo group even under NCCL, so
reading them never waits for the GPU.
"""

from __future__ import annotations

import contextlib
import datetime
import os

import torch
import torch.distributed as dist

from .common import PicochatError

_host_group = None  # gloo group for host-side numbers (the default group under gloo)


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def launched() -> bool:
    """Whether torchrun (or another launcher setting the same variables) started this process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def local_device(device: torch.device) -> torch.device:
    """Under torchrun each process drives its own GPU: cuda:LOCAL_RANK."""
    if device.type == "cuda" and launched() and device.index is None:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def setup(device: torch.device) -> tuple[int, int]:
    """Join the process group if torchrun started us (idempotent). Returns (rank, world_size)."""
    global _host_group
    if not launched() or dist.is_initialized():
        return rank(), world_size()
    if device.type == "mps":
        raise PicochatError("torchrun with --device mps: MPS has no multi-process backend; run one process")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    minutes = float(os.environ.get("PICOCHAT_DIST_TIMEOUT_MIN", "30"))
    dist.init_process_group(backend, timeout=datetime.timedelta(minutes=minutes),
                            **({"device_id": device} if device.type == "cuda" else {}))
    _host_group = dist.new_group(backend="gloo") if backend == "nccl" else dist.group.WORLD
    return rank(), world_size()


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def peer_lost(e: BaseException) -> bool:
    """Whether an exception is a collective failing because another process is gone."""
    if not dist.is_initialized():
        return False
    return isinstance(e, dist.DistError) or any(k in str(e) for k in ("gloo", "NCCL", "Connection reset",
                                                                      "Connection closed"))


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier(group=_host_group)


@contextlib.contextmanager
def main_first():
    """Rank 0 runs the body first (tokenizing into a cache, training a tokenizer), the others
    after it, when they find its results on disk."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()


def sum_host(values: list[float]) -> list[float]:
    """Element-wise sum of a few host numbers over all ranks."""
    return _reduce_host(values, dist.ReduceOp.SUM)


def max_host(values: list[float]) -> list[float]:
    """Element-wise maximum of a few host numbers over all ranks (one rank's "yes" is everyone's)."""
    return _reduce_host(values, dist.ReduceOp.MAX)


def _reduce_host(values: list[float], op) -> list[float]:
    if not dist.is_initialized():
        return [float(v) for v in values]
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, op=op, group=_host_group)
    return t.tolist()


def all_gather_objects(obj) -> list:
    """[rank 0's obj, rank 1's, ...] on every rank (pickled over the host group)."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj, group=_host_group)
    return out


def gather_objects(obj) -> list | None:
    """[rank 0's obj, rank 1's, ...] on rank 0, None elsewhere (pickled over the host group)."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * world_size() if is_main() else None
    dist.gather_object(obj, out, dst=0, group=_host_group)
    return out


def all_reduce_(tensors: list[torch.Tensor]) -> None:
    """Sum tensors of one dtype and device over all ranks, in place, as one flat message."""
    if not dist.is_initialized() or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    for t, part in zip(tensors, flat.split([t.numel() for t in tensors])):
        t.copy_(part.view_as(t))


def broadcast_params(module: torch.nn.Module) -> None:
    """Rank 0's weights everywhere."""
    if not dist.is_initialized():
        return
    for t in list(module.parameters()) + list(module.buffers()):
        dist.broadcast(t.data, 0)


def pad_rows(t: torch.Tensor, k: int) -> torch.Tensor:
    """t with zero rows appended up to k rows."""
    return t if len(t) == k else torch.cat([t, t.new_zeros((k - len(t), *t.shape[1:]))])


def reduce_scatter_rows(full: torch.Tensor, k: int) -> torch.Tensor:
    """This rank's rows [rank * k, (rank + 1) * k) of the sum over ranks of `full` (n rows, n <=
    world * k; the rows past n are zeros): ZeRO's gradient reduction, each rank receiving the sum
    of its own share only."""
    out = full.new_empty((k, *full.shape[1:]))
    # reduce_scatter_single is torch 2.13's name (reduce_scatter_tensor warns there), the other older torch's
    reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    reduce_scatter(out, pad_rows(full, world_size() * k).contiguous())
    return out


def all_gather_rows(part: torch.Tensor, n: int):
    """Each rank holds rows [r * k, (r + 1) * k) of an (n, ...) tensor, k = ceil(n / world),
    zero-padded to k rows. Starts gathering the whole tensor and returns a function that waits for
    it, so the caller can compute the next part while this one travels."""
    parts = [torch.empty_like(part) for _ in range(world_size())]
    work = dist.all_gather(parts, part, async_op=True)

    def result() -> torch.Tensor:
        work.wait()
        return torch.cat(parts)[:n]
    return result


def shard_bounds(n: int) -> tuple[int, int, int]:
    """(lo, hi, k): this rank's rows [lo, hi) of n, in chunks of k = ceil(n / world)."""
    k = -(-n // world_size())
    lo = min(rank() * k, n)
    return lo, min(lo + k, n), k
