"""ops.py: the training-only Functions give PyTorch's gradients, the same forward values as the
plain ops, and keep what they promise."""

import pytest
import torch
import torch.nn.functional as F

from picochat.attention import apply_rotary, rotary_tables
from picochat.linear import Linear
from picochat.ops import _fused_norm, _NormRotary, _Relu2Linear, _RMSNorm, norm_rotary, relu2_then, rms_norm


def _tables(T: int, D: int, dtype=torch.float32):
    cos, sin = rotary_tables(D, 10000.0, torch.arange(T, dtype=torch.float32))
    return cos[:, None, :].to(dtype), sin[:, None, :].to(dtype)


def test_the_gradients_are_pytorchs():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 3, 8, dtype=torch.float64, requires_grad=True)
    cos, sin = _tables(5, 8, torch.float64)
    assert torch.autograd.gradcheck(_RMSNorm.apply, (x,))
    for scale in (1.0, 1.3):
        assert torch.autograd.gradcheck(lambda z: _NormRotary.apply(z, cos, sin, scale), (x,))
    a = torch.randn(2, 5, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 16, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(_Relu2Linear.apply, (a, w))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_training_and_inference_compute_the_same_values(dtype):
    torch.manual_seed(0)
    x = torch.randn(2, 16, 4, 32, dtype=dtype)
    cos, sin = _tables(16, 32)
    plain = apply_rotary(F.rms_norm(x, (32,)), cos, sin) * 1.2
    with torch.no_grad():
        assert torch.equal(norm_rotary(x, cos, sin, 1.2), plain)
    assert torch.equal(norm_rotary(x.clone().requires_grad_(), cos, sin, 1.2).detach(), plain)
    assert torch.equal(rms_norm(x.clone().requires_grad_()).detach(), F.rms_norm(x, (32,)))
    y, rstd = _fused_norm(x)  # its values are F.rms_norm's, with an fp32 reciprocal RMS per row
    assert torch.equal(y, F.rms_norm(x, (32,))) and rstd.dtype == torch.float32 and rstd.shape == (2, 16, 4, 1)
    proj = Linear(32, 8)
    a = torch.randn(3, 32, dtype=dtype)
    with torch.no_grad():
        want = proj(F.relu(a).square())
    assert torch.equal(relu2_then(a.clone().requires_grad_(), proj).detach(), want)


def _saved(fn, *args) -> list[torch.Size]:
    shapes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(t.shape) or t, lambda t: t):
        fn(*args)
    return shapes


def test_each_keeps_one_tensor_of_its_width():
    x = torch.randn(64, 128, requires_grad=True)
    assert _saved(rms_norm, x) == [(64, 128), (64, 1)]  # the output, and the reciprocal RMS
    q = torch.randn(1, 64, 4, 32, requires_grad=True)
    cos, sin = _tables(64, 32)
    assert _saved(norm_rotary, q, cos, sin, 1.0)[:2] == [(1, 64, 4, 32), (1, 64, 4, 1)]  # then the tables
    proj = Linear(512, 128)
    assert _saved(relu2_then, torch.randn(64, 512, requires_grad=True), proj) == [(64, 512), (128, 512)]


def test_compiled_the_mlp_keeps_its_pre_activation_only():
    """Traced by torch.compile, relu^2 is rebuilt for the backward pass, not kept beside its input."""
    torch.manual_seed(0)
    fc, proj = Linear(128, 512), Linear(512, 128)
    torch.nn.init.normal_(proj.weight, std=0.02)
    x = torch.randn(64, 128, requires_grad=True)
    out = torch.compile(lambda z: relu2_then(fc(z), proj), dynamic=False)(x)
    hidden = [t for t in out.grad_fn.saved_tensors if t.shape == (64, 512)]
    assert len(hidden) == 1
    out.sum().backward()
    got = [x.grad.clone(), fc.weight.grad.clone(), proj.weight.grad.clone()]
    for t in (x, fc.weight, proj.weight):
        t.grad = None
    proj(F.relu(fc(x)).square()).sum().backward()
    for g, t in zip(got, (x, fc.weight, proj.weight)):
        torch.testing.assert_close(g, t.grad, rtol=1e-5, atol=1e-6)
