"""FP8 training (--fp8, picochat/fp8.py) through torchao, on the CPU with torchao's emulated FP8
matmuls: which layers convert, that the training view shares the model's weights and leaves the
model itself (and so the run dir) plain, that a run resumes exactly, and the one-line refusal on a
device without FP8."""

import pytest
import torch
from safetensors.torch import load_file

from picochat.config import ModelConfig
from picochat.fp8 import EMULATE_ENV, eligible, fp8_training_view
from picochat.linear import Linear
from picochat.model import GPT
from picochat.train.pretrain import PretrainConfig, pretrain

from .conftest import cpu_controls, randomized, run_cli

pytest.importorskip("torchao.float8", reason="FP8 training needs torchao (`pip install -e '.[test]'` installs it)")

CPU = torch.device("cpu")


def test_only_the_hidden_matrices_are_eligible():
    assert eligible(Linear(384, 1536)) and eligible(Linear(384, 128))
    assert not eligible(Linear(12, 2))  # a value-embedding gate: too narrow to pay for its casts
    assert not eligible(Linear(384, 100))  # FP8 GEMMs take sides that are multiples of 16
    assert not eligible(Linear(384, 4096), "lm_head")  # the head's product runs in loss.py, chunked
    assert not eligible(torch.nn.Embedding(512, 384))


def test_the_view_converts_the_blocks_shares_the_weights_and_trains_like_bf16(monkeypatch):
    monkeypatch.setenv(EMULATE_ENV, "1")
    # the smallest shape whose matrices FP8 takes (sides of 128 or more): bf16 is slow on a CPU
    # without AVX512-BF16, and this stays quick on either
    config = ModelConfig(vocab_size=512, n_layer=2, n_embd=128, n_head=1, n_kv_head=1, sequence_len=64)
    model = randomized(GPT(config))
    view = fp8_training_view(model, CPU)
    converted = {name for name, m in view.named_modules() if type(m).__name__ == "Float8Linear"}
    assert converted == {f"blocks.{i}.{name}" for i in range(2)
                         for name in ("attn.c_q", "attn.c_k", "attn.c_v", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}
    assert not any(type(m).__name__ == "Float8Linear" for m in model.modules())  # the model itself stays plain
    assert [id(p) for p in view.parameters()] == [id(p) for p in model.parameters()]

    x = torch.randint(0, 512, (4, 64), generator=torch.Generator().manual_seed(0))
    with model.computing_in(torch.bfloat16):
        model(x, x).backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    with view.computing_in(torch.bfloat16):
        loss = view(x, x)
    loss.backward()
    with torch.no_grad(), model.computing_in(torch.bfloat16):
        assert float(loss) == pytest.approx(float(model(x, x)), rel=0.01)
    # the gradients land on the shared weights, and point the way bf16's do
    matrices = {n: p for n, p in model.named_parameters() if p.dim() == 2}
    got = torch.cat([p.grad.flatten() for p in matrices.values()])
    ref = torch.cat([want[n].flatten() for n in matrices])
    assert torch.nn.functional.cosine_similarity(got, ref, dim=0) > 0.95


def _cfg(corpus, tok, save, **controls) -> PretrainConfig:
    return PretrainConfig(data=[str(corpus)], save=str(save), tokenizer=str(tok), depth=2, seq_len=64, batch_size=4,
                          total_batch_tokens=256, steps=8, eval_every=4, eval_tokens=512,
                          controls=cpu_controls(dtype="bf16", seed=5, fp8=True, **controls))


def test_fp8_pretraining_saves_a_plain_model_and_resumes_exactly(small_corpus, small_tokenizer, tmp_path,
                                                                 monkeypatch, capsys):
    monkeypatch.setenv(EMULATE_ENV, "1")
    straight = pretrain(_cfg(small_corpus, small_tokenizer, tmp_path / "straight"))
    assert "fp8: 8 Linear layers train in FP8" in capsys.readouterr().out  # depth 2: c_k, c_v are 64 wide
    pretrain(_cfg(small_corpus, small_tokenizer, tmp_path / "split", stop_at=4))
    resumed = pretrain(_cfg(small_corpus, small_tokenizer, tmp_path / "split", resume=True))
    losses = [m["loss"] for m in straight["metrics"]]
    assert [m["loss"] for m in resumed["metrics"]] == losses
    assert losses[-1] < losses[0] - 0.5
    a, b = (load_file(tmp_path / run / "model.safetensors") for run in ("straight", "split"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert {t.dtype for t in a.values()} == {torch.float32}  # the master weights, nothing of FP8's


def test_fp8_on_a_device_without_it_is_one_line(small_corpus, small_tokenizer, tmp_path):
    r = run_cli("pretrain", "--data", str(small_corpus), "--tokenizer", str(small_tokenizer), "--depth", "2",
                "--steps", "2", "--device", "cpu", "--fp8", "--save", str(tmp_path / "run"))
    assert r.returncode == 2
    assert r.stderr.strip() == ("error: --fp8: FP8 training needs an NVIDIA GPU of compute capability 8.9 or newer "
                                "(H100, L4, RTX 4090); this run is on cpu")
    assert not (tmp_path / "run").exists()
