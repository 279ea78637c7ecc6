"""`picochat serve`: the real server (uvicorn, in a thread) driven by the official `openai` client
and raw HTTP. Answers equal the engine's own, streaming equals non-streaming, every bad input is a
4xx in OpenAI's error shape and the server answers normally afterwards, a full queue is a 503, a
client that leaves frees its rows at once, concurrent requests share one decode step, and the
calculator's call and output are marked in the stream. Tiny models built here (no shared data)."""

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from picochat.config import ModelConfig
from picochat.conversation import render_for_completion
from picochat.engine import Engine
from picochat.model import GPT
from picochat.run_dir import load_run, save_run
from picochat.serve import create_app, start_in_thread
from picochat.tokenizer import SPECIAL_TOKENS, Tokenizer

from .conftest import complete

openai = pytest.importorskip("openai")

REPO = Path(__file__).resolve().parents[1]
KEY = "sekret"
TEXT = ("The quick brown fox jumps over the lazy dog. 1+2 makes 3, and 12*7 makes 84. "
        "Pack my box with five dozen liquor jugs! How vexingly quick daft zebras jump. ") * 40
CONTEXT = 96


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train([TEXT], 300)


def random_gpt(tok, silent_specials: bool) -> GPT:
    """Random weights, GQA and a window of 8. silent_specials: the special tokens' head rows are
    zeroed, so the model never stops or calls the tool by itself (every request runs to max_tokens)."""
    cfg = ModelConfig(vocab_size=tok.vocab_size, n_layer=3, n_embd=64, n_head=4, n_kv_head=2,
                      sequence_len=CONTEXT, window_pattern="SSL", window=8)
    torch.manual_seed(0)
    m = GPT(cfg)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.3 * torch.randn_like(p))
        if silent_specials:
            m.lm_head.weight[tok.vocab_size - len(SPECIAL_TOKENS):] = 0
    return m.eval()


@pytest.fixture(scope="module")
def run_dir(tok, tmp_path_factory) -> Path:
    return save_run(tmp_path_factory.mktemp("serve") / "tiny-chat", random_gpt(tok, False), tok, stage="sft")


@pytest.fixture(scope="module")
def server(run_dir):
    """The main server: a run dir loaded as `picochat serve` loads it, with an API key."""
    run = load_run(run_dir)
    engine = Engine(run.model.eval(), run.tokenizer)
    url, stop = start_in_thread(create_app(engine, run_dir.name, max_concurrent=4, max_queue=8, api_key=KEY))
    yield url, engine
    stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0, timeout=30)


def metrics(url: str) -> dict:
    return httpx.get(url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}, timeout=10).json()


def wait_for(predicate, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.03)
    return predicate()


MSGS = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is the quick fox?"}]


# ----------------------------------------------------------------------------- the OpenAI API

def test_chat_completion_equals_the_engine_and_counts_tokens(server, client, tok):
    engine = server[1]
    r = client.chat.completions.create(model="anything", messages=MSGS, temperature=0, max_tokens=30)
    prompt = render_for_completion(tok, {"messages": MSGS})  # the system message folds into the user's
    ref = complete(engine, prompt, max_tokens=30, temperature=0.0)[0]
    assert r.object == "chat.completion" and r.model == "tiny-chat"
    choice = r.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == ref.text
    assert choice.finish_reason == ref.finish_reason
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(prompt), len(ref.tokens))
    assert r.usage.total_tokens == len(prompt) + len(ref.tokens)
    parts = choice.message.model_extra["picochat"]["parts"]
    assert "".join(p["text"] for p in parts) == ref.text


def test_streaming_equals_non_streaming(server, client):
    kw = dict(model="m", messages=MSGS, temperature=0, max_tokens=40)
    whole = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    content = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(content) == whole.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    # on the wire: SSE data lines, the parts marked, and the stream closed by [DONE]
    with httpx.stream("POST", server[0] + "/v1/chat/completions", json={**kw, "stream": True},
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in resp.iter_lines() if ln]
    assert all(ln.startswith("data: ") for ln in lines) and lines[-1] == "data: [DONE]"
    deltas = [json.loads(ln[6:])["choices"][0]["delta"] for ln in lines[1:-2]]
    assert all(d["picochat"]["part"] == "text" for d in deltas)


def test_n_choices_and_seeds(server, client):
    kw = dict(model="m", messages=MSGS, temperature=1.0, max_tokens=20, n=2, seed=7)
    a = client.chat.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1]
    texts = [c.message.content for c in a.choices]
    assert texts[0] != texts[1]  # two samples, not one copied
    assert [c.message.content for c in client.chat.completions.create(**kw).choices] == texts
    # one generator per request: the rows draw what the engine's own n-sample call draws
    prompt = render_for_completion(server[1].tokenizer, {"messages": MSGS})
    ref = complete(server[1], prompt, num_samples=2, max_tokens=20, temperature=1.0, seed=7)
    assert texts == [c.text for c in ref]
    assert a.usage.completion_tokens == sum(len(c.tokens) for c in ref)
    streamed = ["", ""]
    for chunk in client.chat.completions.create(stream=True, **kw):
        for c in chunk.choices:
            streamed[c.index] += c.delta.content or ""
    assert streamed == texts
    # the same seeded request gives the same text while another request shares its batch
    alone = client.chat.completions.create(model="m", messages=MSGS, temperature=1.0, max_tokens=30, seed=3)
    other = threading.Thread(target=client.chat.completions.create,
                             kwargs=dict(model="m", messages=[{"role": "user", "content": "Pack my box"}],
                                         temperature=0.9, max_tokens=60, seed=11))
    other.start()
    batched = client.chat.completions.create(model="m", messages=MSGS, temperature=1.0, max_tokens=30, seed=3)
    other.join()
    assert batched.choices[0].message.content == alone.choices[0].message.content


def test_stop_strings_cut_the_text(server, client):
    kw = dict(model="m", messages=MSGS, temperature=0, max_tokens=40)
    full = client.chat.completions.create(**kw).choices[0].message.content
    assert len(full) > 12
    stop = full[6:9]
    cut = full[:full.index(stop)]
    r = client.chat.completions.create(stop=[stop, "\x00never"], **kw)
    assert (r.choices[0].message.content, r.choices[0].finish_reason) == (cut, "stop")
    streamed = list(client.chat.completions.create(stop=stop, stream=True, **kw))
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == cut
    assert streamed[-1].choices[0].finish_reason == "stop"


def test_completions_endpoint(server, client, tok):
    engine = server[1]
    r = client.completions.create(model="m", prompt="The quick brown", max_tokens=12, temperature=0)
    ref = complete(engine, [tok.bos_id] + tok.encode("The quick brown"), max_tokens=12, temperature=0.0,
                                tools=False)[0]
    assert r.object == "text_completion" and r.choices[0].text == ref.text
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (1 + len(tok.encode("The quick brown")), 12)
    chunks = list(client.completions.create(model="m", prompt="The quick brown", max_tokens=12, temperature=0,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == ref.text
    assert chunks[-1].choices[0].finish_reason == "length"
    # defaults to 16 tokens, as OpenAI's legacy endpoint does
    assert client.completions.create(model="m", prompt="Pack", temperature=0).usage.completion_tokens <= 16


def test_models_health_and_metrics(server, client):
    url = server[0]
    assert [m.id for m in client.models.list().data] == ["tiny-chat"]
    assert client.models.retrieve("tiny-chat").id == "tiny-chat"
    assert httpx.get(url + "/health").json() == {"status": "ok"}
    before = metrics(url)
    client.chat.completions.create(model="m", messages=MSGS, temperature=0, max_tokens=5)
    after = metrics(url)
    assert after["requests_total"] == before["requests_total"] + 1
    assert after["requests_completed"] == before["requests_completed"] + 1
    assert after["tokens_generated"] >= before["tokens_generated"] + 1
    assert after["tokens_per_s"] > 0 and after["uptime_s"] >= before["uptime_s"]
    assert after["requests_active"] == 0 and after["requests_queued"] == 0 == after["queue_depth"]
    # the web page is served (the UI's own page, or a placeholder until it is installed)
    assert httpx.get(url + "/").status_code == 200


def test_api_key(server):
    url = server[0]
    body = {"model": "m", "messages": MSGS, "max_tokens": 2}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        r = httpx.post(url + "/v1/chat/completions", json=body, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(url + "/v1/models").status_code == 401
    assert httpx.get(url + "/health").status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()


# ----------------------------------------------------------------------------- bad input

def test_max_tokens_past_the_room_left_ends_at_the_context(client, server):
    """max_tokens under the context but over what the prompt leaves: the reply fills the context
    and ends with "length" (only a max_tokens no prompt could honour is a 400)."""
    r = client.chat.completions.create(model="m", messages=MSGS, temperature=0, max_tokens=CONTEXT - 1)
    assert r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens + r.usage.completion_tokens == CONTEXT


GOOD = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
BAD = [  # (path, body: dict or raw bytes, status, param)
    ("chat", b"{not json", 400, None),
    ("chat", b"[1, 2]", 400, None),
    ("chat", b"\xff\xfe", 400, None),
    ("chat", {"model": "m"}, 400, "messages"),
    ("chat", {**GOOD, "messages": []}, 400, "messages"),
    ("chat", {**GOOD, "messages": "hi"}, 400, "messages"),
    ("chat", {**GOOD, "messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0].role"),
    ("chat", {**GOOD, "messages": [{"role": "tool", "content": "hi"}]}, 400, "messages[0].role"),
    ("chat", {**GOOD, "messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
    ("chat", {**GOOD, "messages": [{"role": "user", "content": "  "}]}, 400, "messages"),
    ("chat", {**GOOD, "messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}, 400,
     "messages"),
    ("chat", {**GOOD, "messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
     400, "messages"),
    ("chat", {**GOOD, "messages": [{"role": "user", "content": "word " * 200}]}, 400, "messages"),
    ("chat", {**GOOD, "max_tokens": 10_000}, 400, "max_tokens"),
    ("chat", {**GOOD, "max_tokens": 0}, 400, "max_tokens"),
    ("chat", {**GOOD, "max_tokens": "10"}, 400, "max_tokens"),
    ("chat", {**GOOD, "temperature": -0.5}, 400, "temperature"),
    ("chat", {**GOOD, "temperature": "hot"}, 400, "temperature"),
    ("chat", {**GOOD, "temperature": True}, 400, "temperature"),
    ("chat", b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', 400, None),
    ("chat", b"[" * 100_000 + b"]" * 100_000, 400, None),
    ("chat", {**GOOD, "top_p": 0}, 400, "top_p"),
    ("chat", {**GOOD, "top_p": 1.5}, 400, "top_p"),
    ("chat", {**GOOD, "n": 0}, 400, "n"),
    ("chat", {**GOOD, "n": 100}, 400, "n"),
    ("chat", {**GOOD, "n": 1.5}, 400, "n"),
    ("chat", {**GOOD, "stop": 5}, 400, "stop"),
    ("chat", {**GOOD, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ("chat", {**GOOD, "stop": [""]}, 400, "stop"),
    ("chat", {**GOOD, "seed": -1}, 400, "seed"),
    ("chat", {**GOOD, "seed": "x"}, 400, "seed"),
    ("chat", {**GOOD, "stream": "yes"}, 400, "stream"),
    ("chat", {**GOOD, "model": 3}, 400, "model"),
    ("chat", b'{"messages": "' + b"x" * (2 << 20) + b'"}', 413, None),
    ("completions", {"model": "m"}, 400, "prompt"),
    ("completions", {"model": "m", "prompt": 5}, 400, "prompt"),
    ("completions", {"model": "m", "prompt": [10 ** 9]}, 400, "prompt"),
    ("completions", {"model": "m", "prompt": "hi", "echo": True}, 400, "echo"),
]


def test_bad_input_is_a_4xx_in_openai_shape_and_the_server_goes_on(server):
    url = server[0]
    auth = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(base_url=url, headers=auth, timeout=30) as http:
        before = metrics(url)["requests_invalid"]
        for path, body, status, param in BAD:
            kw = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) \
                else {"json": body}
            r = http.post(f"/v1/{'chat/completions' if path == 'chat' else 'completions'}", **kw)
            assert r.status_code == status, (body if len(str(body)) < 200 else str(body)[:200], r.text)
            err = r.json()["error"]
            assert set(err) == {"message", "type", "param", "code"} and err["message"], err
            assert err["type"] == "invalid_request_error" and err["param"] == param, (body, err)
            # the server still answers, and correctly (greedy, so a sampled end token cannot end it at 0)
            assert http.get("/health").json() == {"status": "ok"}
            ok = http.post("/v1/chat/completions", json={**GOOD, "max_tokens": 1, "temperature": 0})
            assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 1
        assert metrics(url)["requests_invalid"] == before + len(BAD)
        for method, path, status in (("GET", "/v1/chat/completions", 405), ("GET", "/nowhere", 404)):
            r = http.request(method, path)
            assert r.status_code == status and set(r.json()["error"]) == {"message", "type", "param", "code"}
        assert metrics(url)["requests_active"] == 0


# ----------------------------------------------------------------------------- load: queue, disconnects, batching

class Slow(nn.Module):
    """A model that takes 30 ms a step, so that requests stay running while a test looks."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.config = inner, inner.config

    def forward(self, idx, kv_cache=None):
        time.sleep(0.03)
        return self.inner(idx, kv_cache=kv_cache)


@pytest.fixture(scope="module")
def slow_server(tok):
    engine = Engine(Slow(random_gpt(tok, True)), tok)
    url, stop = start_in_thread(create_app(engine, "slow", max_concurrent=2, max_queue=1))
    yield url
    stop()


def _open_stream(http: httpx.Client, max_tokens: int = 60) -> httpx.Response:
    req = http.build_request("POST", "/v1/chat/completions",
                             json={"model": "m", "messages": MSGS, "max_tokens": max_tokens, "stream": True})
    resp = http.send(req, stream=True)
    assert resp.status_code == 200
    return resp


def test_full_queue_503_disconnects_free_rows_and_requests_share_a_step(slow_server):
    url = slow_server
    before = metrics(url)  # counters since this module's server started: other tests ran on it too
    with httpx.Client(base_url=url, timeout=30) as http:
        a, b = _open_stream(http), _open_stream(http)  # max_concurrent 2: both run
        lines = a.iter_lines()
        assert next(lines).startswith("data: ")  # a is streaming
        assert wait_for(lambda: metrics(url)["requests_active"] == 2)
        c = _open_stream(http)  # waits in the queue (max_queue 1)
        assert wait_for(lambda: metrics(url)["requests_queued"] == 1)
        r = http.post("/v1/chat/completions", json={"model": "m", "messages": MSGS, "max_tokens": 5})
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["code"] == "server_busy"
        m = metrics(url)
        assert m["requests_rejected"] - before["requests_rejected"] == 1
        assert m["batch_rows_max"] == 2  # a and b decoded in one step
        # clients leave mid-stream: their rows go at once; c gets in, then leaves from the queue's head
        a.close()
        b.close()
        assert wait_for(lambda: metrics(url)["requests_queued"] == 0)
        c.close()
        assert wait_for(lambda: metrics(url)["requests_active"] == 0, timeout=2)
        m = metrics(url)
        assert m["requests_cancelled"] - before["requests_cancelled"] == 3 and m["batch_rows_last"] <= 2
        # and the server is fine
        r = http.post("/v1/chat/completions", json={"model": "m", "messages": MSGS, "max_tokens": 3,
                                                     "temperature": 0})  # greedy: no sampled early stop
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3


def test_a_killed_client_frees_its_slot(slow_server):
    """A non-streaming request from a process that is killed mid-request."""
    url = slow_server
    code = ("import httpx, sys; httpx.post(sys.argv[1] + '/v1/chat/completions', timeout=60, json={'model': 'm', "
            "'messages': [{'role': 'user', 'content': 'hi'}], 'max_tokens': 80})")
    before = metrics(url)
    proc = subprocess.Popen([sys.executable, "-c", code, url])
    try:
        assert wait_for(lambda: metrics(url)["requests_active"] == 1, timeout=120)
        proc.kill()
        proc.wait()
        assert wait_for(lambda: metrics(url)["requests_active"] == 0, timeout=120)
        m = metrics(url)  # it was dropped, not run to its 80 tokens
        assert m["requests_cancelled"] - before["requests_cancelled"] == 1
        assert m["requests_completed"] == before["requests_completed"]
        assert m["tokens_generated"] - before["tokens_generated"] < 80
    finally:
        proc.kill()
    assert httpx.get(url + "/health").json() == {"status": "ok"}


# ----------------------------------------------------------------------------- tool calls in the stream

class Markov(nn.Module):
    """A fake model whose next token depends only on the last one fed (a lookup table): rows of a
    batch, padding and joining cannot change its script."""

    def __init__(self, tok, successor: dict[int, int], default: int):
        super().__init__()
        self.config = ModelConfig(vocab_size=tok.vocab_size, n_layer=1, n_embd=8, n_head=1, n_kv_head=1,
                                  sequence_len=CONTEXT)
        self.dummy = nn.Parameter(torch.zeros(1))
        table = torch.full((tok.vocab_size,), default)
        for a, b in successor.items():
            table[a] = b
        self.register_buffer("table", table)

    def forward(self, idx, kv_cache=None):
        if kv_cache is not None:
            kv_cache.advance(idx.size(1))
        return F.one_hot(self.table[idx], self.config.vocab_size).float() * 100  # sampling cannot stray


def test_tool_calls_are_marked_in_the_stream(tok):
    sid = tok.special_id
    byte = {c: tok.mergeable_ranks[c.encode()] for c in "1+2 ok"}
    script = [sid("<|assistant_start|>"), sid("<|python_start|>"), byte["1"], byte["+"], byte["2"],
              sid("<|python_end|>")]
    succ = dict(zip(script, script[1:]))
    succ.update({sid("<|output_end|>"): byte[" "], byte[" "]: byte["o"], byte["o"]: byte["k"],
                 byte["k"]: sid("<|assistant_end|>")})
    engine = Engine(Markov(tok, succ, default=byte["o"]), tok)
    url, stop = start_in_thread(create_app(engine, "markov"))
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        r = client.chat.completions.create(model="m", messages=MSGS, max_tokens=50, n=2, temperature=0)
        for choice in r.choices:
            assert (choice.message.content, choice.finish_reason) == ("[calc: 1+2] = 3 ok", "stop")
            assert choice.message.model_extra["picochat"]["parts"] == [
                {"part": "call", "text": "[calc: 1+2]"}, {"part": "output", "text": " = 3"},
                {"part": "text", "text": " ok"}]
        # per choice: 8 sampled + 3 forced (the tool's output) tokens; the stop token is not counted
        assert r.usage.completion_tokens == 2 * 11
        chunks = list(client.chat.completions.create(model="m", messages=MSGS, max_tokens=50, temperature=0,
                                                     stream=True))
        by_part: dict = {}
        for c in chunks[1:-1]:
            d = c.choices[0].delta
            by_part[d.model_extra["picochat"]["part"]] = by_part.get(d.model_extra["picochat"]["part"], "") + d.content
        assert by_part == {"call": "[calc: 1+2]", "output": " = 3", "text": " ok"}
    finally:
        stop()


# ----------------------------------------------------------------------------- the command line

def _cli(*args):
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "picochat", "serve", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def test_cli_serve(run_dir, tmp_path):
    bad = _cli("--load", str(tmp_path / "missing"), "--device", "cpu")
    _, err = bad.communicate(timeout=60)
    assert bad.returncode == 2 and err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err
    proc = _cli("--load", str(run_dir), "--port", "0", "--device", "cpu", "--api-key", KEY)
    try:
        line = proc.stdout.readline()  # the banner, printed once the server is ready
        assert line.startswith("picochat serve: http://127.0.0.1:"), line + proc.stderr.read()
        url = line.split()[2].rstrip("/")
        assert httpx.get(url + "/health", timeout=10).json() == {"status": "ok"}
        r = httpx.post(url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=30,
                       json={"model": "tiny-chat", "prompt": "The", "max_tokens": 4, "temperature": 0})
        assert r.json()["usage"]["completion_tokens"] == 4
        proc.send_signal(signal.SIGINT)  # Ctrl-C: a clean shutdown
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()


# ----------------------------------------------------------------------------- a rude client

@pytest.fixture(scope="module")
def strict_server(run_dir):
    """`picochat serve` with short limits: a body must arrive within 0.5 s, an idle connection goes
    after 0.5 s, at most 4 connections at once. Yields (url, the process), its stderr unread."""
    proc = _cli("--load", str(run_dir), "--port", "0", "--device", "cpu", "--body-timeout", "0.5",
                "--idle-timeout", "0.5", "--max-connections", "4")
    line = proc.stdout.readline()
    assert line.startswith("picochat serve: http://127.0.0.1:"), line + proc.stderr.read()
    yield line.split()[2].rstrip("/"), proc
    proc.kill()


def _raw(url: str, head_only_of: int | None = None) -> socket.socket:
    """A connection that sends a chat request's headers and (head_only_of: only that many bytes
    of) its body."""
    host, port = url.removeprefix("http://").split(":")
    body = json.dumps({"model": "m", "messages": MSGS, "max_tokens": 2}).encode()
    s = socket.create_connection((host, int(port)), timeout=10)
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Length: %d\r\n\r\n" % len(body) + body[:head_only_of])
    return s


def test_a_rude_client_is_let_go_quietly(strict_server):
    url, proc = strict_server
    before = metrics_open(url)
    # hangs up halfway through its body: no traceback, counted
    s = _raw(url, head_only_of=10)
    time.sleep(0.1)
    s.close()
    assert wait_for(lambda: metrics_open(url)["clients_gone"] == before["clients_gone"] + 1)
    # a body that never finishes: 408 after the body timeout, and the connection is freed
    t0 = time.monotonic()
    s = _raw(url, head_only_of=10)
    reply = _response(s)
    assert reply.startswith(b"HTTP/1.1 408") and b"request_timeout" in reply
    assert time.monotonic() - t0 < 3
    s.close()
    # an idle keep-alive connection is closed by the server
    s = _raw(url)
    assert s.recv(65536).startswith(b"HTTP/1.1 200")
    s.settimeout(5)
    t0 = time.monotonic()
    while s.recv(65536):  # the rest of the response, then the server's close
        pass
    assert time.monotonic() - t0 < 3
    s.close()
    # at most 4 connections: a fifth request, while 4 hold theirs open, gets 503
    held = [_raw(url, head_only_of=5) for _ in range(4)]
    time.sleep(0.1)
    r = httpx.post(url + "/v1/chat/completions", json={"model": "m", "messages": MSGS, "max_tokens": 2},
                   timeout=10)
    assert r.status_code == 503
    for s in held:
        s.close()
    r = httpx.post(url + "/v1/chat/completions", json={"model": "m", "messages": MSGS, "max_tokens": 2},
                   timeout=10)
    assert r.status_code == 200
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=30) == 0
    # the server said nothing of it, but for uvicorn's one line on each connection over the cap
    assert [line for line in proc.stderr.read().splitlines() if "Exceeded concurrency limit" not in line] == []


def _response(s: socket.socket) -> bytes:
    """One whole HTTP response (its headers, and the body its Content-Length promises)."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += s.recv(4096)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
    while len(body) < length:
        body += s.recv(4096)
    return head + b"\r\n\r\n" + body


def metrics_open(url: str) -> dict:
    return httpx.get(url + "/metrics", timeout=10).json()


def test_writes_to_a_client_that_left_are_counted_not_logged(tok, caplog):
    engine = Engine(random_gpt(tok, True), tok)
    url, stop = start_in_thread(create_app(engine, "quiet"))
    try:
        before = metrics_open(url)["lost_writes"]
        with caplog.at_level(logging.WARNING):
            logging.getLogger("asyncio").warning("socket.send() raised exception.")
        assert metrics_open(url)["lost_writes"] == before + 1
        assert not [r for r in caplog.records if "socket.send" in r.getMessage()]
    finally:
        stop()
