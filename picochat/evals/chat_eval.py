"""Chat evals: ARC, MMLU (categorical), GSM8K, HumanEval, spelling, arithmetic (generative), ChatCORE.

Categorical tasks ask a lettered multiple-choice question and read the answer off the logits at
<|assistant_start|>, restricted to the example's letter tokens: no sampling, one forward per batch
of questions. Generative tasks sample replies with the Engine (calculator on) and grade them with
the task; k samples per question give pass@k. ChatCORE centres each accuracy on its chance level,
(acc - baseline) / (1 - baseline), and averages: 0 is chance, 1 is perfect, as CORE does for base
models. picochat's ChatCORE averages six tasks (tasks.registry.CHATCORE): nanochat's five (ARC-Easy,
ARC-Challenge, MMLU, GSM8K, HumanEval) and spelling, which the models here train on; the report
also gives the average over nanochat's five, the number to compare with nanochat's. A run's
results go to `<run>/evals/<task>.json` (+ per-example .jsonl) through evals/results.py.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from ..common import PicochatError, Progress, autocast, log
from ..conversation import render_for_completion
from ..data.datasets import LOCATIONS, data_dir
from ..inference import LoadOptions, open_for_inference
from ..settings import check, setting
from ..tasks.registry import CHATCORE, EVALS, NANOCHAT_CHATCORE, TASKS
from .results import eval_name, save_eval

SYNTHETIC_TEST_SEED, SYNTHETIC_TEST_SIZE = 1_000_003, 256  # spelling/arithmetic: questions no training seed makes


def resolve_data(name: str, data: str | None) -> str | None:
    """The task's path from --data: the task's own file/dir, or a data dir holding it (default:
    $PICOCHAT_DATA or ~/.cache/picochat/data)."""
    dataset = TASKS[name].dataset
    if dataset is None:
        return None
    root = data_dir(data)
    if (root / LOCATIONS[dataset]).exists():
        return str(root / LOCATIONS[dataset])
    if data:
        if not root.exists():
            raise PicochatError(f"eval {name}: data not found: {root}")
        return str(root)  # the task's own files
    raise PicochatError(f"eval {name}: no {LOCATIONS[dataset]} in the data dir {root} (fetch it with "
                        f"`picochat data download {dataset}`, or give --data: its files, or a directory laid out "
                        "like ../shared/data)")


def build_eval_task(name: str, data: str | None, split: str | None = None):
    from ..tasks.mixture import build_task
    path = resolve_data(name, data)
    if name in ("spelling", "arithmetic"):
        return build_task(name, path, seed=SYNTHETIC_TEST_SEED, size=SYNTHETIC_TEST_SIZE)
    if name == "pydocs":
        return build_task(name, split="test")
    return build_task(name, path, split=split or EVALS[name].eval.split)


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


def pass_at_k(model, tok, task, indices: list[int], k: int, max_tokens: int, temperature: float, top_k,
              seed: int, max_rows: int) -> dict:
    """pass@k and pass@1 on held-out questions (RL's eval during training), through
    generative_eval: the evals' engine settings, default stops, calculator on. Under torchrun
    each process takes a share of the questions."""
    from .. import distributed
    from ..engine import Engine
    engine = Engine(model, tok)
    any_ok, frac_ok = 0, 0.0
    mine = indices[distributed.rank()::distributed.world_size()]
    for _, _, rewards in generative_eval(engine, task, mine, k, max_tokens, temperature, top_k, seed,
                                         max_rows=max_rows):
        any_ok += max(rewards) > 0
        frac_ok += sum(r > 0 for r in rewards) / len(rewards)
    any_ok, frac_ok = distributed.sum_host([any_ok, frac_ok])
    n = max(len(indices), 1)
    out = {"val_pass@1": round(frac_ok / n, 4)}
    if k > 1:
        out[f"val_pass@{k}"] = round(any_ok / n, 4)
    return out


def held_out_task(spec: str, explicit: bool):
    """The test split of a task mixture (synthetic tasks: the evals' test seed). `explicit`: the
    spec names held-out files already (RL's --eval-task); otherwise a training file given as a
    file, not a directory, is its own test set, which is said."""
    from ..tasks.mixture import Mixture, build_task, parse_mixture
    parts = []
    for name, path, _ in parse_mixture(spec):
        if not explicit and path and not Path(path).is_dir():
            log(f"rl: held-out eval of {name} reads {path}, the training file itself (give --eval-task "
                f"with its test file, or the task's directory, for a real held-out split)")
        parts.append((build_task(name, path, split="test", seed=SYNTHETIC_TEST_SEED), 1.0))
    return Mixture(parts, seed=SYNTHETIC_TEST_SEED)


# ----------------------------------------------------------------------------- driver

def centered(accuracy: float, baseline: float) -> float:
    return (accuracy - baseline) / (1.0 - baseline)


def evaluate_task(run, name: str, task, limit: int | None = None, num_samples: int = 1,
                  max_tokens: int | None = None, temperature: float | None = None, top_k: int | None = 50,
                  seed: int = 0, batch_tokens: int = 8192, save: bool = True) -> dict:
    """Evaluate a loaded run (open_for_inference) on one chat eval; returns the summary and, with
    `save`, writes it and the per-example rows into `<run>/evals/`."""
    from ..engine import Engine
    spec, kind = EVALS[name].eval, EVALS[name].kind
    n = min(len(task), limit) if limit else len(task)
    if temperature is None:
        temperature = 0.0 if num_samples == 1 else 0.8
    t0 = time.perf_counter()
    progress = Progress(n, desc=f"eval {name}", every=max(1, n // 20))
    rows, correct, sample_correct = [], 0, 0.0
    if kind == "categorical":
        results = categorical_eval(run.model, run.tokenizer, task, list(range(n)), run.device, run.dtype, batch_tokens)
        for k, (i, pred, scores) in enumerate(results, 1):
            ok = pred == task[i]["answer"]
            correct += ok
            rows.append({"index": i, "prediction": pred, "answer": task[i]["answer"], "correct": ok,
                         "scores": [round(s, 4) for s in scores]})
            progress.update(k, f"| accuracy {correct / k:.3f}")
        sample_correct = correct
    else:
        engine = Engine(run.model, run.tokenizer)
        with autocast(run.device, run.decode_dtype):
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
    result = {"task": name, "kind": kind, "n": n, "of": len(task), "num_samples": num_samples,
              "accuracy": acc, "pass@1": sample_correct / max(n, 1), "baseline": spec.baseline,
              "centered": centered(acc, spec.baseline), "seconds": round(time.perf_counter() - t0, 2),
              "stage": run.meta.get("stage")}
    if save:
        save_eval(run.path, eval_name(run, name), result, rows)
    log(f"eval {name}: {'accuracy' if num_samples == 1 else f'pass@{num_samples}'} {acc:.4f} on {n} of "
        f"{len(task)} examples ({result['seconds']:.1f} s)")
    return result


def chatcore(results: dict[str, dict], tasks: list[str] = CHATCORE) -> dict:
    """ChatCORE over the tasks present, naming those missing (never silently dropped)."""
    have = [t for t in tasks if t in results]
    missing = [t for t in tasks if t not in results]
    value = sum(results[t]["centered"] for t in have) / len(have) if have else None
    return {"chatcore": value, "tasks": have, "missing": missing}


@dataclass
class ChatEvalConfig:
    model: LoadOptions = setting(help="the chat model to evaluate")
    data: str | None = setting(None, "the task's files, or a data dir laid out like ../shared/data (default: "
                                     "$PICOCHAT_DATA, else ~/.cache/picochat/data)")
    split: str | None = setting(None, "dataset split (default: test)")
    limit: int | None = setting(None, "the first N examples only (default: all)", low=1)
    num_samples: int = setting(1, "k samples per question: pass@k (generative)", low=1)
    max_tokens: int | None = setting(None, "reply length cap (generative; default: per task)", low=1)
    temperature: float | None = setting(None, "sampling temperature (default: 0, greedy, for k=1, else 0.8)", low=0)
    top_k: int = setting(50, "sample from the k most likely tokens (0: from all)", low=0)
    seed: int = setting(0, "random seed of the samples")
    batch_tokens: int = setting(8192, "tokens per forward (categorical)", low=1)
    tasks: tuple[str, ...] = setting((), cli=False)  # which evals: the command's name decides (EVAL_GROUPS)


def run_chat_evals(cfg: ChatEvalConfig) -> dict:
    """`picochat eval arc|mmlu|gsm8k|humaneval|spelling|arithmetic|chat`. Every task's data is read
    before the first one runs, so a wrong path fails at once, not after an hour of evals. For `chat`
    (ChatCORE's tasks) a task whose files are not in the data dir is reported missing instead."""
    check(cfg)
    names = list(cfg.tasks)
    whole = names == CHATCORE
    root = data_dir(cfg.data)
    present = [n for n in names if not (whole and TASKS[n].dataset and not (root / LOCATIONS[TASKS[n].dataset]).exists())]
    if not present:
        raise PicochatError(f"eval chat: none of the tasks' files are under {root} (expected "
                            f"{', '.join(LOCATIONS[TASKS[n].dataset] for n in names if TASKS[n].dataset)}; "
                            f"`picochat data download chat` fetches them)")
    tasks = {name: build_eval_task(name, cfg.data, cfg.split) for name in present}
    run = open_for_inference(cfg.model)
    results = {name: evaluate_task(run, name, task, limit=cfg.limit, num_samples=cfg.num_samples,
                                   max_tokens=cfg.max_tokens, temperature=cfg.temperature, top_k=cfg.top_k or None,
                                   seed=cfg.seed, batch_tokens=cfg.batch_tokens)
               for name, task in tasks.items()}
    out = {"results": results}
    if whole:
        out.update(chatcore(results))
        out["nanochat"] = chatcore(results, NANOCHAT_CHATCORE)["chatcore"]
    return out


def format_chat_results(out: dict) -> str:
    """A markdown table of run_chat_evals' results, ChatCORE last (HumanEval's --canonical check:
    its counts, as JSON)."""
    if "passed" in out:
        return json.dumps(out)
    lines = ["| task | n | accuracy | centered | time |", "|---|---|---|---|---|"]
    for name, r in out["results"].items():
        metric = f"{r['accuracy']:.4f}" + (f" (pass@{r['num_samples']})" if r["num_samples"] > 1 else "")
        lines.append(f"| {name} | {r['n']} | {metric} | {r['centered']:+.4f} | {r['seconds']:.1f} s |")
    if "chatcore" in out:
        missing = f"; missing (no data): {', '.join(out['missing'])}" if out["missing"] else ""
        lines.append(f"\nChatCORE {out['chatcore']:.4f} over {len(out['tasks'])} of {len(CHATCORE)} "
                     f"tasks{missing}")
        if out.get("nanochat") is not None:
            lines.append(f"(over nanochat's five, without spelling: {out['nanochat']:.4f})")
    return "\n".join(lines)


@dataclass
class HumanEvalConfig(ChatEvalConfig):
    model: LoadOptions | None = setting(None, "the chat model to evaluate (not with --canonical)")
    canonical: bool = setting(False, "grade the reference solutions instead of a model (checks the sandbox)")
    tasks: tuple[str, ...] = setting(("humaneval",), cli=False)


def eval_humaneval(cfg: HumanEvalConfig) -> dict:
    """`picochat eval humaneval`: a model's pass@k, or with --canonical the reference solutions'."""
    if cfg.canonical:
        return humaneval_canonical(cfg.data, cfg.limit)
    if cfg.model is None:
        raise PicochatError("eval humaneval needs --load RUN (or --canonical)")
    return run_chat_evals(cfg)


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
