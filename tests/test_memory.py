"""Activation checkpointing and the peak-memory estimate that refuses configs which cannot fit."""

import dataclasses
import json

import pytest
import torch

from picochat.config import NANOCHAT_FEATURES, ModelConfig
from picochat.memory import activation_bytes_per_token, estimate_training_memory
from picochat.model import GPT, num_params
from picochat.plan import MAC_BYTES
from tests.conftest import run_cli


def saved_for_backward(model: GPT, x: torch.Tensor, dtype: torch.dtype = torch.float32) -> int:
    """Bytes autograd keeps from the forward pass in `dtype` for the backward (the weights and
    their bf16 copies not counted: the estimate counts those per step, not per token)."""
    weights = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    shapes = {p.shape for p in model.parameters()}
    kept: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in weights and not (t.dtype != torch.float32 and t.shape in shapes):
            kept[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), model.computing_in(dtype):
        model(x, x)
    return sum(kept.values())


@pytest.mark.parametrize("depth,seq_len,pattern,vocab", [(2, 128, "L", 512), (4, 64, "SSSL", 4096),
                                                          (4, 256, "L", 512), (6, 128, "SSL", 2048)])
@pytest.mark.parametrize("features", [{}, dataclasses.asdict(NANOCHAT_FEATURES)], ids=["picochat", "nanochat"])
def test_the_activation_estimate_matches_what_autograd_keeps(depth, seq_len, pattern, vocab, features):
    config = ModelConfig.from_depth(depth, vocab_size=vocab, sequence_len=seq_len,
                                    **{**features, "window_pattern": pattern})
    torch.manual_seed(0)
    model = GPT(config)
    x = torch.randint(0, vocab, (2, seq_len))
    measured = saved_for_backward(model, x)
    # out of the hooks' sight: the head's input gradient, made in the forward pass and kept by loss.py
    # (d values a token), and the gradients the backward pass holds (d + h)
    unseen = 2 * config.n_embd + config.mlp_hidden
    predicted = 2 * seq_len * (activation_bytes_per_token(config, torch.float32) - 4 * unseen)
    assert predicted == pytest.approx(measured, rel=0.15)
    if depth <= 4 and seq_len <= 128:  # bf16 activations (GPT.computing_in): small, bf16 crawls on some CPUs
        bf16 = saved_for_backward(model, x, torch.bfloat16)
        predicted = 2 * seq_len * (activation_bytes_per_token(config, torch.bfloat16) - 2 * unseen)
        assert predicted == pytest.approx(bf16, rel=0.15)
        assert bf16 < 0.6 * measured  # about half: the rows' fp32 norms and log-normalizers stay

    model.grad_checkpoint = True
    with_ckpt = saved_for_backward(model, x)
    assert with_ckpt < 0.6 * measured  # most of the activations are no longer kept
    assert with_ckpt <= 2 * seq_len * (activation_bytes_per_token(config, torch.float32, True) - 4 * unseen)


@pytest.mark.parametrize("vocab", [512, 65536])  # the loss in one chunk; in 2 chunks of 512 rows
def test_grad_checkpoint_gives_the_same_loss_and_gradients(vocab):
    from picochat.loss import chunk_rows
    config = ModelConfig.from_depth(2, vocab_size=vocab, sequence_len=128)
    torch.manual_seed(0)
    model = GPT(config)
    for block in model.blocks:  # non-zero output projections, so every block matters
        torch.nn.init.normal_(block.attn.c_proj.weight, std=0.02)
        torch.nn.init.normal_(block.mlp.c_proj.weight, std=0.02)
    torch.nn.init.normal_(model.lm_head.weight, std=0.02)
    x = torch.randint(0, vocab, (8, 128))
    y = x.roll(-1, 1)
    y[:, -5:] = -1  # ignored targets
    assert (8 * 128 > chunk_rows(vocab)) == (vocab == 65536)
    runs = []
    for ckpt in (False, True):
        model.grad_checkpoint = ckpt
        model.zero_grad()
        loss = model(x, y)
        loss.backward()
        per_token = model(x, y, loss_reduction="none").detach()
        runs.append((loss.detach(), per_token, [p.grad.clone() for p in model.parameters()]))
    (l0, t0, g0), (l1, t1, g1) = runs
    torch.testing.assert_close(l1, l0, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(t1, t0, rtol=1e-6, atol=1e-6)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_pretrain_with_grad_checkpoint_trains_the_same(small_corpus, small_tokenizer, tmp_path):
    common = ["pretrain", "--data", str(small_corpus), "--tokenizer", str(small_tokenizer), "--depth", "2",
              "--seq-len", "64", "--batch-size", "4", "--steps", "3", "--eval-tokens", "512", "--device", "cpu",
              "--dtype", "fp32"]
    for name, extra in (("plain", []), ("ckpt", ["--grad-checkpoint"])):
        r = run_cli(*common, "--save", str(tmp_path / name), *extra)
        assert r.returncode == 0, r.stderr
    losses = [[m["loss"] for m in map(json.loads, (tmp_path / n / "metrics.jsonl").read_text().splitlines())]
              for n in ("plain", "ckpt")]
    assert losses[1] == pytest.approx(losses[0], abs=1e-4) and len(losses[0]) == 3
    assert "memory: about" in r.stdout


def test_the_estimate_scales_as_it_should():
    c = ModelConfig.from_depth(16, vocab_size=65536, sequence_len=1024)
    plain = estimate_training_memory(c, 8, 1024, torch.float32, device_type="mps")
    ckpt = estimate_training_memory(c, 8, 1024, torch.float32, grad_checkpoint=True, device_type="mps")
    assert plain.weights == plain.grads == 4 * num_params(c)
    assert ckpt.activations < plain.activations / 5
    # the logits a chunk at a time, with or without checkpointing: a third of one fp32 copy of them
    assert ckpt.logits == plain.logits < 8 * 1024 * 65536 * 4 / 3
    assert estimate_training_memory(c, 16, 1024, torch.float32, device_type="mps").activations == 2 * plain.activations
    # depth 16 at context 1024 (the MPS fork's 335M model), 8 rows: what Metal gives a 16 GB Mac is enough
    # with checkpointing only, and with room to spare
    assert ckpt.total < 9e9 and MAC_BYTES < plain.total


def test_a_compiled_step_is_estimated_with_its_traced_head_and_its_own_allocator_slack():
    def estimate(config, rows, seq, dtype=torch.float32, device="cpu", compiled=False):
        return estimate_training_memory(config, rows, seq, dtype, device_type=device, compiled=compiled)
    c = ModelConfig.from_depth(12, vocab_size=32768, sequence_len=512)
    eager, compiled = estimate(c, 4, 512), estimate(c, 4, 512, compiled=True)
    assert compiled.activations == eager.activations  # the graph keeps the same tensors
    # 2,048 tokens' fp32 logits are 256 MiB: traced through, the whole micro-batch's are in flight at once
    head_grad = 4 * c.padded_vocab * c.n_embd
    assert compiled.logits - head_grad == 8 * 2048 * 32768 == 2 * (eager.logits - head_grad)
    # twice as many tokens pass the threshold: the loss runs eagerly, a chunk at a time
    assert estimate(c, 8, 512, compiled=True).logits == estimate(c, 8, 512).logits
    # glibc's heap holds fp32 eager steps' freed blocks; bf16's and inductor's buffers it mostly does not
    assert eager.slack > compiled.slack == estimate(c, 4, 512, torch.bfloat16).slack == 1.0
    # CUDA and MPS: unmeasured, one allowance for every path
    assert {estimate(c, 4, 512, d, "cuda", comp).slack for d in (torch.float32, torch.bfloat16)
            for comp in (False, True)} == {estimate(c, 4, 512, device="mps").slack}


def test_a_config_that_cannot_fit_is_refused_before_anything_is_built(small_corpus, small_tokenizer, tmp_path):
    r = run_cli("pretrain", "--data", str(small_corpus), "--tokenizer", str(small_tokenizer), "--depth", "32",
                "--seq-len", "2048", "--batch-size", "4096", "--device", "cpu", "--save", str(tmp_path / "big"))
    assert r.returncode == 2
    assert r.stderr.startswith("error: this config needs about ") and "--grad-checkpoint" in r.stderr
    assert "GiB available" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "big").exists()


@pytest.mark.parametrize("preset,rows", [("d20", 32), ("gpt2", 16)])
def test_nanochat_batches_fit_an_80gb_gpu_without_checkpointing(preset, rows):
    """nanochat trains d20 at 32 x 2,048 and d24 at 16 x 2,048 on 80 GB cards without recomputing
    anything; so must picochat's estimate of the same, in bf16."""
    from picochat.plan import GPU_BYTES, memory_fit
    from picochat.presets import PRESETS
    fit = memory_fit(PRESETS[preset], rows, 2048, torch.device("cuda"), torch.bfloat16, available=GPU_BYTES)
    assert fit.plain <= GPU_BYTES and fit.describe().endswith(": fits")
