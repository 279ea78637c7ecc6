"""Chat evals: batched categorical scoring equals one question at a time, the bookkeeping of
accuracy / pass@k / ChatCORE, results files, and bpb against a hand computation."""

import json
import math

import pytest
import torch

from picochat.common import autocast, choose_dtype
from picochat.conversation import render_for_completion
from picochat.evals.chat_eval import build_eval_task, categorical_eval, centered, chatcore, evaluate_task, letter_ids
from picochat.run_dir import load_run
from picochat.tasks.registry import CHATCORE as CHATCORE_TASKS
from tests.conftest import TEST_DATA, run_cli


@pytest.fixture(scope="module")
def run(tiny_base):
    return load_run(tiny_base)


def test_batched_categorical_equals_one_question_at_a_time(run, cpu_path):
    task = build_eval_task("arc-easy", str(TEST_DATA / "arc"))
    indices = list(range(len(task)))
    device = torch.device("cpu")
    dtype = choose_dtype("auto", device)  # the path this test runs down (cpu_path)
    # a small token budget: several batches of different widths, padding in most rows
    batched = {i: (pred, scores) for i, pred, scores in
               categorical_eval(run.model, run.tokenizer, task, indices, device, dtype, batch_tokens=600)}
    assert sorted(batched) == indices
    # the same numbers up to a few roundings in the compute dtype (batching changes only the order
    # of the sums): measured 4e-7 in fp32 and 0 in bf16, on logits under 1
    for i in indices:
        ids = render_for_completion(run.tokenizer, task[i])[-run.config.sequence_len:]  # as the eval crops
        with torch.no_grad(), autocast(device, dtype):
            logits = run.model(torch.tensor([ids]))[0, -1]
        letters = task[i]["letters"]
        want = logits[letter_ids(run.tokenizer, letters)].float()
        atol = 8 * torch.finfo(dtype).eps * max(1.0, float(want.abs().max()))
        pred, scores = batched[i]
        assert torch.allclose(torch.tensor(scores), want, atol=atol), (i, scores, want)
        top = want.topk(2).values
        if top[0] - top[1] > 2 * atol:  # a near tie may go either way within the rounding
            assert pred == letters[int(want.argmax())]


def test_centered_and_chatcore_by_hand():
    assert centered(0.25, 0.25) == 0.0 and centered(1.0, 0.25) == 1.0
    assert centered(0.40, 0.25) == pytest.approx(0.2)
    results = {"arc-easy": {"centered": centered(0.40, 0.25)}, "gsm8k": {"centered": centered(0.10, 0.0)}}
    out = chatcore(results)
    assert out["chatcore"] == pytest.approx((0.2 + 0.1) / 2)
    assert out["tasks"] == ["arc-easy", "gsm8k"]
    assert out["missing"] == [t for t in CHATCORE_TASKS if t not in results]


def test_generative_pass_at_k_bookkeeping(run, tmp_path):
    task = build_eval_task("arithmetic", None)
    kw = dict(limit=6, num_samples=3, max_tokens=12, temperature=1.0, seed=5, save=False)
    a = evaluate_task(run, "arithmetic", task, **kw)
    b = evaluate_task(run, "arithmetic", task, **kw)
    assert a["accuracy"] == b["accuracy"] and a["pass@1"] == b["pass@1"]  # seeded: repeatable
    assert a["n"] == 6 and a["of"] == len(task) and a["pass@1"] <= a["accuracy"]


def test_cli_writes_results_and_reports_missing_tasks(tiny_base, tmp_path):
    arc = TEST_DATA / "arc"
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "arc").symlink_to(arc)
    r = run_cli("eval", "chat", "--load", str(tiny_base), "--data", str(tmp_path / "root"), "--limit", "10",
                "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert "ChatCORE" in r.stdout and "over 2 of 6 tasks; missing (no data): mmlu, gsm8k, humaneval, spelling" in r.stdout
    summary = json.loads((tiny_base / "evals" / "arc-easy.json").read_text())
    rows = [json.loads(line) for line in (tiny_base / "evals" / "arc-easy.jsonl").read_text().splitlines()]
    assert summary["n"] == len(rows) == 10 and [r["index"] for r in rows] == list(range(10))
    assert summary["accuracy"] == pytest.approx(sum(r["correct"] for r in rows) / 10)
    assert summary["centered"] == pytest.approx((summary["accuracy"] - 0.25) / 0.75)


def test_cli_bad_data_is_one_error_line(tiny_base, tmp_path):
    r = run_cli("eval", "gsm8k", "--load", str(tiny_base), "--data", str(tmp_path / "nope"))
    assert r.returncode == 2 and r.stderr.strip() == f"error: eval gsm8k: data not found: {tmp_path / 'nope'}"
    r = run_cli("eval", "chat", "--load", str(tiny_base), "--data", str(tmp_path))
    assert r.returncode == 2 and r.stderr.startswith("error: eval chat: none of the tasks' files are under")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q"}\n')
    r = run_cli("eval", "gsm8k", "--load", str(tiny_base), "--data", str(bad))
    assert r.returncode == 2 and "lacks the field(s) answer" in r.stderr and "Traceback" not in r.stderr


def test_bpb_matches_a_hand_computation(run, tmp_path):
    """One document, evaluated whole: bpb = sum of -log2 p(next token) / the text's UTF-8 bytes."""
    text = "Friends, Romans, countrymen — lend me your ears; I come to bury Caesar, not to praise him."
    doc = tmp_path / "doc.txt"
    doc.write_text(text)
    ids = [run.tokenizer.bos_id] + run.tokenizer.encode(text)
    assert len(ids) <= run.config.sequence_len
    r = run_cli("eval", "bpb", "--load", str(run.path), "--data", str(doc), "--seq-len", str(len(ids) - 1),
                "--batch-size", "1", "--device", "cpu", "--dtype", "fp32")
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout.splitlines()[-1])["bpb"]
    with torch.no_grad():
        logits = run.model(torch.tensor([ids[:-1]]))[0].double()
    nats = -sum(torch.log_softmax(logits[t], -1)[ids[t + 1]].item() for t in range(len(ids) - 1))
    want = nats / math.log(2) / len(text.encode("utf-8"))
    assert got == pytest.approx(want, rel=1e-5)


def test_a_smaller_eval_does_not_replace_a_bigger_one_and_the_report_shows_n(tiny_base, tmp_path):
    import shutil

    from picochat.evals.results import load_evals, save_eval
    from picochat.report import StageRecord, eval_table
    run = tmp_path / "run"
    shutil.copytree(tiny_base, run, ignore=shutil.ignore_patterns("evals"))  # other tests' evals
    big = {"task": "arc-easy", "n": 200, "accuracy": 0.3, "centered": centered(0.3, 0.25), "num_samples": 1}
    small = {**big, "n": 5, "accuracy": 0.8, "centered": centered(0.8, 0.25)}
    save_eval(run, "arc-easy", big)
    kept_aside = save_eval(run, "arc-easy", small)
    assert kept_aside.name == "arc-easy.n5.json" and load_evals(run)["arc-easy"]["n"] == 200
    more = {**big, "n": 300, "accuracy": 0.35}
    save_eval(run, "arc-easy", more)  # more examples: it replaces
    assert load_evals(run)["arc-easy"]["n"] == 300
    save_eval(run, "arithmetic", {"task": "arithmetic", "n": 100, "accuracy": 0.5, "centered": 0.5,
                                  "num_samples": 1})
    text = eval_table([StageRecord.read(run)])
    assert "| ARC-Easy | 35.0% of 300 |" in text and "| Arithmetic (tools) | 50.0% of 100 |" in text
    assert "**ChatCORE**" in text and "ChatCORE, nanochat's 5" in text
    assert "Not evaluated (no data given): arc-challenge, gsm8k, humaneval, mmlu, spelling. ChatCORE averages those" \
           " that were." in text
