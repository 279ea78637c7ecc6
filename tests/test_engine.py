"""The Engine: KV-cache decoding equals full recompute, batch rows are independent, sampling
controls behave, the calculator tool forces its output, stops and limits hold, streaming text
only ever contains whole characters. Tiny models, a tokenizer trained on a few KB here."""

import pytest
import torch
from torch import nn

from picochat.config import ModelConfig
from picochat.decode_batch import DecodeBatch, GenRequest
from picochat.engine import Engine
from picochat.kv_cache import DynamicKVCache, StaticKVCache
from picochat.model import GPT
from picochat.reply_text import TextStream, render_text, stream_text
from picochat.sampling import sample_next
from picochat.tokenizer import SPECIAL_TOKENS, Tokenizer

from .conftest import complete

TEXT = ("The quick brown fox jumps over the lazy dog. 1+2 makes 3, and 12*7 makes 84. "
        "Pack my box with five dozen liquor jugs! How vexingly quick daft zebras jump. ") * 40


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train([TEXT], 300)


@pytest.fixture(scope="module")
def model(tok) -> GPT:
    """Random weights everywhere (the zero-initialized projections too), GQA, and windowed layers
    with a window of 8 so that 40 generated tokens cross it several times. The head rows of the
    special tokens are zeroed so that a random model never stops or calls the tool by chance."""
    cfg = ModelConfig(vocab_size=tok.vocab_size, n_layer=3, n_embd=64, n_head=4, n_kv_head=2,
                      sequence_len=64, window_pattern="SSL", window=8)
    assert cfg.layer_windows() == [8, 8, 0]
    torch.manual_seed(0)
    m = GPT(cfg)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.3 * torch.randn_like(p))
        m.lm_head.weight[tok.vocab_size - len(SPECIAL_TOKENS):] = 0
    return m.eval()


def prompt(tok, text="The quick brown fox"):
    return [tok.bos_id] + tok.encode(text)


@torch.no_grad()
def greedy_by_recompute(model, ids, n):
    ids = list(ids)
    out = []
    for _ in range(n):
        nxt = int(model(torch.tensor([ids]))[0, -1].argmax())
        out.append(nxt)
        ids.append(nxt)
    return out


# ----------------------------------------------------------------------------- exactness

@pytest.mark.parametrize("n_prompt", [3, 20])  # shorter and longer than the window of 8
def test_greedy_with_cache_equals_full_recompute(model, tok, n_prompt):
    ids = ([tok.bos_id] + tok.encode(TEXT))[:n_prompt]
    c = complete(Engine(model, tok), ids, max_tokens=40, temperature=0.0)[0]
    assert len(ids) + 40 <= model.config.sequence_len and len(c.tokens) == 40 and c.finish_reason == "length"
    assert c.tokens == greedy_by_recompute(model, ids, 40)
    assert len(set(c.tokens)) > 5  # non-trivial output
    # an engine with no tokenizer (pretraining's samples: no stops, no calculator) gives the same tokens
    assert complete(Engine(model), ids, max_tokens=40, temperature=0.0)[0].tokens == c.tokens


def test_windowed_layers_keep_only_a_ring_of_the_window(model):
    cache = DynamicKVCache(model.config, batch_size=2, max_len=60)
    model(torch.randint(0, 100, (2, 20)), kv_cache=cache)
    assert [k.size(2) for k in cache.k] == [8, 8, 60]
    assert cache.k[0].size(1) == model.config.n_kv_head  # GQA: kv heads only


@torch.inference_mode()
@pytest.mark.parametrize("padded", [False, True])
def test_static_cache_steps_equal_the_dynamic_cache(model, padded):
    """The compiled decode step's cache, run eagerly: every slot of every layer attended with the
    unwritten ones masked, the position a tensor. 30 steps wrap the rings of window 8 several times;
    padded: two left-padded rows (the server's batches)."""
    cfg = model.config
    torch.manual_seed(1)
    idx = torch.randint(0, 200, (2, 10))
    start = torch.tensor([0, 4]) if padded else None
    dyn, full = DynamicKVCache(cfg, 2, 50, start=start), DynamicKVCache(cfg, 2, cfg.sequence_len, start=start)
    model(idx, kv_cache=dyn)
    model(idx, kv_cache=full)
    static = StaticKVCache(full)
    for step in range(30):
        tok = torch.randint(0, 200, (2, 1))
        want, got = model(tok, kv_cache=dyn), model(tok, kv_cache=static)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=f"step {step}")
    assert int(static.pos) == dyn.pos == 40


def test_compiled_decode_gives_the_eager_tokens(model, tok):
    """Engine(compile=True): torch.compile of the one-token step on a StaticKVCache. Greedy tokens
    equal the eager engine's, also on a second call (the same graph: no recompile) and with 3 rows."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    ids = prompt(tok)
    eager, compiled = Engine(model, tok), Engine(model, tok, compile=True)
    for n in (1, 1, 3):
        want = complete(eager, ids, num_samples=n, max_tokens=30, temperature=0.0)
        got = complete(compiled, ids, num_samples=n, max_tokens=30, temperature=0.0)
        assert [c.tokens for c in got] == [c.tokens for c in want]
    if compiled.decode_step is None:
        pytest.skip("torch.compile is not usable here (the engine fell back to eager; see its log)")
    assert counters["stats"]["unique_graphs"] == 2  # one per batch size


def test_a_failing_compile_falls_back_to_eager(model, tok, capsys):
    engine = Engine(model, tok)

    def broken(*args, **kw):
        raise RuntimeError("no C++ compiler found\nmore detail")
    engine.decode_step = broken
    got = complete(engine, prompt(tok), max_tokens=20, temperature=0.0)[0]
    assert got.tokens == complete(Engine(model, tok), prompt(tok), max_tokens=20, temperature=0.0)[0].tokens
    assert engine.decode_step is None
    assert "torch.compile of the decode step failed (RuntimeError: no C++ compiler found); decoding without it" \
        in capsys.readouterr().out


class Recorder(nn.Module):
    """Wraps a model and keeps every logits tensor the engine gets back."""

    def __init__(self, model):
        super().__init__()
        self.inner, self.config, self.logits = model, model.config, []

    def forward(self, idx, kv_cache=None):
        out = self.inner(idx, kv_cache=kv_cache)
        self.logits.append(out[:, -1].clone())
        return out


def test_batch_rows_are_independent(model, tok):
    ids = prompt(tok)
    engine = Engine(model, tok)
    # greedy: every row equals the batch-1 answer
    rows = complete(engine, ids, num_samples=4, max_tokens=30, temperature=0.0)
    single = complete(engine, ids, max_tokens=30, temperature=0.0)[0].tokens
    assert all(r.tokens == single for r in rows)
    # sampled: the rows differ, and the cached logits of every row, at every step, equal a full
    # recompute of that row's own sequence (no row leaks into another through the batch)
    rec = Recorder(model)
    rows = complete(Engine(rec, tok), ids, num_samples=4, max_tokens=24, temperature=1.0, seed=3)
    assert len({tuple(r.tokens) for r in rows}) > 1
    assert len(rec.logits) == 24  # prefill + 23 batched decodes
    with torch.no_grad():
        for r, row in enumerate(rows):
            full = model(torch.tensor([ids + row.tokens]))[0]
            for t in range(24):
                cached = rec.logits[t][0 if t == 0 else r]  # step 0: the shared prefill
                torch.testing.assert_close(cached, full[len(ids) - 1 + t], atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------- sampling

def test_sampling_controls(model, tok):
    ids = prompt(tok, "Pack my box")
    engine = Engine(model, tok)

    def run(**kw):
        return [r.tokens for r in complete(engine, ids, num_samples=2, max_tokens=20, **kw)]

    greedy = run(temperature=0.0)
    assert run(temperature=1.0, top_k=1, seed=1) == greedy
    assert run(temperature=1.0, top_p=1e-6, seed=1) == greedy
    assert run(temperature=1.0, seed=5) == run(temperature=1.0, seed=5)
    assert run(temperature=1.0, seed=5) != run(temperature=1.0, seed=6)
    assert run(temperature=0.8, top_k=20, top_p=0.9, seed=5) == run(temperature=0.8, top_k=20, top_p=0.9, seed=5)


def test_top_k_and_top_p_only_sample_candidates():
    gen = torch.Generator().manual_seed(0)
    logits = torch.tensor([[4.0, 3.9, 0.0, -1.0, 3.8]]).repeat(500, 1)
    assert set(sample_next(logits, 1.0, top_k=2, generator=gen).tolist()) == {0, 1}
    # probs ~ (.36, .33, .30, ...): top_p 0.5 keeps the first two, 0.7 the first three
    assert set(sample_next(logits, 1.0, top_p=0.5, generator=gen).tolist()) == {0, 1}
    assert set(sample_next(logits, 1.0, top_p=0.7, generator=gen).tolist()) == {0, 1, 4}
    # plain sampling follows the softmax; a probability-0 token is never drawn
    probs = torch.tensor([0.1, 0.0, 0.2, 0.7])
    draws = sample_next(probs.log().repeat(20000, 1), 1.0, generator=gen)
    freq = torch.bincount(draws, minlength=4) / 20000
    torch.testing.assert_close(freq, probs, atol=0.015, rtol=0)
    assert freq[1] == 0


# ----------------------------------------------------------------------------- scripted models

class Scripted(nn.Module):
    """A fake model that follows a script per row: it predicts script[i] and moves on when the
    engine feeds that token back; a token it did not predict (a forced one) leaves it in place.
    A row that has been told its script's last token (its stop) is done: the engine drops it from
    the batch. Same forward(idx, kv_cache=...) contract and config as GPT."""

    def __init__(self, tok, scripts, sequence_len=256):
        super().__init__()
        self.config = ModelConfig(vocab_size=tok.vocab_size, n_layer=1, n_embd=8, n_head=1, n_kv_head=1,
                                  sequence_len=sequence_len)
        self.dummy = nn.Parameter(torch.zeros(1))  # the engine finds the device through parameters()
        self.scripts, self.at, self.live = scripts, None, None

    def forward(self, idx, kv_cache=None):
        B, T = idx.shape
        if kv_cache.pos == 0:  # the prefill
            self.at, self.live = [0] * len(self.scripts), list(range(len(self.scripts)))
        else:
            if B < len(self.live):  # rows that stopped left the batch (or fewer rows than scripts)
                self.live = [r for r in self.live if self.at[r] < len(self.scripts[r]) - 1][:B]
            for b, r in enumerate(self.live):
                script = self.scripts[r]
                if self.at[r] < len(script) and idx[b, -1].item() == script[self.at[r]]:
                    self.at[r] += 1
        kv_cache.advance(T)
        logits = torch.zeros(B, T, self.config.vocab_size)
        for b, r in enumerate(self.live[:B]):
            script = self.scripts[r]
            logits[b, -1, script[min(self.at[r], len(script) - 1)]] = 10.0
        return logits


def test_a_tool_call_forces_the_calculator_output(tok):
    sid = tok.special_id
    call = [sid("<|python_start|>"), *tok.encode("1+2"), sid("<|python_end|>")]
    after = tok.encode(" ok")
    end = sid("<|assistant_end|>")
    # the rows share the prefill, hence their first token; then row 0 calls at once while row 1
    # writes more text first, so the rows are forced at different steps
    first = tok.encode("A")
    scripts = [first + call + after + [end], first + tok.encode(" so") + call + after + [end]]
    engine = Engine(Scripted(tok, scripts), tok)
    rows = complete(engine, [tok.bos_id], num_samples=2, temperature=0.0, max_tokens=40)
    output = [sid("<|output_start|>"), *tok.encode("3"), sid("<|output_end|>")]
    for row, script in zip(rows, scripts):
        pre = script[:script.index(call[0])]
        assert row.tokens == pre + call + output + after  # the generation goes on after the tool
        assert row.forced == [False] * len(pre + call) + [True] * len(output) + [False] * len(after)
        assert row.finish_reason == "stop"
    assert rows[0].text == "A[calc: 1+2] = 3 ok"
    assert rows[1].text == "A so[calc: 1+2] = 3 ok"
    # raw events: forced tokens are flagged, a finished row has no more events
    steps = [{ev.index: ev for ev in events}
             for events in engine.generate([GenRequest([tok.bos_id], 2, temperature=0.0)])]
    assert (steps[len(first + call)][0].token, steps[len(first + call)][0].forced) == (output[0], True)
    assert 0 not in steps[-1] and (steps[-1][1].token, steps[-1][1].forced, steps[-1][1].finish) == (end, False, "stop")
    # with tools off nothing is forced
    row = complete(engine, [tok.bos_id], temperature=0.0, tools=False)[0]
    assert not any(row.forced) and sid("<|output_start|>") not in row.tokens


def test_a_bad_expression_gives_an_error_as_output(tok):
    sid = tok.special_id
    script = [sid("<|python_start|>"), *tok.encode("__import__"), sid("<|python_end|>"), sid("<|assistant_end|>")]
    row = complete(Engine(Scripted(tok, [script]), tok), [tok.bos_id], temperature=0.0)[0]
    out = row.tokens[row.tokens.index(sid("<|output_start|>")) + 1:-1]
    assert tok.decode(out).startswith("error")
    assert row.finish_reason == "stop"


# ----------------------------------------------------------------------------- stops and limits

def test_stop_tokens_end_a_row(tok):
    sid = tok.special_id
    hi = tok.encode("hi there")
    for stop_name in ("<|assistant_end|>", "<|bos|>"):
        row = complete(Engine(Scripted(tok, [hi + [sid(stop_name)] + hi]), tok), [tok.bos_id], temperature=0.0)[0]
        assert (row.tokens, row.finish_reason, row.text) == (hi, "stop", "hi there")
    # a caller's stop id
    row = complete(Engine(Scripted(tok, [hi + hi]), tok), [tok.bos_id], temperature=0.0, stop=(hi[1],))[0]
    assert (row.tokens, row.finish_reason) == (hi[:1], "stop")


def test_max_tokens_and_context_are_respected(model, tok):
    engine = Engine(model, tok)
    row = complete(engine, prompt(tok), max_tokens=7, temperature=1.0, seed=0)[0]
    assert (len(row.tokens), row.finish_reason) == (7, "length")
    ctx = model.config.sequence_len
    ids = [tok.bos_id] + tok.encode(TEXT)[:ctx - 11]  # room for 10 tokens
    rows = complete(engine, ids, num_samples=3, max_tokens=100, temperature=1.0, seed=0)
    assert all((len(r.tokens), r.finish_reason) == (10, "length") for r in rows)
    assert len(complete(Engine(model), ids, max_tokens=100, temperature=0.0)[0].tokens) == 10
    assert complete(engine, ids, max_tokens=0)[0].tokens == []


@pytest.mark.parametrize("extra", [0, 1, 50])
def test_a_prompt_at_or_beyond_the_context_does_not_crash(model, tok, extra):
    ctx = model.config.sequence_len
    ids = [tok.bos_id] + tok.encode(TEXT)[:ctx - 1 + extra]
    assert len(ids) == ctx + extra
    engine = Engine(model, tok)
    fitted = engine.fit_prompt(ids, max_tokens=5)
    assert fitted[0] == tok.bos_id and fitted[1:] == ids[-(ctx - 6):]  # left-cut, <|bos|> kept
    row = complete(engine, ids, max_tokens=5, temperature=0.0)[0]
    assert (len(row.tokens), row.finish_reason) == (5, "length")
    row = complete(engine, ids, max_tokens=1000, temperature=0.0)[0]  # room capped at ctx // 2
    assert (len(row.tokens), row.finish_reason) == (ctx // 2, "length")
    assert len(complete(Engine(model), ids, max_tokens=1000, temperature=1.0, seed=0)[0].tokens) == ctx // 2


# ----------------------------------------------------------------------------- streaming

def _byte_id(tok, b: int) -> int:
    return tok.mergeable_ranks[bytes([b])]


def test_stream_text_only_yields_whole_characters(tok):
    sid = tok.special_id
    script = [_byte_id(tok, b) for b in "é漢".encode()] + tok.encode(" ")
    script += [sid("<|python_start|>"), *tok.encode("2*3"), sid("<|python_end|>"), sid("<|assistant_end|>")]
    engine = Engine(Scripted(tok, [script]), tok)

    def stream():
        steps = engine.generate([GenRequest([tok.bos_id], temperature=0.0)])
        return stream_text(tok, ((ev.token, ev.forced) for events in steps for ev in events))
    pieces = [ev.text for ev in stream() if ev.text]
    full = complete(engine, [tok.bos_id], temperature=0.0)[0].text
    assert full == "é漢 [calc: 2*3] = 6"
    assert "".join(pieces) == full
    assert "\ufffd" not in full and pieces[:2] == ["é", "漢"]
    # raw events: the UI can tell the call and its output apart from the answer
    events = list(stream())
    by_part = {}
    for ev in events:
        by_part[ev.part] = by_part.get(ev.part, "") + ev.text
    assert by_part == {"text": "é漢 ", "call": "[calc: 2*3]", "output": " = 6"}
    assert all(ev.forced == (ev.part == "output") for ev in events)


def test_text_stream_holds_back_split_characters_and_flushes_a_broken_tail(tok):
    stream = TextStream(tok)
    ids = [_byte_id(tok, b) for b in "漢".encode()]
    assert [stream.push(i) for i in ids] == ["", "", "漢"]
    assert stream.push(ids[0]) == "" and stream.flush() == "\ufffd"  # like decode(errors="replace")
    assert render_text(tok, ids[:2]) == tok.decode(ids[:2])


# ----------------------------------------------------------------------------- different prompts in one batch

def _prompts(tok):
    ids = [tok.bos_id] + tok.encode(TEXT)
    return [ids[:3], ids[5:25], ids[40:51]]  # shorter and longer than the window of 8


def test_complete_streams_requests_through_a_bounded_batch(model, tok):
    """Engine.complete: more requests than rows; each joins as rows free up, and every request's
    completions equal its run alone (greedy, and seeded sampling with n rows)."""
    engine = Engine(model, tok)
    ids = [tok.bos_id] + tok.encode(TEXT)
    prompts = [ids[k:k + 4 + 3 * k] for k in range(6)]
    budgets = [5, 30, 12, 3, 20, 8]  # different lengths: rows finish at different steps
    reqs = [GenRequest(p, 1, m, 0.0, key=k) for k, (p, m) in enumerate(zip(prompts, budgets))]
    reqs.append(GenRequest(prompts[0], 2, 10, 1.0, seed=9, key="pair"))
    done = dict(engine.complete(iter(reqs), max_rows=3))
    assert sorted(map(str, done)) == sorted(map(str, [*range(6), "pair"]))
    for k, (p, m) in enumerate(zip(prompts, budgets)):
        assert [c.tokens for c in done[k]] == [complete(engine, p, max_tokens=m, temperature=0.0)[0].tokens]
    alone = complete(engine, prompts[0], num_samples=2, max_tokens=10, temperature=1.0, seed=9)
    assert [c.tokens for c in done["pair"]] == [c.tokens for c in alone]


def test_different_prompts_in_one_batch_equal_separate_runs(model, tok):
    engine = Engine(model, tok)
    prompts = _prompts(tok) + [[tok.bos_id] + tok.encode(TEXT)[:49]]  # room for only 14 tokens

    def together(temperature=0.0, seeds=(None,) * 4, **kw):
        reqs = [GenRequest(p, 1, temperature=t, seed=s, key=i, **kw)
                for i, (p, t, s) in enumerate(zip(prompts, temperature if isinstance(temperature, list) else
                                                  [temperature] * len(prompts), seeds))]
        return [c for _, (c,) in sorted(engine.complete(reqs, max_rows=len(reqs)))]
    many = together(max_tokens=30)
    for p, row in zip(prompts, many):  # greedy, token for token, with GQA and windowed layers
        alone = complete(engine, p, max_tokens=30, temperature=0.0)[0]
        assert (row.tokens, row.finish_reason, row.text) == (alone.tokens, alone.finish_reason, alone.text)
    assert [len(r.tokens) for r in many] == [30, 30, 30, 14]
    # a row that finishes is reported once with its finish, then no more
    steps = list(engine.generate([GenRequest(p, max_tokens=30, temperature=0.0, key=i)
                                  for i, p in enumerate(prompts)]))
    assert [sorted(ev.key for ev in s) for s in steps] == [[0, 1, 2, 3]] * 14 + [[0, 1, 2]] * 16
    assert [ev.finish for ev in steps[13] if ev.key == 3] == ["length"]
    # seeded sampling: each row draws what its request draws alone, whatever else is in the batch
    kw = dict(max_tokens=25, top_k=40, top_p=0.95)
    prompts = prompts[:3]
    many = together(0.9, [5, 6, 7], **kw)
    for p, row, seed in zip(prompts, many, [5, 6, 7]):
        assert row.tokens == complete(engine, p, seed=seed, temperature=0.9, **kw)[0].tokens
    # per-row settings: a greedy row next to sampled ones is still greedy
    mixed = together([0.0, 1.0, 1.0], [1, 2, 3], max_tokens=20)
    assert mixed[0].tokens == complete(engine, prompts[0], max_tokens=20, temperature=0.0)[0].tokens


def test_decode_batch_rows_join_and_leave_between_steps(model, tok):
    """Continuous batching: requests join a running batch (longer prompts than its position move
    it right; leading positions nobody uses are dropped), n rows share a prefill, a row can be
    dropped; every row still gets exactly the tokens it gets alone."""
    engine = Engine(model, tok)
    p = _prompts(tok)
    joins = {0: [GenRequest(p[0], max_tokens=12, temperature=0.0, key="a"),
                 GenRequest(p[2], max_tokens=40, temperature=0.0, key="long")],
             3: [GenRequest(p[1], max_tokens=10, temperature=0.0, key="b")],  # 20 tokens > position 11
             14: [GenRequest(p[0], n=2, max_tokens=20, temperature=1.0, seed=3, key="c")],  # "a", "b" left
             20: [GenRequest(p[2], max_tokens=10, temperature=0.0, key="dropped")]}
    batch, out, step, moves = DecodeBatch(model, tok), {}, 0, []
    while len(batch) or step in joins:
        if step in joins:
            before = batch.pos
            batch.add(joins[step])
            moves.append(batch.pos - before)
            assert batch.cache.start is None or int(batch.cache.start.min()) == 0  # no unused positions kept
        if step == 24:
            batch.drop("dropped")
        for ev in batch.sample():
            out.setdefault((ev.key, ev.index), []).append(ev.token)
        batch.forward()
        step += 1

    def greedy(ids, n):
        return complete(engine, ids, max_tokens=n, temperature=0.0)[0].tokens
    c = complete(engine, p[0], num_samples=2, max_tokens=20, temperature=1.0, seed=3)
    assert out[("a", 0)] == greedy(p[0], 12) and out[("long", 0)] == greedy(p[2], 40)
    assert out[("b", 0)] == greedy(p[1], 10)
    assert moves == [11, 20 - 14, -6, 0]  # prefill; right for "b"; left by 6 once "b" (start 0) left
    assert [out[("c", 0)], out[("c", 1)]] == [c[0].tokens, c[1].tokens]
    assert out[("dropped", 0)] == greedy(p[2], 10)[:4]  # decoded at steps 20..23, then dropped
    assert batch.cache is None  # empty: the next request starts a fresh batch


def test_reply_text_around_tool_calls(tok):
    """A tool's output is set off from the words after it; a call that never closes reads as the
    words it was, without the marker; punctuation after the output gets no space."""
    sid = tok.special_id
    call = [sid("<|python_start|>"), *tok.encode("4821*377"), sid("<|python_end|>")]
    out = [sid("<|output_start|>"), *tok.encode("1817517"), sid("<|output_end|>")]
    assert render_text(tok, call + out + tok.encode("The answer is 1817517.")) == \
        "[calc: 4821*377] = 1817517 The answer is 1817517."
    assert render_text(tok, call + out + tok.encode(" So")) == "[calc: 4821*377] = 1817517 So"
    assert render_text(tok, call + out + tok.encode(".")) == "[calc: 4821*377] = 1817517."
    assert render_text(tok, tok.encode("I am ") + [sid("<|python_start|>")] + tok.encode("16 and millions")) == \
        "I am 16 and millions"
    # streamed: the call comes out whole when it closes, tagged as a call; an unclosed one as text
    stream = TextStream(tok)
    pieces = [(stream.push(t), stream.part) for t in call]
    assert [p for p, _ in pieces if p] == ["[calc: 4821*377]"]
    stream = TextStream(tok)
    assert all(stream.push(t) == "" for t in [sid("<|python_start|>"), *tok.encode("16 a")])  # held back
    assert (stream.flush(), stream.part) == ("16 a", "text")
