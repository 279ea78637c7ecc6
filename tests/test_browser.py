"""The web chat page in a real browser: Debian's chromium, driven by Playwright, against `picochat serve`.

Chromium comes from apt and Playwright from pip (`.ci/run` installs both); Playwright's own browser
download is never used. The test skips, with the reason, when either is missing.

The server runs a tiny model made from the `tiny_base` run dir: its context is stretched to 4096
tokens and its head re-drawn so that the special tokens (the stops among them) are never likely,
so that an answer with a large max-tokens is certainly still streaming when the test presses Stop.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from .conftest import REPO

CHROMIUM = os.environ.get("PICOCHAT_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
ARTIFACTS = Path(os.environ.get("PICOCHAT_ARTIFACTS") or REPO / "tests" / "artifacts")

sync_api = pytest.importorskip("playwright.sync_api",
                               reason="playwright is not installed (pip install playwright; .ci/run does)")
if not Path(CHROMIUM).is_file():
    pytest.skip(f"chromium not found at {CHROMIUM} (apt-get install chromium; .ci/run does)", allow_module_level=True)
if importlib.util.find_spec("picochat.serve.app") is None:
    pytest.skip("picochat/serve/app.py (the server) does not exist yet", allow_module_level=True)

# the text length of the last assistant answer, -1 when there is none
LAST_LEN = ("(() => { const m = [...document.querySelectorAll('.msg.assistant')].at(-1);"
            " return m ? m.querySelector('.body').textContent.length : -1; })()")


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def chat_run(tiny_base, tmp_path_factory) -> Path:
    """tiny_base with a 4096-token context and a head that keeps answers going: random rows with
    logits of spread ~6 for ordinary tokens, zero rows (logit 0) for the special tokens."""
    import torch

    from picochat.model import GPT
    from picochat.run_dir import load_run, save_run

    run = load_run(tiny_base)
    config = dataclasses.replace(run.config, sequence_len=4096,
                                 window=run.config.window or run.config.sequence_len // 4)
    model = GPT(config)
    model.load_state_dict(run.model.state_dict())
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        head = model.lm_head.weight
        head.copy_(torch.randn(head.shape, generator=gen) * (6.0 / config.n_embd ** 0.5))
        for sid in run.tokenizer.special_tokens.values():
            head[sid] = 0.0
    return save_run(tmp_path_factory.mktemp("browser") / "chat", model, run.tokenizer, stage="base")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(chat_run, tmp_path_factory):
    """`picochat serve` in a subprocess on a free loopback port; yields its origin."""
    port = _free_port()
    origin = f"http://127.0.0.1:{port}"
    log_path = tmp_path_factory.mktemp("serve") / "serve.log"
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "picochat", "serve", "--load", str(chat_run),
                                 "--port", str(port)], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f"picochat serve exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{origin}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"picochat serve did not answer /health in 120 s:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.25)
        yield origin
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser, server):
    """A fresh page on the chat UI. Afterwards: no request left the server's origin, no JS error."""
    context = browser.new_context(viewport={"width": 1000, "height": 760})
    pg = context.new_page()
    pg.set_default_timeout(60_000)
    requests, errors = [], []
    pg.on("request", lambda r: requests.append(r))
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.goto(server + "/")
    wait_until(pg, "() => window.picochat !== undefined")
    pg.requests = requests
    yield pg
    context.close()
    outside = [r.url for r in requests if not r.url.startswith(server + "/")]
    assert not outside, f"requests left the loopback server: {outside}"
    assert not errors, f"JavaScript errors on the page: {errors}"


def wait_until(page, js: str, timeout: float = 60.0) -> None:
    """Poll a JS expression until it is true. (page.wait_for_function evaluates its string with
    eval, which the page's Content-Security-Policy forbids, as it should.)"""
    deadline = time.monotonic() + timeout
    while not page.evaluate(js):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {js}")
        page.wait_for_timeout(50)


def _get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.load(r)


def _chat_requests(page) -> list[dict]:
    return [r.post_data_json for r in page.requests if r.url.endswith("/v1/chat/completions")]


def _shot(page, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / name
    page.screenshot(path=str(path), full_page=True)
    return path


# ----------------------------------------------------------------------------- tests

def test_streams_stops_regenerates_and_keeps_history(page, server):
    # every asset came from the server itself, and the page shows the model's name from /v1/models
    assert {"/", "/static/app.js", "/static/style.css"} <= {r.url[len(server):] for r in page.requests}
    wait_until(page, "() => document.getElementById('model').textContent.length > 0")

    # a long answer: it streams, visibly growing
    page.fill("#temperature", "0.8")
    page.fill("#max-tokens", "4000")
    page.fill("#input", "Hello there")
    page.press("#input", "Enter")
    assert page.inner_text(".msg.user") == "Hello there"
    assert page.input_value("#input") == ""
    assert page.is_disabled("#send") and page.is_enabled("#stop")
    wait_until(page, f"{LAST_LEN} > 0")
    sizes = [page.evaluate(LAST_LEN)]
    for _ in range(2):
        wait_until(page, f"{LAST_LEN} > {sizes[-1]}")
        sizes.append(page.evaluate(LAST_LEN))
    assert sizes[0] < sizes[1] < sizes[2], sizes

    # Stop mid-stream: the partial answer stays, nothing more arrives, the UI is usable again
    answer = page.locator(".msg.assistant").last
    assert answer.get_attribute("data-state") == "streaming", "the answer ended before Stop was pressed"
    page.click("#stop")
    page.wait_for_selector('.msg.assistant[data-state="stopped"]')
    stopped_len = page.evaluate(LAST_LEN)
    stopped_text = answer.locator(".body").text_content()
    page.wait_for_timeout(800)
    assert page.evaluate(LAST_LEN) == stopped_len
    assert page.is_enabled("#send") and page.is_disabled("#stop") and page.is_enabled("#regen")
    assert "stopped" in answer.locator(".note").inner_text()
    # ... and the server noticed the client leaving and stopped generating too
    deadline = time.monotonic() + 15
    while (metrics := _get_json(server + "/metrics"))["requests_active"] != 0:
        assert time.monotonic() < deadline, f"the server still generates after Stop: {metrics}"
        time.sleep(0.1)
    assert metrics.get("requests_cancelled", 1) >= 1, metrics

    # Regenerate: the stopped answer is replaced by a new, short, complete one
    old = page.query_selector(".msg.assistant")
    page.fill("#max-tokens", "24")
    page.click("#regen")
    page.wait_for_selector('.msg.assistant[data-state="done"]')
    assert not old.evaluate("e => e.isConnected")
    assert page.locator(".msg.assistant").count() == 1 and page.locator(".msg.user").count() == 1
    new_text = page.locator(".msg.assistant .body").text_content()
    assert new_text and new_text != stopped_text
    assert "max-tokens limit" in page.locator(".msg.assistant .note").inner_text()  # finish_reason "length"

    # a second turn (Shift+Enter is a newline, Enter sends) carries the whole history
    page.fill("#input", "line one")
    page.press("#input", "Shift+Enter")
    page.type("#input", "line two")
    assert page.locator(".msg.user").count() == 1  # Shift+Enter did not send
    page.press("#input", "Enter")
    wait_until(page, "() => document.querySelectorAll('.msg.assistant[data-state=\"done\"]').length == 2")
    assert page.locator(".msg.user").last.inner_text() == "line one\nline two"

    sent = _chat_requests(page)
    assert len(sent) == 3
    first, regen, second = sent
    assert first["stream"] is True and first["max_tokens"] == 4000 and first["temperature"] == pytest.approx(0.8)
    assert first["messages"] == [{"role": "user", "content": "Hello there"}]
    assert regen["messages"] == first["messages"] and regen["max_tokens"] == 24
    assert [m["role"] for m in second["messages"]] == ["user", "assistant", "user"]
    assert second["messages"][2]["content"] == "line one\nline two"
    assert second["messages"][1]["content"]  # the regenerated answer, as the model wrote it

    shot = _shot(page, "chat.png")
    assert shot.stat().st_size > 1000

    # New chat empties the conversation
    page.click("#new-chat")
    assert page.locator(".msg").count() == 0
    assert page.is_visible("#empty") and page.is_disabled("#regen")


def test_model_text_is_never_html(page):
    hostile = ('<img src=x onerror="window.pwned=1">\n\n**<b>bold</b>** and `<script>window.pwned=2</script>`\n\n'
               '```html\n<img src=x onerror="window.pwned=3">\n```\n\n- <iframe src="javascript:window.pwned=4">'
               '</iframe>\n- *<svg onload="window.pwned=5">*')
    result = page.evaluate("""(s) => {
        const box = document.createElement('div');
        box.appendChild(window.picochat.renderMarkdown(s));
        document.body.appendChild(box);
        return {tags: [...box.querySelectorAll('*')].map(e => e.tagName.toLowerCase()),
                text: box.textContent, code: box.querySelector('pre code').textContent,
                pwned: window.pwned === undefined ? null : window.pwned};
    }""", hostile)
    assert not {"img", "script", "iframe", "svg", "b"} & set(result["tags"]), result["tags"]
    assert {"p", "strong", "code", "pre", "ul", "li", "em"} <= set(result["tags"])
    assert '<img src=x onerror="window.pwned=1">' in result["text"]
    assert result["code"] == '<img src=x onerror="window.pwned=3">'
    page.wait_for_timeout(300)  # an onerror would have fired by now
    assert page.evaluate("() => window.pwned === undefined")
    assert page.locator("img").count() == 0


def test_streamed_markdown_tool_calls_and_errors(page):
    """The parsing and display of a stream (markdown, tool chips, hostile HTML) and of server and
    network errors, with the responses scripted in the browser (page.route), not by a server."""
    def sse(*deltas):
        chunks = [{"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": d, "finish_reason": None}]}
                  for d in deltas]
        return "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"

    def part(text, kind):
        return {"content": text, "picochat": {"part": kind}}

    body = sse({"role": "assistant"}, part("So **12 times 7** is ", "text"), part("[calc: ", "call"),
               part("12*7", "call"), part("]", "call"), part(" = ", "output"), part("84", "output"),
               part(".\n\n```python\nprint(12 * 7)\n```\n", "text"), {"content": "<img src=x onerror=alert(1)>"})
    page.route("**/v1/chat/completions",
               lambda route: route.fulfill(status=200, content_type="text/event-stream", body=body))
    page.fill("#input", "What is 12*7?")
    page.press("#input", "Enter")
    page.wait_for_selector('.msg.assistant[data-state="done"]')
    answer = page.locator(".msg.assistant .body")
    assert answer.locator(".tool .call").inner_text() == "calc: 12*7"
    assert answer.locator(".tool .output").inner_text() == " = 84"
    assert answer.locator("strong").inner_text() == "12 times 7"
    assert answer.locator("pre code").inner_text() == "print(12 * 7)"
    assert "<img src=x onerror=alert(1)>" in answer.inner_text()
    assert page.locator("img").count() == 0
    _shot(page, "markdown.png")

    # a server error (the OpenAI error shape) is shown in the chat, and the UI stays usable
    page.unroute("**/v1/chat/completions")
    page.route("**/v1/chat/completions", lambda route: route.fulfill(
        status=500, content_type="application/json", body=json.dumps({"error": {"message": "the model exploded"}})))
    page.fill("#input", "again")
    page.press("#input", "Enter")
    page.wait_for_selector(".msg.error")
    assert "the model exploded" in page.inner_text(".msg.error")
    assert page.is_enabled("#send") and page.is_disabled("#stop") and page.is_enabled("#regen")

    # so is a network failure
    page.unroute("**/v1/chat/completions")
    page.route("**/v1/chat/completions", lambda route: route.abort("connectionrefused"))
    page.click("#regen")
    wait_until(page, "() => document.querySelectorAll('.msg.error').length == 2")
    assert "network error" in page.locator(".msg.error").last.inner_text()
    assert page.is_enabled("#send")

    # and with the real server back, Regenerate answers the last question
    page.unroute("**/v1/chat/completions")
    page.fill("#max-tokens", "8")
    page.click("#regen")
    wait_until(page, "() => document.querySelectorAll('.msg.assistant[data-state=\"done\"]').length == 2")
    assert page.locator(".msg.error").count() == 2  # the server took the history: no new error
    messages = _chat_requests(page)[-1]["messages"]
    assert messages[-1] == {"role": "user", "content": "again"}
    # the answer with a tool call went back as picochat's parts: the model sees its tool tokens again
    assert messages[1]["role"] == "assistant" and messages[1]["content"][:4] == [
        {"type": "text", "text": "So **12 times 7** is "}, {"type": "python", "text": "12*7"},
        {"type": "python_output", "text": "84"},
        {"type": "text", "text": ".\n\n```python\nprint(12 * 7)\n```\n<img src=x onerror=alert(1)>"}]
