"""CORE: per-example predictions against a plain unbatched reference on real bundle rows, the
centered/CORE arithmetic on a synthetic bundle, the bundle download (loopback only), the shots."""

from __future__ import annotations

import csv
import io
import json
import random
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
import yaml

from picochat.common import PicochatError
from picochat.evals.core import evaluate_core, fewshot_indices, format_core_table, load_tasks, render, resolve_bundle
from picochat.run_dir import load_run

from .conftest import TEST_DATA

# one task per type, with and without shots, with both delimiters
REAL_TASKS = ["copa", "arc_easy", "winograd", "lambada_openai", "jeopardy"]
LIMIT = 4


# ----------------------------------------------------------------------------- the plain reference

def shared_prefix(seqs: list[list[int]]) -> int:
    n = 0
    while n < min(map(len, seqs)) and len({s[n] for s in seqs}) == 1:
        n += 1
    return n


def reference_spans(tok, kind: str, item: dict, shots: list[dict], delim: str):
    """nanochat's prompts, written out: (tokens, start, end) per sequence, tokens[start:end] scored."""
    bos = tok.bos_id
    if kind == "multiple_choice":
        prefix = "".join(s["query"] + delim + s["choices"][s["gold"]] + "\n\n" for s in shots)
        seqs = [[bos] + tok.encode(prefix + item["query"] + delim + c) for c in item["choices"]]
        start = min(shared_prefix(seqs), min(map(len, seqs)) - 1)
        return [(s, start, len(s)) for s in seqs]
    if kind == "schema":
        prefix = "".join(s["context_options"][s["gold"]] + delim + s["continuation"] + "\n\n" for s in shots)
        seqs = [[bos] + tok.encode(prefix + c + delim + item["continuation"]) for c in item["context_options"]]
        tail = min(shared_prefix([s[::-1] for s in seqs]), min(map(len, seqs)) - 1)
        return [(s, len(s) - tail, len(s)) for s in seqs]
    prefix = "".join(s["context"].strip() + delim + s["continuation"] + "\n\n" for s in shots)
    bare = [bos] + tok.encode((prefix + item["context"].strip() + delim).strip())
    full = [bos] + tok.encode(prefix + item["context"].strip() + delim + item["continuation"])
    assert full[:len(bare)] == bare  # true for these rows; the module also copes when it is not
    return [(full, len(bare), len(full))]


@torch.no_grad()
def reference_score(model, tokens, start, end, max_len):
    """One unbatched forward over the whole vocabulary; mean loss and argmax over tokens[start:end]."""
    cut = max(0, len(tokens) - max_len)
    tokens, start, end = tokens[cut:], max(start - cut, 1), end - cut
    x = torch.tensor([tokens])
    logits = model(x)[0]
    pred, target = logits[start - 1:end - 1], x[0, start:end]
    return F.cross_entropy(pred, target).item(), pred.argmax(-1).tolist(), target.tolist(), cut > 0


@pytest.mark.parametrize("context", [128, 4096])  # the tiny model's own 128 crops most prompts
def test_predictions_match_unbatched_reference(tiny_base, tmp_path, context):
    bundle = TEST_DATA / "core_eval_bundle"
    run = load_run(tiny_base, "cpu")
    run.model.config.sequence_len = context  # crop length; rotary grows, windows are fixed at init
    out = tmp_path / "rows.jsonl"
    result = evaluate_core(run.model, run.tokenizer, bundle, torch.device("cpu"), torch.float32,
                           limit=LIMIT, tasks=REAL_TASKS, results_path=out, batch_tokens=2048)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    tasks = load_tasks(bundle, REAL_TASKS)  # in core.yaml's order
    assert [r["task"] for r in rows] == [t["label"] for t in tasks for _ in range(LIMIT)]
    cropped = 0
    for task in tasks:
        data = [json.loads(line) for line in task["path"].read_text().splitlines() if line.strip()]
        order = list(range(len(data)))
        random.Random(1337).shuffle(order)  # nanochat shuffles each task's rows with seed 1337
        shuffled = [data[i] for i in order]
        mine = [r for r in rows if r["task"] == task["label"]]
        for p in range(LIMIT):
            others = [i for i in range(len(shuffled)) if i != p]
            shots = [shuffled[i] for i in random.Random(1234 + p).sample(others, task["shots"])]
            scored = [reference_score(run.model, *span, context)
                      for span in reference_spans(run.tokenizer, task["type"], shuffled[p], shots, task["delimiter"])]
            cropped += sum(s[3] for s in scored)
            row = mine[p]
            assert row["index"] == order[p]
            if task["type"] == "language_modeling":
                _, guess, target, _ = scored[0]
                assert row["prediction"] == run.tokenizer.decode(guess)
                assert row["correct"] == (guess == target)
            else:
                losses = [s[0] for s in scored]
                assert row["losses"] == pytest.approx(losses, abs=1e-5)
                best, second = sorted(losses)[:2]
                if second - best > 1e-5:  # a near-tie may go either way in float arithmetic
                    assert row["prediction"] == losses.index(min(losses))
                assert row["correct"] == (row["prediction"] == shuffled[p]["gold"])
        acc = sum(r["correct"] for r in mine) / LIMIT
        assert result["tasks"][task["label"]]["accuracy"] == pytest.approx(acc)
    assert (cropped > 0) == (context == 128)


# ----------------------------------------------------------------------------- CORE arithmetic

class ByteTokenizer:
    """Bytes are tokens, BOS is 256: the synthetic bundle's numbers do not depend on any BPE."""
    bos_id = 256

    def encode(self, text):
        return list(text.encode())

    def decode(self, ids):
        return bytes(i for i in ids if i < 256).decode(errors="replace")


class TildeModel(torch.nn.Module):
    """Always predicts "~" with confidence, so which answer wins is known in advance."""
    config = SimpleNamespace(sequence_len=64)

    def forward(self, idx, where=None):
        logits = torch.zeros(*idx.shape, 257)
        logits[..., ord("~")] = 5.0
        return logits if where is None else logits[where]


def write_bundle(root, entries, baselines, files):
    root.mkdir(parents=True, exist_ok=True)
    (root / "core.yaml").write_text(yaml.safe_dump({"icl_tasks": entries}))
    with open(root / "eval_meta_data.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Eval Task", "Task Category", "Random baseline"])
        w.writerows([label, "x", b] for label, b in baselines.items())
    for name, rows in files.items():
        path = root / "eval_data" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


@pytest.fixture
def synthetic(tmp_path):
    entries = [
        {"label": "mc", "dataset_uri": "a/mc.jsonl", "num_fewshot": [2], "icl_task_type": "multiple_choice"},
        {"label": "gone", "dataset_uri": "a/gone.jsonl", "num_fewshot": [0], "icl_task_type": "multiple_choice"},
        {"label": "sch", "dataset_uri": "b/sch.jsonl", "num_fewshot": [0], "icl_task_type": "schema"},
        {"label": "lm", "dataset_uri": "b/lm.jsonl", "num_fewshot": [1], "icl_task_type": "language_modeling",
         "continuation_delimiter": ":"},
    ]
    files = {
        # "~~" always wins: 3 of 4 right
        "a/mc.jsonl": [{"query": f"q{i}", "choices": ["ab", "~~"], "gold": g} for i, g in enumerate([1, 1, 0, 1])],
        # identical scores, the first option wins: 1 of 2 right
        "b/sch.jsonl": [{"context_options": ["x", "y"], "continuation": "~", "gold": g} for g in (0, 1)],
        # right iff the answer is all tildes: 2 of 3
        "b/lm.jsonl": [{"context": "c ", "continuation": a} for a in ("~~", "~a", "~")],
    }
    return write_bundle(tmp_path / "bundle", entries, {"mc": 25, "gone": 25, "sch": 20, "lm": 0}, files)


def test_centered_scores_and_core_mean(synthetic, tmp_path):
    out = tmp_path / "rows.jsonl"
    res = evaluate_core(TildeModel(), ByteTokenizer(), synthetic, torch.device("cpu"), torch.float32,
                        results_path=out)
    t = res["tasks"]
    assert (t["mc"]["accuracy"], t["sch"]["accuracy"], t["lm"]["accuracy"]) == pytest.approx((0.75, 0.5, 2 / 3))
    assert t["mc"]["centered"] == pytest.approx((0.75 - 0.25) / 0.75)
    assert t["sch"]["centered"] == pytest.approx((0.5 - 0.2) / 0.8)
    assert t["lm"]["centered"] == pytest.approx(2 / 3)
    assert res["core"] == pytest.approx((2 / 3 + 0.375 + 2 / 3) / 3)
    assert (res["missing"], res["evaluated"], res["total"]) == (["gone"], 3, 4)
    assert t["mc"]["n"] == 4 and t["mc"]["baseline"] == 0.25 and t["lm"]["type"] == "language_modeling"
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 9 and {r["task"] for r in rows} == {"mc", "sch", "lm"}
    lm = {r["gold"]: r for r in rows if r["task"] == "lm"}
    assert lm["~~"] == {"task": "lm", "index": 0, "prediction": "~~", "gold": "~~", "correct": True}
    assert not lm["~a"]["correct"] and lm["~"]["correct"]
    assert all(r["prediction"] == 1 for r in rows if r["task"] == "mc")
    table = format_core_table(res)
    assert "| mc | multiple_choice | 2 | 4 | 0.7500 | 0.6667 | 0.250 |" in table
    assert "CORE 0.5694 over 3 of 4 tasks; missing: gone" in table

    sub = evaluate_core(TildeModel(), ByteTokenizer(), synthetic, torch.device("cpu"), torch.float32,
                        limit=2, tasks=["lm", "gone"])
    assert (sub["evaluated"], sub["total"], sub["missing"], sub["tasks"]["lm"]["n"]) == (1, 2, ["gone"], 2)


def test_real_bundle_reports_missing_tasks(tiny_base):
    bundle = TEST_DATA / "core_eval_bundle"
    run = load_run(tiny_base, "cpu")
    res = evaluate_core(run.model, run.tokenizer, bundle, torch.device("cpu"), torch.float32, limit=2,
                        tasks=["copa", "hellaswag", "squad"])
    assert (res["evaluated"], res["total"], res["missing"]) == (1, 3, ["hellaswag", "squad"])
    assert "missing: hellaswag, squad" in format_core_table(res)


def test_bad_input_is_a_clear_error(synthetic, tmp_path):
    args = (TildeModel(), ByteTokenizer(), synthetic, torch.device("cpu"), torch.float32)
    with pytest.raises(PicochatError, match="unknown CORE task.*nope"):
        evaluate_core(*args, tasks=["mc", "nope"])
    with pytest.raises(PicochatError, match="limit"):
        evaluate_core(*args, limit=0)
    with pytest.raises(PicochatError, match="has no core.yaml"):
        resolve_bundle(str(tmp_path))
    (synthetic / "eval_data/a/mc.jsonl").write_text(json.dumps({"query": "q", "choices": ["a"]}) + "\n")
    with pytest.raises(PicochatError, match="lacks the field.*gold"):
        evaluate_core(*args, tasks=["mc"])


# ----------------------------------------------------------------------------- download

class Server:
    """Serves one zip at /eval_bundle.zip and an HTML page at /page.zip; counts requests."""

    def __init__(self, files: dict[str, bytes]):
        self.requests: list[str] = []
        srv = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                srv.requests.append(self.path)
                body = files.get(self.path)
                if body is None:
                    self.send_error(404, "Not Found")
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_download_extract_cache_and_errors(synthetic, tmp_path):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for path in synthetic.rglob("*"):
            if path.is_file():
                zf.write(path, "eval_bundle/" + path.relative_to(synthetic).as_posix())
    server = Server({"/eval_bundle.zip": buf.getvalue(), "/page.zip": b"<html>not a zip</html>"})
    try:
        cache = tmp_path / "cache" / "eval_bundle"
        path = resolve_bundle(server.base + "/eval_bundle.zip", cache_dir=str(cache))
        assert path == cache and (path / "core.yaml").is_file() and (path / "eval_data/b/lm.jsonl").is_file()
        assert sorted(p.name for p in cache.parent.iterdir()) == ["eval_bundle"]  # no zip, no temp dir left
        assert [t["label"] for t in load_tasks(path)] == ["mc", "gone", "sch", "lm"]
        assert resolve_bundle(None, cache_dir=str(cache), url=server.base + "/eval_bundle.zip") == cache
        assert server.requests == ["/eval_bundle.zip"]  # the second call used the cache

        with pytest.raises(PicochatError, match="404"):
            resolve_bundle(server.base + "/missing.zip", cache_dir=str(tmp_path / "c2"))
        with pytest.raises(PicochatError, match="not a zip"):
            resolve_bundle(server.base + "/page.zip", cache_dir=str(tmp_path / "c3"))
        assert not (tmp_path / "c2").exists() and not (tmp_path / "c3").exists()
    finally:
        server.close()


# ----------------------------------------------------------------------------- few-shot prompts

def test_fewshot_draw_excludes_the_item_and_is_deterministic():
    for n, k in [(50, 10), (11, 10), (5, 10), (2000, 3)]:
        for idx in range(0, n, max(1, n // 25)):
            shots = fewshot_indices(idx, n, k)
            assert idx not in shots and len(set(shots)) == len(shots) == min(k, n - 1)
            assert all(0 <= s < n for s in shots) and shots == fewshot_indices(idx, n, k)
            if k < n:  # nanochat's draw, written the slow way
                assert shots == random.Random(1234 + idx).sample([i for i in range(n) if i != idx], k)
    assert fewshot_indices(3, 50, 0) == [] and fewshot_indices(0, 1, 5) == []


def test_prompts_put_solved_shots_before_the_item():
    shots = [{"query": "Q1", "choices": ["a", "b"], "gold": 1}, {"query": "Q2", "choices": ["c", "d"], "gold": 0}]
    item = {"query": "Q3", "choices": ["e", "f"], "gold": 0}
    assert render("multiple_choice", item, shots, "\nAnswer: ") == [
        "Q1\nAnswer: b\n\nQ2\nAnswer: c\n\nQ3\nAnswer: e", "Q1\nAnswer: b\n\nQ2\nAnswer: c\n\nQ3\nAnswer: f"]
    sch = {"context_options": ["A1", "A2"], "continuation": "end", "gold": 1}
    assert render("schema", sch, [sch], " ") == ["A2 end\n\nA1 end", "A2 end\n\nA2 end"]
    lm = [{"context": " ctx1 ", "continuation": "x"}, {"context": "ctx2", "continuation": "y"}]
    assert render("language_modeling", lm[1], lm[:1], " ") == ["ctx1 x\n\nctx2", "ctx1 x\n\nctx2 y"]
