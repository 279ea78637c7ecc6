"""Chat evals: ARC, MMLU (categorical), GSM8K, HumanEval, spelling, arithmetic (generative), ChatCORE.

Categorical tasks ask a lettered multiple-choice question and read the answer off the logits at
<|assistant_start|>, restricted to the example's letter tokens: no sampling, one forward per batch
of questions. Generative tasks sample replies with the Engine (calculator on) and grade them with
the task; k samples per question give pass@k. ChatCORE centres each accuracy on its chance level,
(acc - baseline) / (1 - baseline), and averages: 0 is chance, 1 is perfect, as CORE does for base
models. A run's results go to `<run>/evals/<task>.json` (+ per-example .jsonl) for the report card.
"""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from ..common import PicochatError, Progress, autocast, log, write_atomic
from ..conversation import render_for_completion


@dataclass(frozen=True)
class ChatEval:
    task: str  # the task's name for tasks.mixture.build_task
    kind: str  # "categorical" or "generative"
    baseline: float  # accuracy by chance
    data: str  # where its files live under a data root laid out like ../shared/data ("" = built in)
    split: str = "test"
    max_tokens: int = 256  # generative: reply length cap


CHAT_EVALS = {
    "arc-easy": ChatEval("arc-easy", "categorical", 0.25, "arc"),
    "arc-challenge": ChatEval("arc-challenge", "categorical", 0.25, "arc"),
    "mmlu": ChatEval("mmlu", "categorical", 0.25, "mmlu/hf_arrow_mmlu_no_train"),
    "gsm8k": ChatEval("gsm8k", "generative", 0.0, "gsm8k", max_tokens=384),
    "humaneval": ChatEval("humaneval", "generative", 0.0, "humaneval", max_tokens=384),
    "spelling": ChatEval("spelling", "generative", 0.0, "words/words_alpha.txt", max_tokens=96),
    "arithmetic": ChatEval("arithmetic", "generative", 0.0, "", max_tokens=48),
}
# what `picochat eval NAME` runs; ChatCORE averages the six tasks nanochat's does (arithmetic is ours)
GROUPS = {"arc": ["arc-easy", "arc-challenge"], "chat": ["arc-easy", "arc-challenge", "mmlu", "gsm8k",
                                                          "humaneval", "spelling"]}
CHATCORE_TASKS = GROUPS["chat"]
SYNTHETIC_TEST_SEED, SYNTHETIC_TEST_SIZE = 1_000_003, 256  # spelling/arithmetic: questions no training seed makes


def resolve_data(name: str, data: str | None) -> str | None:
    """The task's path from --data: the task's own file/dir, or a data root holding it."""
    spec = CHAT_EVALS[name]
    if not spec.data:
        return None
    data = data or os.environ.get("PICOCHAT_DATA")
    if not data:
        raise PicochatError(f"eval {name}: needs --data (its files, or a directory laid out like "
                            f"../shared/data with {spec.data}), or PICOCHAT_DATA set")
    root = Path(data)
    if (root / spec.data).exists():
        return str(root / spec.data)
    if not root.exists():
        raise PicochatError(f"eval {name}: data not found: {root}")
    return str(root)


def build_eval_task(name: str, data: str | None, split: str | None = None):
    from ..tasks.mixture import build_task
    spec = CHAT_EVALS[name]
    path = resolve_data(name, data)
    if spec.task in ("spelling", "arithmetic"):
        return build_task(spec.task, path, seed=SYNTHETIC_TEST_SEED, size=SYNTHETIC_TEST_SIZE)
    if spec.task == "humaneval":
        return build_task("humaneval", path)
    return build_task(spec.task, path, split=split or spec.split)


# ----------------------------------------------------------------------------- categorical

def letter_ids(tok, letters: list[str]) -> list[int]:
    ids = [tok.encode(letter) for letter in letters]
    if any(len(i) != 1 for i in ids):
        raise PicochatError(f"the tokenizer splits a choice letter into several tokens: {letters}")
    return [i[0] for i in ids]


@torch.no_grad()
def categorical_eval(model, tok, task, indices: list[int], device, dtype, batch_tokens: int = 8192):
    """Yield (index, predicted letter, letter scores) per example, longest questions first. They
    are batched by length, about `batch_tokens` per forward, and right-padded: the model is causal,
    so padding after a prompt cannot change the logits at its last position."""
    context = model.config.sequence_len
    # a question longer than the context keeps its end, where the choices and letters are
    prompts = {i: render_for_completion(tok, task[i])[-context:] for i in indices}
    order = sorted(indices, key=lambda i: -len(prompts[i]))
    start = 0
    while start < len(order):
        width = len(prompts[order[start]])
        batch = order[start:start + max(1, batch_tokens // width)]
        x = torch.zeros(len(batch), width, dtype=torch.long)
        last = torch.zeros(len(batch), width, dtype=torch.bool)  # each question's last position
        for r, i in enumerate(batch):
            x[r, :len(prompts[i])] = torch.tensor(prompts[i])
            last[r, len(prompts[i]) - 1] = True
        with autocast(device, dtype):
            logits = model(x.to(device), where=last.to(device))
        for r, i in enumerate(batch):
            letters = task[i]["letters"]
            scores = logits[r, letter_ids(tok, letters)].float()
            yield i, letters[int(scores.argmax())], scores.tolist()
        start += len(batch)


# ----------------------------------------------------------------------------- generative

def generative_eval(engine, task, indices: list[int], num_samples: int, max_tokens: int, temperature: float,
                    top_k: int | None, seed: int, max_rows: int = 16, workers: int = 2):
    """Yield (index, completions, rewards) per example as they finish. Questions decode together
    with continuous batching (num_samples rows each, sharing the prompt's prefill); grading runs
    in a thread pool meanwhile (HumanEval's grader waits on a sandboxed process)."""
    from ..decode_batch import GenRequest
    requests = (GenRequest(render_for_completion(engine.tokenizer, task[i]), num_samples, max_tokens, temperature,
                           top_k, seed=seed + i, key=i) for i in indices)
    with ThreadPoolExecutor(workers) as pool:
        pending = []
        for i, outs in engine.complete(requests, max_rows=max(max_rows, num_samples)):
            pending.append((i, outs, [pool.submit(task.reward, task[i], c.text) for c in outs]))
            while pending and all(f.done() for f in pending[0][2]):
                j, o, futures = pending.pop(0)
                yield j, o, [f.result() for f in futures]
        for j, o, futures in pending:
            yield j, o, [f.result() for f in futures]


# ----------------------------------------------------------------------------- driver

def eval_stem(run, name: str) -> str:
    """Where a run's results for `name` go under <run>/evals/: a model quantized at load time
    (--int8) files them apart, so they never replace the fp32 model's in the report card."""
    return f"{name}.int8" if run.meta.get("quantized_on_load") else name


def centered(accuracy: float, baseline: float) -> float:
    return (accuracy - baseline) / (1.0 - baseline)


def evaluate_task(run, name: str, task, limit: int | None = None, num_samples: int = 1,
                  max_tokens: int | None = None, temperature: float | None = None, top_k: int | None = 50,
                  seed: int = 0, device=None, dtype=None, batch_tokens: int = 8192, save: bool = True) -> dict:
    """Evaluate a loaded run on one chat eval; returns the summary and, with `save`, writes it and
    the per-example rows into `<run>/evals/`."""
    from ..common import choose_dtype
    from ..engine import Engine
    spec = CHAT_EVALS[name]
    device = device or next(run.model.parameters()).device
    dtype = dtype or choose_dtype("auto", device)
    n = min(len(task), limit) if limit else len(task)
    if temperature is None:
        temperature = 0.0 if num_samples == 1 else 0.8
    t0 = time.perf_counter()
    progress = Progress(n, desc=f"eval {name}", every=max(1, n // 20))
    rows, correct, sample_correct = [], 0, 0.0
    if spec.kind == "categorical":
        results = categorical_eval(run.model, run.tokenizer, task, list(range(n)), device, dtype, batch_tokens)
        for k, (i, pred, scores) in enumerate(results, 1):
            ok = pred == task[i]["answer"]
            correct += ok
            rows.append({"index": i, "prediction": pred, "answer": task[i]["answer"], "correct": ok,
                         "scores": [round(s, 4) for s in scores]})
            progress.update(k, f"| accuracy {correct / k:.3f}")
        sample_correct = correct
    else:
        engine = Engine(run.model, run.tokenizer)
        results = generative_eval(engine, task, list(range(n)), num_samples, max_tokens or spec.max_tokens,
                                  temperature, top_k, seed)
        for k, (i, outs, rewards) in enumerate(results, 1):
            correct += max(rewards) > 0
            sample_correct += sum(r > 0 for r in rewards) / len(rewards)
            rows.append({"index": i, "completions": [c.text for c in outs], "rewards": rewards,
                         "correct": max(rewards) > 0})
            progress.update(k, f"| pass@{num_samples} {correct / k:.3f}")
    progress.close()
    rows.sort(key=lambda r: r["index"])  # batches finish out of order
    acc = correct / max(n, 1)
    result = {"task": name, "kind": spec.kind, "n": n, "of": len(task), "num_samples": num_samples,
              "accuracy": acc, "pass@1": sample_correct / max(n, 1), "baseline": spec.baseline,
              "centered": centered(acc, spec.baseline), "seconds": round(time.perf_counter() - t0, 2),
              "stage": run.meta.get("stage")}
    if save:
        out = Path(run.path) / "evals"
        out.mkdir(exist_ok=True)
        stem = eval_stem(run, name)
        write_atomic(out / f"{stem}.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
        write_atomic(out / f"{stem}.json", json.dumps(result, indent=1) + "\n")
    log(f"eval {name}: {'accuracy' if num_samples == 1 else f'pass@{num_samples}'} {acc:.4f} on {n} of "
        f"{len(task)} examples ({result['seconds']:.1f} s)")
    return result


def chatcore(results: dict[str, dict]) -> dict:
    """ChatCORE over the tasks present, naming those missing (never silently dropped)."""
    have = [t for t in CHATCORE_TASKS if t in results]
    missing = [t for t in CHATCORE_TASKS if t not in results]
    value = sum(results[t]["centered"] for t in have) / len(have) if have else None
    return {"chatcore": value, "tasks": have, "missing": missing}


def run_chat_evals(load: str, names: list[str], data: str | None = None, split: str | None = None,
                   device: str = "auto", dtype: str = "auto", int8: bool = False, **kw) -> dict:
    """`picochat eval arc|mmlu|gsm8k|humaneval|spelling|arithmetic|chat`. Every task's data is read
    before the first one runs, so a wrong path fails at once, not after an hour of evals. For `chat`
    (all six) a task whose files are not under the data root is reported missing instead."""
    from ..checkpoint import load_run
    from ..common import choose_device, choose_dtype, set_threads
    set_threads()
    dev = choose_device(device)
    whole = names == CHATCORE_TASKS
    root = Path(data or os.environ.get("PICOCHAT_DATA") or ".")
    tasks = {name: build_eval_task(name, data, split) for name in names
             if not (whole and CHAT_EVALS[name].data and not (root / CHAT_EVALS[name].data).exists())}
    if not tasks:
        raise PicochatError(f"eval chat: none of the tasks' files are under {root} (expected "
                            f"{', '.join(CHAT_EVALS[n].data for n in names)})")
    run = load_run(load, dev, int8=int8)
    results = {name: evaluate_task(run, name, task, device=dev, dtype=choose_dtype(dtype, dev), **kw)
               for name, task in tasks.items()}
    out = {"results": results}
    if whole:
        out.update(chatcore(results))
    return out


def format_chat_results(out: dict) -> str:
    """A markdown table of run_chat_evals' results, ChatCORE last."""
    lines = ["| task | n | accuracy | centered | time |", "|---|---|---|---|---|"]
    for name, r in out["results"].items():
        metric = f"{r['accuracy']:.4f}" + (f" (pass@{r['num_samples']})" if r["num_samples"] > 1 else "")
        lines.append(f"| {name} | {r['n']} | {metric} | {r['centered']:+.4f} | {r['seconds']:.1f} s |")
    if "chatcore" in out:
        missing = f"; missing (no data): {', '.join(out['missing'])}" if out["missing"] else ""
        lines.append(f"\nChatCORE {out['chatcore']:.4f} over {len(out['tasks'])} of {len(CHATCORE_TASKS)} "
                     f"tasks{missing}")
    return "\n".join(lines)


def humaneval_canonical(data: str | None, limit: int | None = None) -> dict:
    """Grade HumanEval's reference solutions through the sandbox: all must pass (a check of the
    sandbox and the grader, not of a model)."""
    from ..tasks.humaneval import canonical_completion, grade_many
    from .sandbox import sandbox_features
    task = build_eval_task("humaneval", data)
    n = min(len(task), limit) if limit else len(task)
    t0 = time.perf_counter()
    results = grade_many([(task[i], canonical_completion(task[i])) for i in range(n)])
    failed = {task[i]["task_id"]: r.status for i, r in enumerate(results) if not r.passed}
    for tid, status in failed.items():
        log(f"humaneval --canonical: {tid} failed ({status})")
    return {"passed": n - len(failed), "of": n, "failed": failed, "seconds": round(time.perf_counter() - t0, 1),
            "sandbox": [k for k, v in sandbox_features().items() if v]}
