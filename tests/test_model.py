import copy
import math

import pytest
import torch
import torch.nn.functional as F

from picochat import attention as attention_module
from picochat.attention import attention, banded_attention
from picochat.common import PicochatError
from picochat.config import DEPTH_PRESETS, ModelConfig
from picochat.kv_cache import DynamicKVCache
from picochat.model import GPT, num_params

from .conftest import randomized, relative_error


def _randomized(cfg: ModelConfig, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return randomized(GPT(cfg), seed)


def _reference_window_attention(q, k, v, window):
    T = q.size(2)
    pos = torch.arange(T, device=q.device)
    mask = (pos[None, :] <= pos[:, None]) & (pos[:, None] - pos[None, :] < window)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


@pytest.mark.parametrize("T,window,H,Hkv", [(37, 8, 4, 2), (64, 16, 6, 3), (50, 7, 2, 2), (33, 32, 4, 1)])
def test_banded_attention_equals_masked_attention(T, window, H, Hkv):
    torch.manual_seed(T)
    q, k, v = torch.randn(2, H, T, 16), torch.randn(2, Hkv, T, 16), torch.randn(2, Hkv, T, 16)
    out = banded_attention(q, k, v, window)
    torch.testing.assert_close(out, _reference_window_attention(q, k, v, window), atol=1e-5, rtol=1e-5)


def test_attention_takes_sdpa_where_flash_attn_cannot_run(monkeypatch):
    """flash-attn only runs on CUDA in half precision: anywhere else attention() must not call it
    and gives SDPA's (here: banded) result, even with the package present."""
    calls = []
    monkeypatch.setattr(attention_module, "FLASH_ATTN", lambda *a, **kw: calls.append(a))
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 4, 40, 16), torch.randn(1, 2, 40, 16), torch.randn(1, 2, 40, 16)
    torch.testing.assert_close(attention(q, k, v, 8), _reference_window_attention(q, k, v, 8))
    assert not calls


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available() or attention_module.FLASH_ATTN is None,
                    reason="needs CUDA and the flash-attn package")
@pytest.mark.parametrize("window", [0, 16])
def test_flash_attention_equals_sdpa_and_falls_back_on_error(window, monkeypatch):
    torch.manual_seed(0)
    q = torch.randn(2, 6, 100, 64, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(2, 2, 100, 64, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    want = _reference_window_attention(q, k, v, window or 100)
    torch.testing.assert_close(attention_module.flash_attention(q, k, v, window), want, atol=2e-2, rtol=2e-2)
    with torch.autocast("cuda", dtype=torch.bfloat16):  # training: autocast leaves q, k, v fp32 after the norms
        y = attention_module.flash_attention(q.float(), k.float(), v.float(), window)
    assert y is not None and y.dtype == torch.bfloat16
    torch.testing.assert_close(y, want, atol=2e-2, rtol=2e-2)

    def old_gpu(*a, **kw):
        raise RuntimeError("FlashAttention only supports Ampere GPUs or newer.")
    monkeypatch.setattr(attention_module, "FLASH_ATTN", old_gpu)
    torch.testing.assert_close(attention(q, k, v, window), want, atol=2e-2, rtol=2e-2)
    assert attention_module.FLASH_ATTN is None  # not tried again


def test_banded_attention_gradients_match():
    torch.manual_seed(1)
    q, k, v = (torch.randn(1, 4, 40, 8, requires_grad=True) for _ in range(3))
    banded_attention(q, k, v, 10).square().sum().backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    _reference_window_attention(q, k, v, 10).square().sum().backward()
    for g, t in zip(grads, (q, k, v)):
        torch.testing.assert_close(g, t.grad, atol=1e-5, rtol=1e-5)


def test_kv_cache_logits_equal_full_forward_with_windows_and_gqa():
    cfg = ModelConfig(vocab_size=97, n_layer=4, n_embd=64, n_head=4, n_kv_head=2, sequence_len=48,
                      window_pattern="SSL", window=6)
    assert cfg.layer_windows() == [6, 6, 0, 0]  # the last layer is always full
    model = _randomized(cfg)
    idx = torch.randint(0, 97, (3, 40))
    full = model(idx)
    cache = DynamicKVCache(cfg, batch_size=3, max_len=48)
    pieces = [model(idx[:, :13], kv_cache=cache), model(idx[:, 13:21], kv_cache=cache)]  # prefill, then a chunk
    pieces += [model(idx[:, t:t + 1], kv_cache=cache) for t in range(21, 40)]  # one-token decodes
    assert cache.pos == 40
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-4, rtol=1e-4)


def test_window_limits_what_a_token_sees():
    cfg = ModelConfig(vocab_size=50, n_layer=1, n_embd=32, n_head=2, n_kv_head=1, sequence_len=32,
                      window_pattern="S", window=4)
    # a single layer is the last layer and so always full; check the kernel choice directly instead
    model = _randomized(cfg)
    model.windows = [4]
    idx = torch.randint(0, 50, (1, 20))
    changed = idx.clone()
    changed[0, 0] = (idx[0, 0] + 1) % 50
    a, b = model(idx), model(changed)
    assert not torch.allclose(a[0, 1], b[0, 1])  # position 1 sees position 0
    torch.testing.assert_close(a[0, 10:], b[0, 10:])  # position >= 4 + 0 cannot


def test_initial_loss_is_log_vocab_and_logits_are_capped():
    cfg = ModelConfig(vocab_size=512, n_layer=2, n_embd=64, n_head=2, n_kv_head=1, sequence_len=32)
    torch.manual_seed(0)
    model = GPT(cfg)
    idx = torch.randint(0, 512, (4, 32))
    loss = model(idx, idx)
    assert abs(loss.item() - math.log(512)) < 0.05
    big = _randomized(cfg)
    with torch.no_grad():
        big.lm_head.weight.mul_(1000)
    assert big(idx).abs().max() <= cfg.softcap


def test_ignore_index_and_sum_reduction():
    cfg = ModelConfig(vocab_size=64, n_layer=1, n_embd=32, n_head=2, n_kv_head=1, sequence_len=16)
    model = _randomized(cfg)
    x = torch.randint(0, 64, (2, 16))
    y = x.clone()
    y[:, :5] = -1
    per_token = model(x, y, loss_reduction="none")
    assert per_token.shape == (32,) and (per_token.view(2, 16)[:, :5] == 0).all()
    torch.testing.assert_close(model(x, y, loss_reduction="sum"), per_token.sum())
    torch.testing.assert_close(model(x, y), per_token.sum() / 22)


@pytest.mark.parametrize("depth", [2, 4, 8, 16])
def test_training_is_stable_and_loss_falls(depth):
    """Fit one small batch for a few steps at several preset depths (narrowed so the test is fast)."""
    dim, heads, kv = DEPTH_PRESETS[depth]
    scale = max(1, dim // 128)
    cfg = ModelConfig(vocab_size=128, n_layer=depth, n_embd=dim // scale, n_head=max(1, heads // scale),
                      n_kv_head=max(1, kv // scale), sequence_len=32)
    torch.manual_seed(0)
    model = GPT(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x = torch.randint(0, 128, (4, 33))
    losses = []
    for _ in range(30):
        loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < 0.5 * losses[0]


def test_preset_sizes_match_the_peers():
    def params(depth, vocab):
        return num_params(ModelConfig.from_depth(depth, vocab_size=vocab))
    small = ModelConfig.from_depth(2, vocab_size=512, sequence_len=8)
    assert params(2, 512) == GPT(small).num_params()  # counted on the meta device, as a real model has them
    assert 25e6 < params(4, 32768) < 35e6  # the Rust picochat's 28M
    assert 85e6 < params(8, 32768) < 105e6  # and its 90M
    assert round(params(16, 65536) / 1e6) == 336  # 16 x 1024, the MPS fork's 335M (335.5M)
    assert round(params(20, 65536) / 1e6) == 561  # nanochat d20


def test_config_errors():
    with pytest.raises(PicochatError, match="n_kv_head"):
        ModelConfig(n_embd=64, n_head=4, n_kv_head=3)
    with pytest.raises(PicochatError, match="no preset for depth"):
        ModelConfig.from_depth(7)
    with pytest.raises(PicochatError, match="window pattern"):
        ModelConfig(window_pattern="SXL")


def test_linear_inference_paths_equal_f_linear():
    """Inference on CPU takes faster paths than BLAS for few rows: row blocks (a batched matmul on
    every core) and oneDNN on a packed copy of the weight, repacked when the weight changes. The
    product is the same, and training takes the plain path."""
    import torch.nn.functional as F

    from picochat.linear import ONEDNN, Linear, has_packed_copy
    torch.manual_seed(0)
    # oneDNN from 2 rows + 4 blocks at 1; oneDNN + 2 blocks; 2 blocks (below oneDNN's size); F.linear
    for out_features in (4096, 1536, 256, 8):
        lin = Linear(384 if out_features > 8 else 4, out_features, bias=False)
        for shape in ((1, lin.in_features), (1, 1, lin.in_features), (3, 1, lin.in_features),
                      (2, 4, lin.in_features), (40, lin.in_features)):
            x = torch.randn(shape)
            with torch.no_grad():
                y = lin(x)
            ref = F.linear(x, lin.weight)
            assert y.shape == ref.shape
            torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
        assert has_packed_copy(lin.weight) == (ONEDNN and out_features >= 1536)
    if ONEDNN:  # an in-place update (an optimizer step, load_state_dict) is seen: the weight is repacked
        x = torch.randn(5, 384)
        with torch.no_grad():
            lin = Linear(384, 1536, bias=False)
            lin(x)
            lin.weight.mul_(-2.0)
            torch.testing.assert_close(lin(x), F.linear(x, lin.weight), rtol=1e-5, atol=1e-5)
            copy.deepcopy(lin)  # the packed copy is not part of the module
    lin = Linear(384, 4096, bias=False)
    x = torch.randn(1, 384, requires_grad=True)
    lin(x).sum().backward()  # with autograd on, F.linear: gradients as usual
    torch.testing.assert_close(x.grad[0], lin.weight.sum(0), rtol=1e-5, atol=1e-4)


def test_bf16_compute_keeps_fp32_weights_and_follows_fp32():
    """GPT.computing_in(bf16), training's bf16: the loss and every gradient near fp32's, the
    gradients fp32 like the weights they update, and the model as it was afterwards."""
    config = ModelConfig.from_depth(2, vocab_size=256, sequence_len=64, window_pattern="SL", window=16)
    model = randomized(GPT(config))
    x = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(0))
    loss32 = model(x, x)
    loss32.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    with model.computing_in(torch.bfloat16):
        loss16 = model(x, x)
    loss16.backward()
    assert model.compute_dtype is None and loss16.dtype == torch.float32
    assert loss16.item() == pytest.approx(loss32.item(), rel=0.01)
    for name, p in model.named_parameters():
        assert p.dtype == p.grad.dtype == torch.float32
        assert relative_error(p.grad, want[name]) < 0.2, name  # a few scalars' sums: bf16 rounding shows
    got = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert relative_error(got, torch.cat([g.flatten() for g in want.values()])) < 0.03
