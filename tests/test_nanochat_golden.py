"""picochat against nanochat's own code: golden values that nanochat (HEAD 92d63d4) computed on a CPU
in fp32, made by tests/data/make_nanochat_golden.py (which records the commit)."""

import json

import pytest
import torch
from safetensors.torch import load_file

from picochat.convert.nanochat import from_nanochat
from picochat.engine import Engine
from picochat.kv_cache import DynamicKVCache, StaticKVCache
from picochat.model import GPT

from .conftest import TEST_DATA, complete

GOLDEN = TEST_DATA / "nanochat"
COMMIT = "92d63d4e8bb4df75c3b71618f31ddde2378b2bcd"  # the nanochat these tests were written against


@pytest.fixture(scope="module")
def golden():
    meta = json.loads((GOLDEN / "golden.json").read_text())
    if meta["nanochat_commit"] != COMMIT:
        pytest.fail(f"tests/data/nanochat/golden.json comes from nanochat {meta['nanochat_commit'][:7]}; these tests "
                    f"expect {COMMIT[:7]}: rerun make_nanochat_golden.py on that commit, or update the tests")
    return meta, load_file(GOLDEN / "golden.safetensors")


def _part(tensors: dict, prefix: str) -> dict:
    return {k.removeprefix(prefix): v.float() for k, v in tensors.items() if k.startswith(prefix)}


@pytest.fixture(scope="module")
def model(golden):
    """nanochat's golden model with every feature on, imported: its config read off its weights."""
    meta, tensors = golden
    config, weights = from_nanochat(_part(tensors, "model."), meta["model"], "golden")
    gpt = GPT(config)
    gpt.load_state_dict(weights)
    return gpt.eval()


def test_the_imported_model_has_every_feature(model):
    c = model.config
    assert (c.value_embeds, c.smear, c.backout, c.qk_scale, c.rope_base) == (True, True, True, 1.2, 100_000.0)
    assert c.layer_windows() == [129, 129, 0]  # 128 keys before the query's own, as nanochat's (128, 0)
    assert sorted(model.value_embeds) == ["0", "2"] and c.backout_layer == 1


def test_logits_equal_nanochat_s_forward(golden, model):
    _, tensors = golden
    tokens, want = tensors["model_tokens"], tensors["model_logits"]
    with torch.no_grad():
        got = model(tokens)
    assert got.shape == want.shape  # the vocabulary's padding cut, as nanochat cuts it
    assert (got - want).abs().max().item() <= 1e-4


@torch.inference_mode()
def test_the_kv_cache_and_the_compiled_step_carry_every_feature(golden, model):
    """Smear's previous embedding across decode steps and across the static cache; value
    embeddings per token; past the sliding window: one token at a time gives nanochat's logits."""
    _, tensors = golden
    tokens, want = tensors["model_tokens"], tensors["model_logits"]
    for static in (False, True):
        cache = DynamicKVCache(model.config, 1, tokens.size(1))
        steps = [model(tokens[:, :20], kv_cache=cache)]
        if static:
            cache = StaticKVCache(cache)
        steps += [model(tokens[:, t:t + 1], kv_cache=cache) for t in range(20, tokens.size(1))]
        assert (torch.cat(steps, 1) - want).abs().max().item() <= 1e-4


def test_rows_that_join_a_running_batch_keep_their_own_smear(model):
    """Prompts of different lengths, left-padded in one batch, joining and decoding together:
    each row gets the tokens it gets alone (its first token has no predecessor, padding is none)."""
    engine = Engine(model)
    prompts = [[1, 2, 3], [5, 6, 7, 8, 9, 10, 11], [4]]
    from picochat.decode_batch import GenRequest
    together = dict(engine.complete([GenRequest(p, max_tokens=12, temperature=0.0, key=i)
                                     for i, p in enumerate(prompts)], max_rows=2))
    for i, p in enumerate(prompts):
        assert together[i][0].tokens == complete(engine, p, max_tokens=12, temperature=0.0)[0].tokens


def test_int8_quantizes_the_features_too(model):
    """Value embeddings are token embeddings and their gates linear layers: both go int8."""
    import copy

    from picochat.int8 import Int8Embedding, Int8Linear, quantize_model
    quantized = quantize_model(copy.deepcopy(model), embeddings=True)
    assert isinstance(quantized.value_embeds["0"], Int8Embedding)
    assert isinstance(quantized.blocks[0].attn.ve_gate, Int8Linear)
    ids = torch.randint(0, model.config.vocab_size, (1, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = model(ids), quantized(ids)
    assert ((got - want).norm() / want.norm()).item() < 0.05


# ----------------------------------------------------------------------------- the optimizer

@pytest.mark.parametrize("step", [0, 39, 500, 900])
def test_one_optimizer_step_equals_nanochat_s(golden, step):
    """NANOCHAT_OPTIM, set up as nanochat's base_train sets its MuonAdamW up, one step from fixed
    weights and gradients at `step` of a 1,000-step run: the learning-rate warmup and warmdown, Muon
    momentum's warmup and warmdown, the cosine weight decay, Polar Express, MuonEq, Muon+, NorMuon,
    cautious weight decay, and AdamW's per-group rates, betas and decay all come out as nanochat's."""
    import dataclasses

    from picochat.optim import NANOCHAT_OPTIM, build_optimizer, lr_multiplier, muon_momentum, wd_multiplier
    meta, tensors = golden
    config, weights = from_nanochat(_part(tensors, "optim.weight."), meta["optim_model"], "golden")
    _, grads = from_nanochat(_part(tensors, "optim.grad."), meta["optim_model"], "golden")
    _, want = from_nanochat(_part(tensors, f"optim.step{step}."), meta["optim_model"], "golden")
    model = GPT(config)
    model.load_state_dict(weights)
    for name, p in model.named_parameters():
        p.grad = grads[name].clone()
    cfg = dataclasses.replace(NANOCHAT_OPTIM, ns_dtype="fp32")
    optimizer = build_optimizer(model, cfg)
    total = meta["run_steps"]
    lr = lr_multiplier(step, total, cfg.warmup_frac, cfg.warmdown_frac, cfg.final_lr_frac, cfg.warmup_steps)
    momentum, wd = muon_momentum(step, cfg, total), wd_multiplier(step, total, cfg.wd_schedule)
    assert (lr, momentum, cfg.weight_decay * wd) == pytest.approx(meta["schedules"][str(step)], rel=1e-12)
    optimizer.set_schedule(lr, momentum, wd)
    optimizer.step()
    got = model.state_dict()
    worst = 0.0
    for name, w in want.items():  # the update, relative to its size; and the weights to their fp32 rounding
        update, theirs = got[name] - weights[name], w - weights[name]
        worst = max(worst, ((update - theirs).norm() / theirs.norm().clamp_min(1e-12)).item())
        assert (got[name] - w).abs().max().item() <= 1e-5 * theirs.abs().max().item() + 4e-7 * w.abs().max().item()
    assert worst <= 1e-4
