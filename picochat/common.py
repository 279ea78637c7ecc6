"""Shared plumbing: the project error, device and dtype choice, seeding, logging and progress.

Everything here is small and has exactly one home, so that every stage makes the same choice the
same way (which device, which dtype, what counts as peak FLOP/s for MFU).
"""

from __future__ import annotations

import contextlib
import os
import random
import sys
import time
from pathlib import Path

import torch


class PicochatError(Exception):
    """An error the user can cause and fix: the CLI prints `error: <message>` and exits 2."""
    label, exit_code = "error", 2


# ----------------------------------------------------------------------------- devices and dtypes

DEVICES = ("auto", "cpu", "mps", "cuda")
DTYPES = ("auto", "fp32", "bf16")
DEVICE_HELP = f"one of {', '.join(DEVICES)} or cuda:N (auto: cuda > mps > cpu)"
DTYPE_HELP = "compute dtype (auto: bf16 on CUDA and on CPUs with native bf16, else fp32)"


def choose_device(name: str = "auto") -> torch.device:
    """auto: cuda > mps > cpu. A named device that is not there is a user error, not a fallback."""
    if name not in DEVICES and not name.startswith("cuda:"):
        raise PicochatError(f"unknown device {name!r} (choose from {', '.join(DEVICES)})")
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise PicochatError(f"device {name!r} requested but CUDA is not available")
    if name == "mps" and not torch.backends.mps.is_available():
        raise PicochatError("device 'mps' requested but MPS is not available")
    return torch.device(name)


CPU_BF16_ENV = "PICOCHAT_CPU_BF16"


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX). Without it, PyTorch's CPU
    bf16 matmul falls back to a scalar path hundreds of times slower than fp32 (measured: 0.3 vs
    128 GFLOP/s on an AVX2-only EPYC), so every `auto` precision choice on CPU asks this.

    PICOCHAT_CPU_BF16=1 or 0 answers instead of the hardware, so that one machine can run both
    CPU paths (the tests do: tests/conftest.py)."""
    forced = os.environ.get(CPU_BF16_ENV, "")
    if forced:
        if forced not in ("0", "1"):
            raise PicochatError(f"{CPU_BF16_ENV} must be 0 or 1, not {forced!r}")
        return forced == "1"
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def choose_dtype(name: str, device: torch.device, decode: bool = False) -> torch.dtype:
    """The compute dtype for autocast. Weights and optimizer state always stay fp32.

    decode: for generating a few rows at a time, where autocast's cast of every fp32 weight at
    every step costs more than bf16 saves: on CPU `auto` is then fp32 (measured on AVX512-BF16,
    depth 4 and 8: 2x to 3x slower at batch 1, no faster at batch 8)."""
    if name not in DTYPES:
        raise PicochatError(f"unknown dtype {name!r} (choose from {', '.join(DTYPES)})")
    if name == "fp32":
        return torch.float32
    if name == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if device.type == "cpu":
        return torch.bfloat16 if cpu_has_fast_bf16() and not decode else torch.float32
    return torch.float32  # mps: fp32 until bf16 autocast is measured to help there


def choose_compile(flag: bool | None, device: torch.device) -> bool:
    """Whether to torch.compile: as asked, else on CUDA only. On a CPU compiling costs 40 to 60 s
    for 5 to 25%% more tokens a second (bench/bench_train.py), so it is worth it only for long
    runs, which can ask for it; on a GPU it fuses what eager mode runs as separate kernels."""
    return device.type == "cuda" if flag is None else flag


def autocast(device: torch.device, dtype: torch.dtype):
    """bf16 autocast where asked; a no-op context for fp32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def peak_flops(device: torch.device, dtype: torch.dtype) -> float:
    """Dense matmul peak used for MFU. Overridable with PICOCHAT_PEAK_FLOPS (FLOP/s).

    CPU numbers are per-machine: bench/bench_matmul.py measures them; the defaults are the 2-core
    figures measured on the reference machine (docs in the README)."""
    env = os.environ.get("PICOCHAT_PEAK_FLOPS")
    if env:
        return float(env)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        table = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "4090": 165e12,
                 "3090": 71e12}
        for key, val in table.items():
            if key in name:
                return val if dtype == torch.bfloat16 else val / 2
        return 100e12
    if device.type == "mps":
        return 10e12
    threads = torch.get_num_threads()
    per_thread = 100e9 if dtype == torch.float32 else 200e9
    return per_thread * threads


def set_threads(count: int = 0) -> None:
    """Use `count` threads, or (0) every core the process may run on (PyTorch sometimes picks
    fewer); under torchrun, the node's processes split the cores between them."""
    if count > 0:
        torch.set_num_threads(count)
        return
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:
        n = os.cpu_count() or 1
    n = max(1, n // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------- atomic files

def fsync(path: str | os.PathLike) -> None:
    """Flush a file's or a directory's entries to disk (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary name next to `path`; once the body has written it, fsync it and rename it
    over `path`. A crash leaves the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        fsync(tmp)
        os.replace(tmp, path)
        fsync(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def save_safetensors(tensors: dict, path: str | os.PathLike) -> None:
    """safetensors' save_file, the file then given the mode the umask gives every other file:
    save_file creates it 0600, so another account (a web server, a group, a container's user)
    could not read the model beside a readable config.json."""
    from safetensors.torch import save_file
    save_file(tensors, path, metadata={"format": "pt"})
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def write_atomic(path: str | os.PathLike, data: str | bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)


# ----------------------------------------------------------------------------- logging and progress

def first_line(e: BaseException, limit: int = 200) -> str:
    """An exception's first line, for a one-line message (compilers' errors run to pages)."""
    return (str(e).strip().splitlines() or [""])[0][:limit]


def log(msg: str) -> None:
    """The one place that prints. Rank 0 only under torchrun."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(msg, file=sys.stderr if os.environ.get("PICOCHAT_LOG_STDERR") else sys.stdout, flush=True)


def format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    if seconds >= 2 * 86400:  # a plan's week-long stage: hours stop saying much
        return f"{seconds / 86400:,.1f} days"
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def format_count(n: float) -> str:
    """1,234,567 -> "1.2M"; billions with two decimals ("11.22B"), as token budgets are quoted."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}" if unit == "B" else f"{n / size:.1f}{unit}"
    return str(int(n))


class Progress:
    """Step progress: on a terminal, one line rewritten in place; otherwise plain log lines. The
    ETA is the rate of the steps this process has done (`start`: where a resumed run began)."""

    def __init__(self, total: int, desc: str = "", every: int = 1, start: int = 0):
        self.total, self.desc, self.every = total, desc, max(1, every)
        self.t0, self.first = time.perf_counter(), start
        self.tty = sys.stdout.isatty() and int(os.environ.get("RANK", "0")) == 0
        self.done = start

    def update(self, step: int, msg: str = "", force: bool = False) -> None:
        self.done = step
        if not (force or self.tty or step % self.every == 0 or step == self.total):
            return
        elapsed = time.perf_counter() - self.t0
        ran = step - self.first
        eta = format_duration(elapsed / ran * (self.total - step)) if ran > 0 else "?"
        line = f"{self.desc} {step}/{self.total} {msg} | eta {eta}".strip()
        if self.tty:
            print("\r\033[K" + line, end="", flush=True)
        else:
            log(line)

    def close(self) -> None:
        if self.tty:
            print(flush=True)
