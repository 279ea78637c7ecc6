"""Muon + AdamW, schedules, and exact resume. All fp32 on CPU (bf16 matmul is slow on CPUs
without AVX512-BF16), all tiny."""

import io
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from picochat.muon import Muon, ns_dtype_for, orthogonalize
from picochat.optim import OptimConfig, build_optimizer, lr_multiplier, muon_momentum

from .conftest import newton_schulz_tolerance, relative_error

# NS5 with the (3.4445, -4.7750, 2.0315) coefficients is built NOT to converge to exactly 1: its
# polynomial pushes small singular values up fast and then keeps them oscillating in about
# [0.68, 1.20] (measured: 0.680 .. 1.202 over every shape and spectrum used below). The band
# [0.65, 1.25] is that, plus a little margin; the mean of the band's values is 0.84 .. 0.97.
LO, HI = 0.65, 1.25
SHAPES = [(96, 96), (192, 48), (48, 192)]  # square, tall, wide


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # These tensors are tiny: a second OpenMP thread buys nothing, and when other processes
    # share the 2 cores its barrier waits made a step ~100x slower (measured 540 ms vs 6 ms).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _ill_conditioned(n, rows, cols, cond=100.0, seed=0):
    """n random matrices whose singular values span [1/cond, 1] log-uniformly: like real
    gradients, a few directions dominate."""
    gen = torch.Generator().manual_seed(seed)
    k = min(rows, cols)
    U, _ = torch.linalg.qr(torch.randn(n, rows, k, generator=gen))
    V, _ = torch.linalg.qr(torch.randn(n, cols, k, generator=gen))
    s = torch.logspace(0, -math.log10(cond), k)
    return U @ torch.diag_embed(s.expand(n, k)) @ V.mT


@pytest.mark.parametrize("rows,cols", SHAPES)
def test_orthogonalize_ill_conditioned(rows, cols):
    g = _ill_conditioned(4, rows, cols)
    u = orthogonalize(g)
    assert u.shape == g.shape and u.dtype == g.dtype
    s = torch.linalg.svdvals(u)
    assert s.min() > LO and s.max() < HI, (s.min(), s.max())
    assert 0.8 < s.mean() < 1.05
    # Condition number 100 before, under 2 after.
    s_raw = torch.linalg.svdvals(g)
    assert (s_raw.amax(-1) / s_raw.amin(-1)).min() > 90
    assert (s.amax(-1) / s.amin(-1)).max() < 2.0


@pytest.mark.parametrize("rows,cols", SHAPES)
def test_orthogonalize_gaussian(rows, cols):
    torch.manual_seed(0)
    g = torch.randn(4, rows, cols)
    s = torch.linalg.svdvals(orthogonalize(g))
    s_raw = torch.linalg.svdvals(g)
    inside = ((s > LO) & (s < HI)).float().mean()
    if rows == cols:
        # A square Gaussian matrix has singular values down to ~1/n of its norm; 5 iterations
        # can grow a value by at most ~3.4445^5 = 484x, so the last one or two stay small.
        assert inside > 0.97
    else:
        assert inside == 1.0  # aspect 4: Marchenko-Pastur keeps every value >= 1/3 of the max
    assert 0.8 < s.mean() < 1.05
    # Relative spread of the singular values: far smaller than the raw gradient's.
    spread, spread_raw = s.std() / s.mean(), s_raw.std() / s_raw.mean()
    assert spread < 0.25 and spread < 0.75 * spread_raw


def test_orthogonalize_2d_and_bf16():
    g = torch.randn(24, 48)
    u = orthogonalize(g)
    assert u.shape == (24, 48)
    torch.testing.assert_close(u, orthogonalize(g.unsqueeze(0))[0])
    ub = orthogonalize(g, dtype=torch.bfloat16)  # tiny: fast even without bf16 hardware
    assert ub.dtype == torch.float32
    s = torch.linalg.svdvals(ub)
    assert s.min() > 0.6 and s.max() < 1.3


@pytest.mark.parametrize("ns_dtype", ["fp32", "bf16"])
def test_shape_aware_scaling(ns_dtype):
    """Muon's first step is -lr * shape scale * orthogonalize(g), whichever precision Newton-Schulz
    runs in (both are tested here, whatever this CPU has: the matrices are tiny)."""
    torch.manual_seed(0)
    ws = [nn.Parameter(torch.randn(r, c)) for r, c in [(64, 16), (16, 64), (32, 32), (48, 16)]]
    opt = Muon(ws, lr=0.1, momentum=0.9, ns_dtype=ns_dtype)
    # tall (64,16) and wide (16,64) share one group (the tall one transposed); (48,16) is alone
    assert [len(g["params"]) for g in opt.param_groups] == [2, 1, 1]
    assert opt.param_groups[0]["lr_scale"] == [2.0, 1.0]
    assert opt.param_groups[2]["lr_scale"] == [math.sqrt(3.0)]
    before = [w.detach().clone() for w in ws]
    grads = [torch.randn_like(w) for w in ws]
    for w, g in zip(ws, grads):
        w.grad = g
    opt.step()
    # First step from zero momentum: the Nesterov update is (1-m)(1+m) g, and orthogonalize is
    # scale-invariant, so the step is -lr * scale * orthogonalize(g), up to the working precision
    tol = newton_schulz_tolerance(ns_dtype_for(torch.device("cpu"), ns_dtype))
    for w, w0, g, scale in zip(ws, before, grads, [2.0, 1.0, 1.0, math.sqrt(3.0)]):
        exact = 0.1 * scale * orthogonalize(g)  # fp32
        assert relative_error(w0 - w, exact) < tol


def test_lr_multiplier():
    # 100 steps, 10% warmup, 20% warmdown to 0.1
    f = lambda s: lr_multiplier(s, 100, 0.1, 0.2, 0.1)  # noqa: E731
    assert f(0) == pytest.approx(0.1)
    assert f(4) == pytest.approx(0.5)
    assert f(9) == pytest.approx(1.0)
    assert f(10) == f(50) == f(80) == 1.0
    assert f(90) == pytest.approx(0.55)  # halfway down from 1 to 0.1
    assert f(99) == pytest.approx(0.1 + 0.9 / 20)
    assert f(100) == pytest.approx(0.1)
    # nanochat defaults: no warmup, 20% warmdown to zero
    cfg = OptimConfig()
    g = lambda s: lr_multiplier(s, 1000, cfg.warmup_frac, cfg.warmdown_frac, cfg.final_lr_frac)  # noqa: E731
    assert g(0) == 1.0 and g(800) == 1.0 and g(900) == pytest.approx(0.5) and g(1000) == 0.0
    # monotone: up, flat, down
    vals = [f(s) for s in range(101)]
    assert vals[:10] == sorted(vals[:10]) and vals[80:] == sorted(vals[80:], reverse=True)


def test_muon_momentum_warmup():
    cfg = OptimConfig(muon_momentum_start=0.85, muon_momentum=0.95, muon_momentum_warmup_steps=300)
    assert muon_momentum(0, cfg) == pytest.approx(0.85)
    assert muon_momentum(150, cfg) == pytest.approx(0.90)
    assert muon_momentum(300, cfg) == pytest.approx(0.95)
    assert muon_momentum(10_000, cfg) == pytest.approx(0.95)
    assert muon_momentum(0, OptimConfig(muon_momentum_warmup_steps=0)) == 0.95


# ----------------------------------------------------------------------------- a tiny model


class Tiny(nn.Module):
    """Modular addition (a + b) mod P: embedding -> residual ReLU^2 MLP -> head. It has each
    kind of parameter the GPT has: matrices (one tall, one wide), embedding, head, a scalar."""

    P = 13

    def __init__(self, d=32, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.config = SimpleNamespace(n_embd=d)
        self.wte = nn.Embedding(2 * self.P, d)
        self.fc = nn.Linear(d, 4 * d, bias=False)
        self.proj = nn.Linear(4 * d, d, bias=False)
        self.fc2 = nn.Linear(d, 4 * d, bias=False)
        self.proj2 = nn.Linear(4 * d, d, bias=False)
        self.lam = nn.Parameter(torch.ones(2))
        self.lm_head = nn.Linear(d, self.P, bias=False)

    def param_groups(self):
        return {
            "matrix": [self.fc.weight, self.proj.weight, self.fc2.weight, self.proj2.weight],
            "embedding": [self.wte.weight],
            "head": [self.lm_head.weight],
            "x0": [self.lam],
        }

    def forward(self, x):
        h = self.wte(x[:, 0]) + self.wte(x[:, 1] + self.P)
        h = h + self.lam[0] * self.proj(F.relu(self.fc(F.rms_norm(h, (h.size(-1),)))).square())
        h = h + self.lam[1] * self.proj2(F.relu(self.fc2(F.rms_norm(h, (h.size(-1),)))).square())
        return self.lm_head(F.rms_norm(h, (h.size(-1),)))


def _data():
    a, b = torch.meshgrid(torch.arange(Tiny.P), torch.arange(Tiny.P), indexing="ij")
    x = torch.stack([a.flatten(), b.flatten()], 1)
    return x, (x[:, 0] + x[:, 1]) % Tiny.P


def _train(model, opt, cfg, steps, total, start=0):
    x, y = _data()
    losses = []
    for step in range(start, start + steps):
        lr_mult = lr_multiplier(step, total, cfg.warmup_frac, cfg.warmdown_frac, cfg.final_lr_frac)
        opt.set_schedule(lr_mult, muon_momentum(step, cfg))
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


CFG = OptimConfig(muon_momentum_warmup_steps=20, warmup_frac=0.1, ns_dtype="fp32")


def test_build_optimizer_groups_and_lrs():
    model = Tiny(d=32)
    opt = build_optimizer(model, CFG)
    scale = (32 / 768) ** -0.5
    lrs = [g["lr"] for g in opt.adamw.param_groups]
    assert lrs == pytest.approx([0.2 * scale, 0.004 * scale, 0.005])
    assert all(g["lr"] == 0.02 for g in opt.muon.param_groups)
    assert len(opt.muon.param_groups) == 1  # (128,32) and (32,128) stacked together
    assert opt.momentum == 0.85
    opt.set_schedule(0.5, 0.9)
    assert [g["lr"] for g in opt.adamw.param_groups] == pytest.approx([0.1 * scale, 0.002 * scale, 0.0025])
    assert opt.muon.param_groups[0]["lr"] == 0.01 and opt.muon.param_groups[0]["momentum"] == 0.9
    # a parameter the groups forget is an error, not a silently frozen weight
    model.extra = nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="extra"):
        build_optimizer(model, CFG)


def test_tiny_model_learns():
    model = Tiny()
    opt = build_optimizer(model, CFG)
    losses = _train(model, opt, CFG, 50, 50)
    assert losses[0] > 2.0  # about ln 13 = 2.56
    assert losses[-1] < 0.25 * losses[0], losses[::10]


def test_batched_matches_unbatched():
    m1, m2 = Tiny(), Tiny()
    o1 = build_optimizer(m1, CFG)
    o2 = build_optimizer(m2, CFG, group_by_shape=False)
    assert len(o2.muon.param_groups) == 4
    _train(m1, o1, CFG, 5, 50)
    _train(m2, o2, CFG, 5, 50)
    for p1, p2 in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(p1, p2, rtol=1e-4, atol=1e-5)


def test_state_dict_resume_is_bit_exact():
    cfg = OptimConfig(
        muon_momentum_warmup_steps=15, warmup_frac=0.1, warmdown_frac=0.4, weight_decay=0.1, ns_dtype="fp32"
    )
    straight = Tiny(seed=0)
    opt = build_optimizer(straight, cfg)
    _train(straight, opt, cfg, 20, 20)

    first = Tiny(seed=0)
    opt = build_optimizer(first, cfg)
    _train(first, opt, cfg, 10, 20)
    buf = io.BytesIO()
    torch.save({"model": first.state_dict(), "optim": opt.state_dict()}, buf)
    _train(first, opt, cfg, 3, 20, start=10)  # keep going: the saved copy must not change

    buf.seek(0)
    ckpt = torch.load(buf)
    resumed = Tiny(seed=1)  # different init: everything must come from the checkpoint
    resumed.load_state_dict(ckpt["model"])
    opt2 = build_optimizer(resumed, cfg)
    opt2.load_state_dict(ckpt["optim"])
    assert opt2.lr_mult == lr_multiplier(9, 20, 0.1, 0.4, 0.0) and opt2.momentum == muon_momentum(9, cfg)
    _train(resumed, opt2, cfg, 10, 20, start=10)
    for (name, p1), p2 in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.equal(p1, p2), name
