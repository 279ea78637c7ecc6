"""INT8 weight-only quantization: the layer, the run dir format, the CLI, and what it costs in bpb."""

import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from picochat.cli import main
from picochat.common import PicochatError
from picochat.engine import Engine
from picochat.int8 import INT8_MM_MAX_ROWS, Int8Embedding, Int8Linear, quantize_model, quantize_weight
from picochat.kv_cache import DynamicKVCache
from picochat.quantize import QuantizeConfig, quantize_run
from picochat.run_dir import WEIGHTS, load_run

from .conftest import TEST_DATA, complete, cpu_controls


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def trained(small_corpus, small_tokenizer, tmp_path_factory):
    """A depth-2 model trained long enough (80 steps) that its bpb means something."""
    from picochat.train.pretrain import PretrainConfig, pretrain
    save = tmp_path_factory.mktemp("quant") / "base"
    pretrain(PretrainConfig(data=[str(small_corpus)], save=str(save), tokenizer=str(small_tokenizer), depth=2,
                            seq_len=128, batch_size=8, steps=80, controls=cpu_controls(dtype="fp32", seed=3)))
    return save


@pytest.fixture(scope="module")
def quantized(trained, tmp_path_factory):
    out = tmp_path_factory.mktemp("quant") / "int8"
    info = quantize_run(QuantizeConfig(str(trained), str(out)))
    return out, info


@pytest.fixture(scope="module")
def heldout(tmp_path_factory):
    """Shakespeare the models never saw (small_corpus is the first 150,000 characters)."""
    text = (TEST_DATA / "tinyshakespeare" / "input.txt").read_text()[150_000:190_000]
    path = tmp_path_factory.mktemp("heldout") / "heldout.txt"
    path.write_text(text)
    return path


# ----------------------------------------------------------------------------- the layer

@pytest.mark.parametrize("rows", [1, 3, INT8_MM_MAX_ROWS // 2, 40])  # the int8 kernel, and the dequantize path
def test_int8_linear_close_to_fp32(rows):
    torch.manual_seed(0)
    lin = nn.Linear(256, 96, bias=False)
    q = Int8Linear.from_linear(lin)
    x = torch.randn(2, rows, 256)
    with torch.no_grad():
        ref, out, exact = lin(x), q(x), F.linear(x, q.dequantize())
    assert out.shape == ref.shape and out.dtype == torch.float32
    assert _rel(out, ref) < 0.02  # the int8 rounding of the weights: about 0.7% here
    # against the dequantized weight only the arithmetic differs: bf16 activations in the kernel
    assert _rel(out, exact) < (1e-5 if 2 * rows > INT8_MM_MAX_ROWS else 6e-3)
    assert q.weight.dtype == torch.int8 and not q.weight.requires_grad
    assert _rel(q.dequantize(), lin.weight.detach()) < 0.02


def test_int8_linear_odd_inner_dimension_takes_the_safe_path():
    """The int8 kernel needs in_features % 8 == 0 (other sizes crash torch 2.13): 100 must work."""
    torch.manual_seed(1)
    lin = nn.Linear(100, 24, bias=False)
    q = Int8Linear.from_linear(lin)
    x = torch.randn(1, 1, 100)
    with torch.no_grad():
        assert _rel(q(x), lin(x)) < 0.02


def test_per_channel_scales_are_exact_for_a_hand_built_weight():
    ints = torch.tensor([[127, -3, 0, 64], [-127, 1, 2, 3], [5, -127, 127, 0]], dtype=torch.float32)
    steps = torch.tensor([2.0 ** -4, 2.0 ** 3, 0.5])
    w = ints * steps[:, None]  # row i is a multiple of steps[i] reaching +-127 steps: exact in int8
    q, scale = quantize_weight(w)
    assert torch.equal(scale, steps)
    assert torch.equal(q, ints.to(torch.int8))
    lin = nn.Linear(4, 3, bias=False)
    with torch.no_grad():
        lin.weight.copy_(w)
    m = Int8Linear.from_linear(lin)
    assert torch.equal(m.dequantize(), w)
    # an all-zero row: scale 0, not a division by zero
    q0, s0 = quantize_weight(torch.zeros(2, 8))
    assert torch.equal(s0, torch.zeros(2)) and not q0.any()


def test_int8_embedding_per_row():
    torch.manual_seed(2)
    emb = nn.Embedding(50, 32)
    q = Int8Embedding.from_embedding(emb)
    idx = torch.tensor([[0, 7, 49]])
    with torch.no_grad():
        assert _rel(q(idx), emb(idx)) < 0.02
    assert torch.allclose(q.scale, emb.weight.detach().abs().amax(1) / 127)


# ----------------------------------------------------------------------------- the model

def test_quantized_model_logits_and_kv_cache(trained):
    ref = load_run(trained).model.eval()
    model = quantize_model(load_run(trained).model.eval())
    assert model.quantization == {"method": "int8-weight-only", "per": "output-channel", "embeddings": False}
    ids = torch.randint(0, ref.config.vocab_size, (1, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(ids)
        assert _rel(full, ref(ids)) < 0.05
        # prefill + one-token decodes (the int8 kernel) agree with one full forward (dequantized)
        cache = DynamicKVCache(model.config, 1, 48)
        steps = [model(ids[:, :40], kv_cache=cache)] + [model(ids[:, t:t + 1], kv_cache=cache) for t in range(40, 48)]
    assert _rel(torch.cat(steps, 1), full) < 0.01
    with pytest.raises(PicochatError, match="INT8-quantized"):
        model.param_groups()


def test_greedy_generation_with_the_engine(trained):
    run = load_run(trained, int8=True)
    assert isinstance(run.model.lm_head, Int8Linear)
    engine = Engine(run.model, run.tokenizer)
    ids = [run.tokenizer.bos_id] + run.tokenizer.encode("ROMEO:\nWhat say you")
    a = complete(engine, ids, max_tokens=24, temperature=0.0)[0]
    b = complete(engine, ids, max_tokens=24, temperature=0.0)[0]
    assert a.tokens == b.tokens and 0 < len(a.tokens) <= 24
    assert all(0 <= t < run.tokenizer.vocab_size for t in a.tokens)
    assert isinstance(a.text, str)


# ----------------------------------------------------------------------------- the run dir

def test_round_trip_gives_identical_logits(trained, quantized):
    out, info = quantized
    assert info["quantization"]["method"] == "int8-weight-only"
    mem = quantize_model(load_run(trained).model.eval())
    run = load_run(out)
    assert isinstance(run.model.blocks[0].mlp.c_fc, Int8Linear) and run.trainer_state is None
    assert run.meta["quantization"] == {"method": "int8-weight-only", "per": "output-channel", "embeddings": False}
    assert run.meta["stage"] == "base" and run.meta["quantized_from"] == str(trained)
    ids = torch.randint(0, mem.config.vocab_size, (2, 33), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(run.model(ids), mem(ids))
        assert torch.equal(run.model(ids[:1, :5]), mem(ids[:1, :5]))  # the int8 kernel path too


def test_safetensors_alone_reads_int8_and_files_shrink(trained, quantized, tmp_path):
    out, info = quantized
    fp32, int8 = {}, {}
    with safe_open(str(trained / WEIGHTS), "pt") as f:
        fp32 = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is no dict)
    with safe_open(str(out / WEIGHTS), "pt") as f:
        int8 = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    # depth 2 with picochat's network: 6 linears a block, one value-embedding gate, the lm_head
    linears = [k for k in fp32 if k.startswith(("blocks.", "lm_head.")) and k.endswith(".weight")]
    assert len(linears) == 2 * 6 + 1 + 1
    for k in linears:
        assert int8[k].dtype == torch.int8 and int8[k.removesuffix("weight") + "scale"].dtype == torch.float32
        assert fp32[k].nbytes == 4 * int8[k].nbytes
    for k in ("wte.weight", "value_embeds.1.weight", "smear_gate.weight"):  # embeddings, and smear's 24 inputs
        assert int8[k].dtype == torch.float32
    nbytes = lambda d, keys: sum(d[k].nbytes for k in keys)
    assert nbytes(fp32, linears) / nbytes(int8, linears) == 4
    assert info["ratio"] > 2.5  # the fp32 embeddings (token and value: a third of this tiny model) stay
    full = tmp_path / "int8-emb"
    info = quantize_run(QuantizeConfig(str(trained), str(full), embeddings=True))
    assert info["ratio"] > 3.7 and json.loads((full / "config.json").read_text())["quantization"]["embeddings"]
    run = load_run(full)
    assert isinstance(run.model.wte, Int8Embedding)


def test_bpb_barely_moves(trained, quantized, heldout):
    from picochat.evals.bpb import BpbConfig, eval_bpb
    from picochat.inference import LoadOptions
    out, _ = quantized

    def bpb(load, **kw):
        return eval_bpb(BpbConfig(LoadOptions(str(load), device="cpu", dtype="fp32", **kw), [str(heldout)],
                                  seq_len=128, batch_size=8))
    ref = bpb(trained)
    on_the_fly = bpb(trained, int8=True)
    saved = bpb(out)
    assert ref < 3.5  # trained: far below the ~9 bits of a uniform guess over 512 tokens
    assert saved == pytest.approx(on_the_fly, abs=1e-6)
    assert abs(on_the_fly - ref) < 0.01 * ref


def test_training_a_quantized_run_fails_clearly(quantized, tmp_path):
    from picochat.train.sft import SFTConfig, chat_train
    out, _ = quantized
    with pytest.raises(PicochatError, match="INT8-quantized"):
        chat_train(SFTConfig(load=str(out), data="arithmetic::1", save=str(tmp_path / "sft"), steps=1,
                             batch_size=2, controls=cpu_controls(dtype="fp32")))
    with pytest.raises(PicochatError, match="INT8-quantized.*cannot be resumed"):
        load_run(out, trainer_state=True)


# ----------------------------------------------------------------------------- the command line

def _last_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])  # progress logs come before it


def test_cli_quantize_and_errors(trained, heldout, tmp_path, capsys):
    missing = tmp_path / "nope"
    assert main(["quantize", "--load", str(missing), "--save", str(tmp_path / "q")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "does not exist" in err[0]
    (tmp_path / "taken").mkdir()
    assert main(["quantize", "--load", str(trained), "--save", str(tmp_path / "taken")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "already exists" in err[0]
    assert main(["quantize", "--load", str(trained), "--save", str(tmp_path / "q")]) == 0
    assert _last_json(capsys)["ratio"] > 2.5
    # --int8 on eval bpb: a float run dir quantized at load (a copy: eval writes evals/bpb.json into it)
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    args = ["eval", "bpb", "--load", str(run), "--data", str(heldout), "--seq-len", "128", "--device", "cpu"]
    assert main(args) == 0
    ref = _last_json(capsys)["bpb"]
    assert main(args + ["--int8"]) == 0
    q = _last_json(capsys)["bpb"]
    assert q != ref and abs(q - ref) < 0.01 * ref
    # the int8 result is filed apart: the report card still reads the fp32 model's
    assert json.loads((run / "evals" / "bpb.json").read_text())["bpb"] == pytest.approx(ref, abs=1e-6)
    assert json.loads((run / "evals" / "bpb.int8.json").read_text())["bpb"] == pytest.approx(q, abs=1e-6)
