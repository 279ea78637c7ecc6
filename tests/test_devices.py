"""Accelerator paths, and the fallbacks that keep a run going where a device or torch.compile lacks
something. The CUDA and MPS tests skip on a machine without that device; run the suite on one."""

import os
import subprocess
import sys

import pytest
import torch

from picochat.common import CPU_BF16_ENV, PicochatError, choose_dtype
from picochat.config import ModelConfig
from picochat.engine import Engine
from picochat.fp8 import fp8_problem
from picochat.model import GPT, flops_per_token
from picochat.muon import ns_dtype_for
from picochat.optim import OptimConfig, build_optimizer
from picochat.train.loop import LoopConfig, Trainer

from .conftest import complete, randomized

pytestmark = pytest.mark.usefixtures("one_thread")

ACCELERATORS = [pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                                 reason="no CUDA device here")]),
                pytest.param("mps", marks=pytest.mark.skipif(not torch.backends.mps.is_available(),
                                                             reason="no MPS device here"))]


def _model(seed: int = 0) -> GPT:
    """Depth 2 with a sliding-window layer; every weight random so that every path carries signal."""
    cfg = ModelConfig(vocab_size=256, n_layer=2, n_embd=64, n_head=4, n_kv_head=2, sequence_len=64,
                      window_pattern="SL", window=16)
    torch.manual_seed(seed)
    return randomized(GPT(cfg), seed)


class FixedBatches:
    """The same few (inputs, targets) batches in turn: a DataSource for the Trainer."""

    def __init__(self, n: int = 2, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.batches = [torch.randint(0, 256, (2, 65), generator=g) for _ in range(n)]
        self.i = 0

    def next_batch(self):
        t = self.batches[self.i % len(self.batches)]
        self.i += 1
        return t[:, :-1], t[:, 1:]

    def state_dict(self) -> dict:
        return {"i": self.i}

    def load_state_dict(self, state: dict) -> None:
        self.i = state["i"]


def _trainer(model, device, compile: bool = False) -> Trainer:
    cfg = OptimConfig()
    return Trainer(model, build_optimizer(model, cfg), cfg, LoopConfig(steps=4, grad_accum=2), torch.device(device),
                   torch.float32, flops_per_token=flops_per_token(model.config), compile=compile)


def test_mps_fallback_is_switched_on_before_torch_loads():
    """PyTorch reads PYTORCH_ENABLE_MPS_FALLBACK once, when it loads: picochat sets it (to 1, so an
    operator without an MPS kernel runs on the CPU instead of stopping a run) before importing
    torch, and leaves a value the user set alone."""
    code = ("import os, sys; import picochat; assert 'torch' not in sys.modules; "
            "print(os.environ['PYTORCH_ENABLE_MPS_FALLBACK'])")
    env = {k: v for k, v in os.environ.items() if k != "PYTORCH_ENABLE_MPS_FALLBACK"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "1"
    out = subprocess.run([sys.executable, "-c", code], env={**env, "PYTORCH_ENABLE_MPS_FALLBACK": "0"},
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "0"


def test_a_failing_training_compile_falls_back_to_eager(capsys):
    """Where torch.compile cannot build the step (no C++ compiler, say), training goes on without it
    and ends where an eager run ends."""
    eager, fallback = _model(), _model()
    data_a, data_b = FixedBatches(), FixedBatches()
    t_eager, t_fallback = _trainer(eager, "cpu"), _trainer(fallback, "cpu")

    def broken(*args, **kw):
        raise RuntimeError("InductorError: CppCompileError: C++ compile error\nthe compiler's output")
    t_fallback.train_model = broken
    for _ in range(2):
        loss_a, *_ = t_eager.train_step(data_a)
        loss_b, *_ = t_fallback.train_step(data_b)
        assert float(loss_a) == float(loss_b)
    assert t_fallback.train_model is fallback
    for a, b in zip(eager.parameters(), fallback.parameters()):
        assert torch.equal(a, b)
    out = capsys.readouterr().out
    assert out.count("torch.compile of the training step failed (RuntimeError: InductorError: CppCompileError: "
                     "C++ compile error); training without it") == 1


@pytest.mark.parametrize("device", ACCELERATORS)
def test_the_device_trains_and_decodes_like_the_cpu(device):
    """fp32 on the accelerator: the same logits, the same two training steps and the same greedy
    tokens as the CPU, within float tolerance (kernels differ); on CUDA also the compiled decode
    step, replayed as a CUDA graph."""
    cpu, acc = _model(), _model().to(device)
    idx = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(acc(idx.to(device)).cpu(), cpu(idx), atol=2e-3, rtol=2e-3)
    t_cpu, t_acc = _trainer(cpu, "cpu"), _trainer(acc, device)
    data_cpu, data_acc = FixedBatches(), FixedBatches()
    for _ in range(2):
        a, *_ = t_cpu.train_step(data_cpu)
        b, *_ = t_acc.train_step(data_acc)
        assert abs(float(a) - float(b)) < 1e-3 * float(a)
    for p, q in zip(cpu.parameters(), acc.parameters()):
        torch.testing.assert_close(q.detach().cpu(), p.detach(), atol=2e-3, rtol=2e-3)
    cpu.eval(), acc.eval()
    prompt = idx[0, :10].tolist()
    want = complete(Engine(cpu), prompt, max_tokens=20, temperature=0.0)[0].tokens
    assert complete(Engine(acc), prompt, max_tokens=20, temperature=0.0)[0].tokens == want
    if device == "cuda":
        compiled = Engine(acc, compile=True)
        assert complete(compiled, prompt, max_tokens=20, temperature=0.0)[0].tokens == want
        assert compiled.decode_step is not None  # it compiled and ran, no fallback


def test_auto_precision_on_cpu_follows_the_switch(monkeypatch):
    """PICOCHAT_CPU_BF16 decides what `auto` means on CPU (compute and Newton-Schulz alike), so one
    machine can run both paths; anything but 0 or 1 is a clear error."""
    cpu = torch.device("cpu")
    for forced, dtype in (("1", torch.bfloat16), ("0", torch.float32)):
        monkeypatch.setenv(CPU_BF16_ENV, forced)
        assert choose_dtype("auto", cpu) == ns_dtype_for(cpu) == dtype
        assert choose_dtype("fp32", cpu) == torch.float32  # an explicit choice is kept
    monkeypatch.setenv(CPU_BF16_ENV, "yes")
    with pytest.raises(PicochatError, match="PICOCHAT_CPU_BF16 must be 0 or 1, not 'yes'"):
        choose_dtype("auto", cpu)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
def test_cuda_bf16_training_compiled_follows_eager(fp8):
    """The CUDA default: bf16 activations over fp32 master weights, compiled; and FP8 where the GPU
    has it. Four steps compiled follow four eager ones (kernels and fusions differ: loosely), the
    loss falls, and the weights stay fp32."""
    device = torch.device("cuda")
    if fp8 and fp8_problem(device):
        pytest.skip(fp8_problem(device))
    config = ModelConfig.from_depth(4, vocab_size=512, sequence_len=128)  # width 384: every block matrix FP8
    losses = []
    for compile in (False, True):
        torch.manual_seed(0)
        model = GPT(config).to(device)
        cfg = OptimConfig()
        trainer = Trainer(model, build_optimizer(model, cfg), cfg, LoopConfig(steps=4), device, torch.bfloat16,
                          flops_per_token=flops_per_token(config), compile=compile, fp8=fp8)
        data = FixedBatches(n=1)
        data.batches = [torch.randint(0, 512, (8, 129), generator=torch.Generator().manual_seed(0))]
        losses.append([float(trainer.train_step(data)[0]) for _ in range(4)])
        assert all(p.dtype == torch.float32 for p in model.parameters())
    eager, compiled = losses
    assert eager[-1] < eager[0] - 0.5
    assert compiled == pytest.approx(eager, rel=0.02)
