"""picochat export / import: real transformers loads what export writes and computes the same
function; import brings transformers and nanochat checkpoints back, reading nanochat's pickles
without running them."""

import dataclasses
import json
import os
import pickle
from pathlib import Path

import pytest
import torch

from picochat.config import NANOCHAT_FEATURES, ModelConfig
from picochat.conversation import render_conversation, render_for_completion
from picochat.engine import Engine
from picochat.model import GPT
from picochat.run_dir import load_run, save_run
from picochat.tokenizer import SPECIAL_TOKENS, Tokenizer

from .conftest import complete, randomized, run_cli

transformers = pytest.importorskip("transformers")

PROMPTS = ["To be, or not to be", "ROMEO: What light through yonder window breaks? It is the east, and Juliet is the"
           " sun."]  # 9 and 47 tokens: below and above the windows, within the context of 64


def _model(tok: Tokenizer, pattern: str, x0: bool, resid: bool, seed: int, features: dict | None = None) -> GPT:
    """A depth-2 GQA model with noise on every weight; its scalars as asked."""
    config = ModelConfig(vocab_size=tok.vocab_size, n_layer=2, n_embd=64, n_head=4, n_kv_head=2, sequence_len=64,
                         **{**(features or {}), "window_pattern": pattern, "window": 12})
    model = randomized(GPT(config), seed=seed)
    with torch.no_grad():
        model.resid_lambdas.copy_(torch.tensor([1.3, 0.7]) if resid else torch.ones(2))
        model.x0_lambdas.copy_(torch.tensor([0.2, -0.1]) if x0 else torch.zeros(2))
    return model.eval()


@pytest.fixture(scope="module")
def tok(small_tokenizer) -> Tokenizer:
    return Tokenizer.load(small_tokenizer)


@pytest.fixture(scope="module")
def runs(tok, tmp_path_factory) -> dict[str, Path]:
    """remote: sliding windows inside the context, trained x0 mixing and residual scales;
    native: full attention, residual scales only (they fold); plain: scalars at their start;
    nanochat: remote, with every feature of nanochat's network (and its vocabulary padding)."""
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for name, pattern, x0, resid, seed in (("remote", "SL", True, True, 1), ("native", "L", False, True, 2),
                                           ("plain", "L", False, False, 3)):
        out[name] = save_run(root / name, _model(tok, pattern, x0, resid, seed), tok, stage="sft")
    nanochat = _model(tok, "SL", True, True, 4, dataclasses.asdict(NANOCHAT_FEATURES))
    out["nanochat"] = save_run(root / "nanochat", nanochat, tok, stage="sft")
    return out


def _export(run: Path, save: Path, *more: str) -> str:
    r = run_cli("export", "--load", str(run), "--save", str(save), *more)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


def _hf(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
    return model, AutoTokenizer.from_pretrained(path, trust_remote_code=True)


def _ids(tok: Tokenizer, text: str) -> list[int]:
    return [tok.bos_id, *tok.encode(text)]


@pytest.mark.parametrize("name", ["remote", "native", "nanochat"])
def test_exported_model_computes_picochat_s_function(runs, tok, tmp_path, name):
    log = _export(runs[name], tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    if name == "nanochat":
        assert config["model_type"] == "picochat" and config["vocab_size"] == tok.vocab_size  # the padding cut
        assert "value embeddings; smear; backout; queries and keys scaled by 1.2" in log
    if name == "remote":
        assert config["model_type"] == "picochat" and (tmp_path / "hf" / "modeling_picochat.py").is_file()
        assert "sliding windows of 12 tokens within its context of 64; trained x0 mixing" in log
        assert "trust_remote_code=True" in log
    if name == "native":
        assert config["model_type"] == "nanochat" and not (tmp_path / "hf" / "modeling_picochat.py").exists()
        assert "NanoChat (model_type nanochat, no remote code), residual scales folded" in log
    model, hf_tok = _hf(tmp_path / "hf")
    assert type(model).__name__ == ("NanoChatForCausalLM" if name == "native" else "PicochatForCausalLM")
    ours = load_run(runs[name]).model.eval()
    worst = 0.0
    for prompt in PROMPTS:
        ids = _ids(tok, prompt)
        assert hf_tok(prompt, add_special_tokens=False)["input_ids"] == ids[1:]  # the same tokenizer
        assert hf_tok(prompt)["input_ids"] == ids  # <|bos|> in front when special tokens are asked for
        with torch.no_grad():
            theirs = model(torch.tensor([ids])).logits
            mine = ours(torch.tensor([ids]))
        worst = max(worst, (theirs - mine).abs().max().item())
    assert worst <= 1e-4, worst
    # greedy generation: transformers' generate and picochat's engine agree token for token
    engine = Engine(ours, tok)
    for prompt in PROMPTS[:1]:
        ids = _ids(tok, prompt)
        want = complete(engine, ids, max_tokens=32, temperature=0.0, tools=False)[0].tokens
        got = model.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False,
                             attention_mask=torch.ones(1, len(ids), dtype=torch.long))[0, len(ids):].tolist()
        stops = {tok.special_id("<|assistant_end|>"), tok.bos_id}
        assert got[:len(want)] == want and (len(want) == 32 or got[len(want)] in stops)


def test_the_weights_are_as_readable_as_the_files_beside_them(runs, tmp_path):
    """safetensors writes its file 0600; the run dir's and the export's model.safetensors take the
    mode the umask gives config.json, so another account that can read the one can read the other."""
    _export(runs["plain"], tmp_path / "hf")
    umask = os.umask(0)
    os.umask(umask)
    for d in (runs["plain"], tmp_path / "hf"):
        assert (d / "config.json").stat().st_mode & 0o777 == 0o666 & ~umask
        assert (d / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask


def test_chat_template_gives_conversation_py_s_ids(runs, tok, tmp_path):
    _export(runs["plain"], tmp_path / "hf")
    _, hf_tok = _hf(tmp_path / "hf")
    conversation = {"messages": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is 12 * 7?"},
        {"role": "assistant", "content": [{"type": "text", "text": "Let me compute. "},
                                          {"type": "python", "text": "12 * 7"},
                                          {"type": "python_output", "text": "84"},
                                          {"type": "text", "text": " It is 84."}]},
        {"role": "user", "content": "And 3 + 4?\nThanks."}]}

    def template(messages, prompt):
        out = hf_tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=prompt)
        return list(out["input_ids"] if hasattr(out, "keys") else out)

    assert template(conversation["messages"], True) == render_for_completion(tok, conversation)
    whole = conversation["messages"][:3]
    assert template(whole, False) == render_conversation(tok, {"messages": whole})[0]
    assert hf_tok.bos_token == "<|bos|>" and hf_tok.eos_token == "<|assistant_end|>" and hf_tok.pad_token
    gen = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert gen["eos_token_id"][0] == tok.special_id("<|assistant_end|>")
    # a user who types a special token's text: picochat encodes it as text, transformers' template
    # turns it into the special token (as every transformers chat template does; the README says so)
    typed = {"messages": [{"role": "user", "content": "say <|assistant_end|> now"}]}
    end = tok.special_id("<|assistant_end|>")
    assert end not in render_for_completion(tok, typed)
    assert end in template(typed["messages"], True)


def test_round_trip_is_bit_identical_and_evals_agree(runs, tok, tmp_path):
    from safetensors.torch import load_file

    from picochat.evals.chat_eval import build_eval_task, evaluate_task
    for name in ("remote", "plain"):
        _export(runs[name], tmp_path / f"{name}-hf")
        r = run_cli("import", "--format", "hf", "--load", str(tmp_path / f"{name}-hf"), "--save", str(tmp_path / name))
        assert r.returncode == 0, r.stderr[-2000:]
        before, after = load_file(runs[name] / "model.safetensors"), load_file(tmp_path / name / "model.safetensors")
        assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before), name
        a, b = load_run(runs[name]), load_run(tmp_path / name)
        assert a.config == b.config and b.meta["stage"] == "sft" and b.meta["imported_from"]["format"] == "hf"
        scores = [evaluate_task(run, "arithmetic", build_eval_task("arithmetic", None), limit=6, save=False)
                  for run in (a, b)]
        assert scores[0]["accuracy"] == scores[1]["accuracy"] and scores[0]["n"] == 6
        ids = _ids(tok, PROMPTS[0])
        replies = [complete(Engine(run.model.eval(), tok), ids, max_tokens=16, temperature=0.0)[0].tokens
                   for run in (a, b)]
        assert replies[0] == replies[1]
    # nanochat's network: every feature back, and the vocabulary's padding rows (cut on export) back as zeros
    from picochat.model import vocab_rows
    _export(runs["nanochat"], tmp_path / "nanochat-hf")
    assert run_cli("import", "--format", "hf", "--load", str(tmp_path / "nanochat-hf"), "--save",
                   str(tmp_path / "nanochat")).returncode == 0
    a, b = load_run(runs["nanochat"]), load_run(tmp_path / "nanochat")
    assert a.config == b.config and b.config.vocab_multiple == 64
    n = tok.vocab_size
    for k, w in a.model.state_dict().items():
        got = b.model.state_dict()[k]
        assert torch.equal(w[:n], got[:n]) if vocab_rows(k) else torch.equal(w, got), k
        assert not vocab_rows(k) or not got[n:].any()
    # the folded export is the same function, not the same numbers: its import computes the same logits
    _export(runs["native"], tmp_path / "native-hf")
    assert run_cli("import", "--format", "hf", "--load", str(tmp_path / "native-hf"), "--save",
                   str(tmp_path / "native")).returncode == 0
    ids = torch.tensor([_ids(tok, PROMPTS[1])])
    with torch.no_grad():
        diff = (load_run(runs["native"]).model(ids) - load_run(tmp_path / "native").model(ids)).abs().max().item()
    assert diff <= 1e-4


def test_int8_and_bf16_exports(runs, tok, tmp_path):
    from picochat import int8
    run = load_run(runs["plain"])
    int8.quantize_model(run.model)
    save_run(tmp_path / "int8", run.model, tok, stage="sft")
    log = _export(tmp_path / "int8", tmp_path / "hf", "--dtype", "fp32")
    assert "is INT8: its weights are dequantized to fp32" in log
    model, _ = _hf(tmp_path / "hf")
    ids = torch.tensor([_ids(tok, PROMPTS[1])])
    with torch.no_grad():
        assert (model(ids).logits - load_run(tmp_path / "int8").model.eval()(ids)).abs().max().item() <= 1e-3
    _export(runs["plain"], tmp_path / "bf16", "--dtype", "bf16")
    from safetensors.torch import load_file
    assert {v.dtype for v in load_file(tmp_path / "bf16" / "model.safetensors").values()} == {torch.bfloat16}
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"


# ----------------------------------------------------------------------------- nanochat checkpoints

def _nanochat_dir(root: Path, tok: Tokenizer, pattern: str | None, seed: int = 0, extra: dict | None = None,
                  head: bool = False, october: bool = False) -> Path:
    """A nanochat checkpoint in its documented layout: <base>/tokenizer/tokenizer.pkl (a pickled
    tiktoken Encoding with nanochat's nine special tokens) and <base>/base_checkpoints/d2/
    model_000005.pt (the state dict, as saved from a torch.compile'd model, the vocab padded to a
    multiple of 64, embeddings in bf16) with meta_000005.json. head: HEAD's weights besides (value
    embeddings and their gates on the last layer, smear, backout)."""
    import tiktoken
    n = tok.vocab_size - len(SPECIAL_TOKENS)
    ranks = {tok.token_bytes(i): i for i in range(n)}
    enc = tiktoken.Encoding(name="rustbpe", pat_str=__import__("picochat.tokenizer").tokenizer.SPLIT_PATTERN,
                            mergeable_ranks=ranks, special_tokens={s: n + i for i, s in enumerate(SPECIAL_TOKENS[:9])})
    (root / "tokenizer").mkdir(parents=True)
    (root / "tokenizer" / "tokenizer.pkl").write_bytes(pickle.dumps(enc))
    torch.save(torch.tensor([len(t) for t in ranks]), root / "tokenizer" / "token_bytes.pt")
    vocab, padded, d, layers = n + 9, -(-(n + 9) // 64) * 64, 64, 2
    g = torch.Generator().manual_seed(seed)

    def w(*shape):
        return 0.3 * torch.randn(*shape, generator=g)

    state = {"transformer.wte.weight": w(padded, d).bfloat16(), "lm_head.weight": w(padded, d)}
    for i in range(layers):
        state.update({f"transformer.h.{i}.attn.c_q.weight": w(d, d), f"transformer.h.{i}.attn.c_k.weight": w(32, d),
                      f"transformer.h.{i}.attn.c_v.weight": w(32, d), f"transformer.h.{i}.attn.c_proj.weight": w(d, d),
                      f"transformer.h.{i}.mlp.c_fc.weight": w(4 * d, d),
                      f"transformer.h.{i}.mlp.c_proj.weight": w(d, 4 * d)})
    if not october:  # October 2025's models had no per-layer scalars
        state["resid_lambdas"], state["x0_lambdas"] = torch.tensor([1.2, 0.8]), torch.tensor([0.3, -0.2])
    if head:
        state.update({"value_embeds.1.weight": w(padded, 32).bfloat16(),
                      "transformer.h.1.attn.ve_gate.weight": w(2, 12), "smear_gate.weight": w(1, 24),
                      "smear_lambda": torch.tensor([0.4]), "backout_lambda": torch.tensor([0.25])})
    state.update(extra or {})
    ckpt = root / "base_checkpoints" / "d2"
    ckpt.mkdir(parents=True)
    torch.save({f"_orig_mod.{k}": v for k, v in state.items()}, ckpt / "model_000005.pt")
    config = {"sequence_len": 64, "vocab_size": vocab, "n_layer": layers, "n_head": 4, "n_kv_head": 2, "n_embd": d}
    if pattern:
        config["window_pattern"] = pattern
    (ckpt / "meta_000005.json").write_text(json.dumps({"step": 5, "model_config": config, "val_bpb": 1.0}))
    return ckpt


def nanochat_reference(state: dict, config: dict, ids: torch.Tensor) -> torch.Tensor:
    """nanochat's forward (gpt.py as of January 2026), written from its definition: RMSNorm
    without weights, rotary (base 10,000) then QK-norm, GQA, FlashAttention's window (left, 0)
    letting a query see `left` keys before itself, a short window of sequence_len // 2 on S
    layers (the last layer always long), ReLU^2, the residual and x0 scalars, logits soft-capped
    at 15 and cut to the vocab."""
    F = torch.nn.functional
    state = {k.removeprefix("_orig_mod."): v.float() for k, v in state.items()}
    d, H, Hkv, L = config["n_embd"], config["n_head"], config["n_kv_head"], config["n_layer"]
    hd, T = d // H, ids.size(1)
    norm = lambda x: F.rms_norm(x, (x.size(-1),))  # noqa: E731
    inv = 1.0 / (10000 ** (torch.arange(0, hd, 2).float() / hd))
    freqs = torch.outer(torch.arange(T).float(), inv)
    cos, sin = freqs.cos()[None, :, None, :], freqs.sin()[None, :, None, :]

    def rope(x):
        x1, x2 = x[..., :hd // 2], x[..., hd // 2:]
        return torch.cat([x1 * cos + x2 * sin, x1 * (-sin) + x2 * cos], dim=-1)

    pattern = config.get("window_pattern", "L")
    lefts = [config["sequence_len"] // 2 if pattern[i % len(pattern)] == "S" else config["sequence_len"]
             for i in range(L)]
    lefts[-1] = config["sequence_len"]
    pos = torch.arange(T)
    x = norm(state["transformer.wte.weight"][ids])
    x0 = x
    for i in range(L):
        p = f"transformer.h.{i}."
        if "resid_lambdas" in state:  # October 2025's models had no scalars: x stays x
            x = state["resid_lambdas"][i] * x + state["x0_lambdas"][i] * x0
        h = norm(x)
        q = (h @ state[p + "attn.c_q.weight"].T).view(1, T, H, hd)
        k = (h @ state[p + "attn.c_k.weight"].T).view(1, T, Hkv, hd)
        v = (h @ state[p + "attn.c_v.weight"].T).view(1, T, Hkv, hd)
        q, k = norm(rope(q)), norm(rope(k))
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        k, v = k.repeat_interleave(H // Hkv, dim=1), v.repeat_interleave(H // Hkv, dim=1)
        mask = (pos[None, :] <= pos[:, None]) & (pos[:, None] - pos[None, :] <= lefts[i])
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = x + y.transpose(1, 2).reshape(1, T, d) @ state[p + "attn.c_proj.weight"].T
        m = F.relu(norm(x) @ state[p + "mlp.c_fc.weight"].T).square()
        x = x + m @ state[p + "mlp.c_proj.weight"].T
    logits = norm(x) @ state["lm_head.weight"].T
    logits = logits[..., :config["vocab_size"]].float()
    return 15 * torch.tanh(logits / 15)


@pytest.mark.parametrize("pattern", ["SL", None, "october"])
def test_nanochat_checkpoint_imports_and_matches_its_reference_forward(tok, tmp_path, pattern):
    """January 2026 (scalars, windows), and without a window pattern; October 2025's layout has
    neither the pattern nor the scalars."""
    october = pattern == "october"
    ckpt = _nanochat_dir(tmp_path / "nanochat", tok, None if october else pattern, october=october)
    r = run_cli("import", "--format", "nanochat", "--load", str(ckpt), "--save", str(tmp_path / "run"))
    assert r.returncode == 0, r.stderr[-2000:]
    run = load_run(tmp_path / "run")
    assert run.meta["stage"] == "base" and run.meta["imported_from"]["step"] == 5  # from base_checkpoints/
    assert run.tokenizer.encode("To be, or not to be") == tok.encode("To be, or not to be")
    config = json.loads((ckpt / "meta_000005.json").read_text())["model_config"]
    state = torch.load(ckpt / "model_000005.pt", weights_only=True)
    for prompt in PROMPTS:
        ids = torch.tensor([_ids(tok, prompt)])
        with torch.no_grad():
            mine = run.model.eval()(ids)[..., :config["vocab_size"]]
        assert (mine - nanochat_reference(state, config, ids)).abs().max().item() <= 1e-4
    assert "picochat's other 2 (reserved, never trained) get zero rows" in r.stdout


def test_a_head_nanochat_checkpoint_imports_with_every_feature(tok, tmp_path):
    """HEAD's layout: value embeddings (cut to the vocab, grown by picochat's reserved tokens like
    the embeddings), their gates, smear and backout come in; the CLI gives the model that
    from_nanochat gives (which tests/test_nanochat_golden.py holds to nanochat's own forward)."""
    from picochat.convert.nanochat import from_nanochat
    ckpt = _nanochat_dir(tmp_path / "nanochat", tok, "SL", head=True)
    r = run_cli("import", "--format", "nanochat", "--load", str(ckpt), "--save", str(tmp_path / "run"))
    assert r.returncode == 0, r.stderr[-2000:]
    run = load_run(tmp_path / "run")
    c = run.config
    assert (c.value_embeds, c.smear, c.backout, c.qk_scale, c.rope_base, c.vocab_size) == \
        (True, True, True, 1.2, 100_000.0, tok.vocab_size)
    meta = json.loads((ckpt / "meta_000005.json").read_text())
    state = {k.removeprefix("_orig_mod."): v for k, v in torch.load(ckpt / "model_000005.pt").items()}
    config, weights = from_nanochat(state, meta["model_config"], "here")
    ref = GPT(config)
    ref.load_state_dict(weights)
    vocab = meta["model_config"]["vocab_size"]
    assert torch.equal(run.model.value_embeds["1"].weight[:vocab], weights["value_embeds.1.weight"])
    assert not run.model.value_embeds["1"].weight[vocab:].any()  # picochat's reserved tokens: zero rows
    for prompt in PROMPTS:
        ids = torch.tensor([_ids(tok, prompt)])
        with torch.no_grad():
            assert (run.model.eval()(ids)[..., :vocab] - ref.eval()(ids)).abs().max().item() <= 1e-5


def test_nanochat_features_picochat_lacks_are_refused(tok, tmp_path):
    """engram (January 2026), and the 32-channel value-embedding gates before March 9, 2026."""
    ckpt = _nanochat_dir(tmp_path / "nc", tok, "SSSL", extra={"engram.0.weight": torch.zeros(4, 2)})
    r = run_cli("import", "--format", "nanochat", "--load", str(ckpt), "--save", str(tmp_path / "run"))
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert "has engram" in r.stderr and not (tmp_path / "run").exists()
    ckpt = _nanochat_dir(tmp_path / "nc2", tok, "SSSL", extra={
        "value_embeds.1.weight": torch.zeros(64, 32), "transformer.h.1.attn.ve_gate.weight": torch.zeros(2, 32)})
    r = run_cli("import", "--format", "nanochat", "--load", str(ckpt), "--save", str(tmp_path / "run"))
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert "value-embedding gates over 32 channels (nanochat before March 9, 2026)" in r.stderr


class _Exploit:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (Path.write_text, (Path(self.path), "ran"))


def test_a_pickle_that_would_run_code_is_refused(tok, tmp_path):
    ckpt = _nanochat_dir(tmp_path / "nc", tok, None)
    canary = tmp_path / "canary"
    (tmp_path / "nc" / "tokenizer" / "tokenizer.pkl").write_bytes(pickle.dumps(_Exploit(canary)))
    r = run_cli("import", "--format", "nanochat", "--load", str(ckpt), "--save", str(tmp_path / "run"))
    assert r.returncode == 2 and "tokenizer.pkl asks for pathlib.Path.write_text" in r.stderr
    assert not canary.exists() and not (tmp_path / "run").exists()
    # a model file with code in it: torch.load(weights_only=True) refuses it
    ckpt2 = _nanochat_dir(tmp_path / "nc2", tok, None)
    torch.save({"x": _Exploit(canary)}, ckpt2 / "model_000005.pt")
    r = run_cli("import", "--format", "nanochat", "--load", str(ckpt2), "--save", str(tmp_path / "run"))
    assert r.returncode == 2 and "cannot be read as weights" in r.stderr and not canary.exists()


def test_bad_imports_and_exports_say_why_in_one_line(runs, tok, tmp_path, small_corpus):
    def fails(*args, says):
        r = run_cli(*args)
        assert r.returncode == 2 and r.stderr.startswith("error:") and r.stderr.count("\n") == 1, r.stderr
        assert says in r.stderr, r.stderr

    fails("import", "--format", "gguf", "--load", str(tmp_path), "--save", str(tmp_path / "x"), says="invalid choice")
    fails("export", "--load", str(runs["plain"]), "--save", str(tmp_path / "x"), "--format", "onnx",
          says="invalid choice")
    hf = tmp_path / "hf"
    _export(runs["plain"], hf)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "tokenizer.json").write_text((hf / "tokenizer.json").read_text())
    fails("import", "--format", "hf", "--load", str(broken), "--save", str(tmp_path / "x"), says="config.json is missing")
    # another tokenizer than the weights'
    from picochat.tokenizer import train_tokenizer
    train_tokenizer([str(small_corpus)], 400, save=str(tmp_path / "other.json"))
    (hf / "tokenizer.json").write_text((tmp_path / "other.json").read_text())
    fails("import", "--format", "hf", "--load", str(hf), "--save", str(tmp_path / "x"),
          says="the tokenizer does not match the weights")
    fails("import", "--format", "nanochat", "--load", str(tmp_path), "--save", str(tmp_path / "x"),
          says="no model_NNNNNN.pt")
    fails("export", "--load", str(tmp_path / "nothing"), "--save", str(tmp_path / "x"), says="")
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob("x.tmp*"))
    fails("export", "--load", str(runs["plain"]), "--save", str(hf), says="already exists")
    fails("import", "--format", "hf", "--load", str(hf), "--save", str(runs["plain"]), says="already exists")


def test_a_nanochat_config_s_epsilon_is_named_on_import(capsys):
    """transformers' NanoChat configs say rms_norm_eps 1e-6; picochat (and nanochat itself) use fp32's
    machine epsilon: the import keeps picochat's and says so."""
    from picochat.convert.layout import NATIVE, from_hf, to_hf
    config = ModelConfig(vocab_size=64, n_layer=2, n_embd=32, n_head=2, n_kv_head=1, sequence_len=16,
                         window_pattern="L")
    weights = {k: v.float() for k, v in GPT(config).state_dict().items()}
    hf, hf_weights = to_hf(config, weights, NATIVE)
    from_hf(hf, hf_weights)
    said = capsys.readouterr()
    assert "rms_norm_eps" not in said.out + said.err
    back, _ = from_hf({**hf, "rms_norm_eps": 1e-6}, hf_weights)
    said = capsys.readouterr()
    assert "rms_norm_eps 1e-06 in config.json" in said.out + said.err and back.n_layer == 2


def test_push_uploads_the_exported_directory_to_the_hub(runs, tmp_path):
    """--push goes through the Hub's own client to HF_ENDPOINT (a loopback Hub here), with HF_TOKEN."""
    import subprocess
    import sys

    from .hub_server import FakeHub, hub_env

    def export(save, *more, **env):
        return subprocess.run([sys.executable, "-m", "picochat", "export", "--load", str(runs["remote"]), "--save",
                               str(save), *more], capture_output=True, text=True, timeout=300,
                              env=hub_env(hub, HF_HOME=str(tmp_path / "hf_home"), **env))

    with FakeHub() as hub:
        hub.token = "hf_secret"
        r = export(tmp_path / "up", "--push", "me/picochat-tiny", HF_TOKEN="hf_secret")
        assert r.returncode == 0, r.stderr[-2000:]
        sent = hub.models["me/picochat-tiny"]
        assert sent and sent == {p.name: p.read_bytes() for p in (tmp_path / "up").iterdir() if p.is_file()}
        assert "modeling_picochat.py" in sent and f"{hub.url}/me/picochat-tiny/commit/" in r.stdout
        assert "from_pretrained('me/picochat-tiny', trust_remote_code=True)" in r.stdout
        # a wrong token: one error line naming HF_TOKEN; the exported directory stays
        r = export(tmp_path / "up2", "--push", "me/other", HF_TOKEN="wrong")
        assert r.returncode == 2 and r.stderr.startswith("error: the Hub refused the upload of ")
        assert "HF_TOKEN" in r.stderr and r.stderr.count("\n") == 1 and (tmp_path / "up2" / "config.json").is_file()
        # a name that is no repo id: refused before anything is written
        r = export(tmp_path / "up3", "--push", "no repo")
        assert r.returncode == 2 and "USER/NAME" in r.stderr and not (tmp_path / "up3").exists()


def test_a_directory_transformers_own_nanochat_saved_imports(tok, tmp_path):
    """What transformers' NanoChatForCausalLM.save_pretrained writes (the layout of the Hub's
    transformers NanoChat models; its config says rms_norm_eps 1e-6) imports with its logits."""
    from transformers import NanoChatConfig, NanoChatForCausalLM

    from picochat.convert.commands import ImportConfig, import_model
    config = NanoChatConfig(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = NanoChatForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    model.save_pretrained(tmp_path / "hf")
    tok.save(tmp_path / "hf" / "tokenizer.json")
    import_model(ImportConfig(load=str(tmp_path / "hf"), save=str(tmp_path / "run")))
    run = load_run(tmp_path / "run")
    ids = torch.tensor([_ids(tok, PROMPTS[1])])
    with torch.no_grad():
        want = model(ids).logits
        got = run.model.eval()(ids)[..., :want.size(-1)]
    assert (got - want).abs().max().item() <= 1e-4  # (the epsilons differ: 1e-6 there, fp32's here)


# ----------------------------------------------------------------------------- imports from the Hub

def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _import(hub, tmp_path, load: str, save: str, *more: str, **env):
    import subprocess
    import sys

    from .hub_server import hub_env
    return subprocess.run([sys.executable, "-m", "picochat", "import", "--load", load, "--save", str(tmp_path / save),
                           *more], capture_output=True, text=True, timeout=300,
                          env=hub_env(hub, HF_HOME=str(tmp_path / "hf_home"), **env))


@pytest.mark.parametrize("layout", ["transformers", "picochat", "nanochat"])
def test_import_from_the_hub_in_each_published_layout(runs, tok, tmp_path, layout):
    """transformers' NanoChat (what export writes for a model it can compute), picochat's own export
    (remote code), and nanochat's checkpoint folder, served by a loopback Hub: --load OWNER/NAME
    downloads what the import reads into the Hub client's cache and the logits equal the source's."""
    from .hub_server import FakeHub
    if layout == "nanochat":
        ckpt = _nanochat_dir(tmp_path / "src", tok, "SL", head=False)
        files = {**{f"{p.name}": p.read_bytes() for p in ckpt.iterdir()},
                 "tokenizer.pkl": (tmp_path / "src" / "tokenizer" / "tokenizer.pkl").read_bytes(),
                 "model_000002.pt": b"an earlier step, never fetched", "README.md": b"# d2\n"}
        config = json.loads((ckpt / "meta_000005.json").read_text())["model_config"]
        state = torch.load(ckpt / "model_000005.pt", weights_only=True)
        reference = lambda ids: nanochat_reference(state, config, ids)  # noqa: E731
    else:
        run = runs["native" if layout == "transformers" else "remote"]
        _export(run, tmp_path / "export")
        files = {**_files(tmp_path / "export"), "README.md": b"# tiny\n"}
        model = load_run(run).model.eval()
        reference = model.__call__
    with FakeHub() as hub:
        commit = hub.add_model("someone/tiny", files, revision="v1")
        r = _import(hub, tmp_path, "someone/tiny@v1", "run")
        assert r.returncode == 0, r.stderr[-2000:]
        want = "nanochat" if layout == "nanochat" else "hf"
        assert f"the Hub's someone/tiny@v1 is in {want}'s layout" in r.stdout and "Next: picochat chat" in r.stdout
        fetched = {p.rsplit("/resolve/", 1)[1].split("/", 1)[1] for m, p, _ in hub.requests
                   if m == "GET" and "/resolve/" in p}
        assert "README.md" not in fetched and "model_000002.pt" not in fetched  # only what the import reads
        run = load_run(tmp_path / "run")
        assert run.meta["imported_from"]["hub"] == "someone/tiny" and run.meta["imported_from"]["commit"] == commit
        worst = 0.0
        for prompt in PROMPTS:
            ids = torch.tensor([_ids(tok, prompt)])
            with torch.no_grad():
                want_logits = reference(ids)
                got = run.model.eval()(ids)[..., :want_logits.size(-1)]
            worst = max(worst, (got - want_logits).abs().max().item())
        assert worst <= 1e-4, worst
        if layout != "nanochat":
            return
        # again: the files come from the client's cache, not the Hub
        before = len([m for m, p, _ in hub.requests if m == "GET" and "/resolve/" in p])
        r = _import(hub, tmp_path, "someone/tiny@v1", "run2")
        assert r.returncode == 0, r.stderr[-2000:]
        assert len([m for m, p, _ in hub.requests if m == "GET" and "/resolve/" in p]) == before
        assert torch.equal(load_run(tmp_path / "run2").model.state_dict()["lm_head.weight"],
                           run.model.state_dict()["lm_head.weight"])
        # offline, the cached copy serves; a repo never fetched is one line
        r = _import(hub, tmp_path, "someone/tiny@v1", "run3", HF_HUB_OFFLINE="1")
        assert r.returncode == 0 and "the Hub cannot be reached; the cached someone/tiny@v1" in r.stdout, r.stderr
        assert load_run(tmp_path / "run3").meta["imported_from"]["commit"] == commit
        r = _import(hub, tmp_path, "someone/other", "run4", HF_HUB_OFFLINE="1")
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and "its cache has no copy of it" in r.stderr, r.stderr


def test_hub_imports_that_cannot_be_done_say_why_in_one_line(runs, tmp_path, monkeypatch):
    from picochat.common import PicochatError
    from picochat.convert.commands import ImportConfig, import_model

    from .hub_server import FakeHub
    _export(runs["plain"], tmp_path / "export")
    with FakeHub() as hub:
        hub.add_model("me/private", _files(tmp_path / "export"))
        hub.private.add("me/private")
        hub.token = "hf_secret"
        hub.add_model("me/weird", {"README.md": b"hi", "pytorch_model.bin": b"pickled", "config.json": b"{}"})
        monkeypatch.setenv("HF_ENDPOINT", hub.url)

        def fails(load, says, token=None, **kw):
            monkeypatch.setenv("HF_TOKEN", token) if token else monkeypatch.delenv("HF_TOKEN", raising=False)
            with pytest.raises(PicochatError) as e:
                import_model(ImportConfig(load=load, save=str(tmp_path / "x"), **kw))
            assert all(s in str(e.value) for s in says) and "\n" not in str(e.value), str(e.value)
            assert not (tmp_path / "x").exists() and not list(tmp_path.glob("x.tmp*"))

        fails("me/private", ["me/private", "HF_TOKEN is not set"])
        fails("me/private", ["me/private", "HF_TOKEN is set but cannot read it"], token="wrong")
        fails("me/private@v9", ["no revision 'v9'"], token="hf_secret")
        fails("me/weird", ["no layout picochat imports", "README.md, config.json, pytorch_model.bin"])
        fails("me/private", ["--format nanochat: the Hub's me/private is in hf's layout"], token="hf_secret",
              format="nanochat")
        fails("no such thing", ["neither a directory nor a Hub model repo"])
        # from the command line: one error line and status 2; with its token the private repo comes
        r = _import(hub, tmp_path, "nobody/nothing", "x")
        assert r.returncode == 2 and r.stderr.startswith("error:") and r.stderr.count("\n") == 1, r.stderr
        assert "nobody/nothing" in r.stderr and "HF_TOKEN is not set" in r.stderr and not (tmp_path / "x").exists()
        r = _import(hub, tmp_path, "me/private", "x", HF_TOKEN="hf_secret")
        assert r.returncode == 0, r.stderr[-2000:]


# ----------------------------------------------------------------------------- transformers' conventions

def test_remote_code_follows_transformers_conventions(runs, tok, tmp_path, name="nanochat"):
    """What serving engines' transformers backends need: attention through ALL_ATTENTION_FUNCTIONS
    (eager and sdpa give the same logits, padded batch included), windows as layer_types and
    sliding_window, an AutoModel, and generate with the cache equal to generate without it. The
    export with every feature of nanochat's network, sliding windows and trained x0 mixing."""
    from transformers import AutoModel, AutoModelForCausalLM
    _export(runs[name], tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["layer_types"] == ["sliding_attention", "full_attention"] and config["sliding_window"] == 12
    assert "windows" not in config and config["auto_map"]["AutoModel"] == "modeling_picochat.PicochatModel"
    models = {impl: AutoModelForCausalLM.from_pretrained(tmp_path / "hf", trust_remote_code=True,
                                                         attn_implementation=impl).eval() for impl in ("eager", "sdpa")}
    assert models["sdpa"].config._attn_implementation == "sdpa" and models["sdpa"]._supports_attention_backend
    long, short = (_ids(tok, p) for p in reversed(PROMPTS))  # 48 and 10 tokens; the window is 12
    batch = torch.tensor([long, [tok.bos_id] * (len(long) - len(short)) + short])  # the second row left-padded
    mask = torch.tensor([[1] * len(long), [0] * (len(long) - len(short)) + [1] * len(short)])
    with torch.no_grad():
        logits = {impl: m(batch, attention_mask=mask).logits for impl, m in models.items()}
        alone = models["eager"](torch.tensor([short])).logits
    real = mask.bool()  # (a padding position's logits are no one's)
    assert (logits["eager"][real] - logits["sdpa"][real]).abs().max().item() <= 1e-5
    assert (logits["eager"][1, -len(short):] - alone[0]).abs().max().item() <= 1e-4  # padding changes nothing
    ours = load_run(runs[name]).model.eval()
    with torch.no_grad():
        assert (logits["sdpa"][:1] - ours(batch[:1])).abs().max().item() <= 1e-4
    for impl, model in models.items():  # past the window, on both kinds of layer
        prompt = torch.tensor([short])
        cached = model.generate(prompt, max_new_tokens=24, do_sample=False, use_cache=True)
        uncached = model.generate(prompt, max_new_tokens=24, do_sample=False, use_cache=False)
        assert cached.shape == (1, len(short) + 24) and torch.equal(cached, uncached), impl
    base = AutoModel.from_pretrained(tmp_path / "hf", trust_remote_code=True).eval()
    assert type(base).__name__ == "PicochatModel"
    with torch.no_grad():
        hidden = base(torch.tensor([long])).last_hidden_state
        assert torch.allclose(models["sdpa"].lm_head(hidden), models["sdpa"].model(torch.tensor([long]))
                              .last_hidden_state @ models["sdpa"].lm_head.weight.T, atol=1e-5)


def test_an_export_from_before_layer_types_still_imports(runs, tmp_path):
    """picochat exported per-layer `windows` before it followed transformers' layer_types."""
    _export(runs["remote"], tmp_path / "hf")
    path = tmp_path / "hf" / "config.json"
    config = json.loads(path.read_text())
    windows = [config["sliding_window"] if t == "sliding_attention" else 0 for t in config.pop("layer_types")]
    path.write_text(json.dumps({**{k: v for k, v in config.items() if k != "sliding_window"}, "windows": windows}))
    from picochat.convert.commands import ImportConfig, import_model
    import_model(ImportConfig(load=str(tmp_path / "hf"), save=str(tmp_path / "back")))
    assert load_run(tmp_path / "back").config == load_run(runs["remote"]).config
