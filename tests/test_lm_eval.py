"""lm-evaluation-harness runs an exported picochat model through its `hf` model (remote code), fully
offline, on a local task over tests/data's ARC excerpt (tests/data/lm_eval/arc_excerpt.yaml: its
arc_easy task's prompt and choices), and its loglikelihoods and accuracy are picochat's own."""

import json
import subprocess
import sys

import pytest
import torch

from picochat.config import ModelConfig
from picochat.evals.core import score
from picochat.model import GPT
from picochat.run_dir import save_run
from picochat.tokenizer import Tokenizer

from .conftest import REPO, randomized, run_cli

pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed (pip install -e '.[test]' installs it)")
pytest.importorskip("accelerate", reason="lm-eval's hf model needs accelerate (lm_eval[hf]; '.[test]' installs it)")


def _docs() -> list[dict]:
    return [json.loads(line) for name in ("ARC-Easy-test.jsonl", "ARC-Challenge-test.jsonl")
            for line in (REPO / "tests/data/arc" / name).read_text().splitlines() if line.strip()]


def test_lm_eval_scores_the_export_as_picochat_does(small_tokenizer, tmp_path):
    tok = Tokenizer.load(small_tokenizer)
    # a context that holds the longest prompt (203 tokens with this 512-token vocabulary): lm-eval
    # cuts a longer one's start, which picochat's scoring here does not
    config = ModelConfig(vocab_size=tok.vocab_size, n_layer=2, n_embd=64, n_head=4, n_kv_head=2, sequence_len=256,
                         window_pattern="SL", window=16)
    model = randomized(GPT(config), seed=7).eval()
    save_run(tmp_path / "run", model, tok, stage="base")
    r = run_cli("export", "--load", str(tmp_path / "run"), "--save", str(tmp_path / "hf"))
    assert r.returncode == 0, r.stderr[-2000:]
    env = {"HF_HOME": str(tmp_path / "hf_home"), "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
    r = subprocess.run([sys.executable, "-m", "lm_eval", "run", "--model", "hf", "--model_args",
                        f"pretrained={tmp_path / 'hf'},trust_remote_code=True,add_bos_token=True,dtype=float32",
                        "--include_path", "tests/data/lm_eval", "--tasks", "arc_excerpt", "--device", "cpu",
                        "--batch_size", "8", "--output_path", str(tmp_path / "out"), "--log_samples"],
                       cwd=REPO, capture_output=True, text=True, timeout=600,
                       env={**__import__("os").environ, **env})
    assert r.returncode == 0, r.stderr[-3000:]
    samples = [json.loads(line) for line in next((tmp_path / "out").rglob("samples_arc_excerpt_*.jsonl"))
               .read_text().splitlines()]
    results = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())
    acc = results["results"]["arc_excerpt"]["acc,none"]
    docs = _docs()
    assert len(samples) == len(docs) == 24
    # picochat's scoring: BOS, the prompt, then each choice's text after a space; the loglikelihood
    # of the choice's tokens (the whole text's tokens past the prompt's, as lm-eval splits them)
    right, worst = 0, 0.0
    for sample in sorted(samples, key=lambda s: s["doc_id"]):
        doc = docs[sample["doc_id"]]
        context = f"Question: {doc['question']}\nAnswer:"
        start = 1 + len(tok.encode(context))
        seqs = [([tok.bos_id, *tok.encode(f"{context} {choice}")], start, None) for choice in doc["choices"]["text"]]
        seqs = [(t, s, len(t)) for t, s, _ in seqs]
        ours = [-mean * (e - s) for (mean, _, _), (t, s, e) in zip(score(model, seqs, "cpu", torch.float32,
                                                                          tok.bos_id), seqs)]
        theirs = [float(ll) for ll, _ in sample["filtered_resps"]]
        worst = max(worst, max(abs(a - b) for a, b in zip(ours, theirs)))
        gold = doc["choices"]["label"].index(doc["answerKey"])
        right += int(max(range(len(ours)), key=ours.__getitem__) == gold)
        assert sample["acc"] == float(max(range(len(theirs)), key=theirs.__getitem__) == gold)
    assert worst <= 1e-4, worst
    assert acc == right / len(docs)
    print(f"lm-eval acc {acc:.4f}, picochat {right / len(docs):.4f}; loglikelihoods within {worst:.1e}")
