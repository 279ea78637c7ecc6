"""The CORE metric (DCLM, arXiv:2406.11794) as nanochat computes it for base models.

A bundle (nanochat's eval_bundle.zip) holds core.yaml (22 in-context-learning tasks: label,
dataset_uri, num_fewshot, icl_task_type, continuation_delimiter), eval_meta_data.csv (each task's
random baseline, in percent) and eval_data/<dataset_uri> (the rows). Three task types:

  multiple_choice {query, choices, gold}: one sequence per choice, sharing the context; the choice
      whose own tokens get the lowest mean loss is the prediction.
  schema {context_options, continuation, gold}: one sequence per context option, sharing the
      continuation; the option under which the continuation gets the lowest mean loss wins.
  language_modeling {context, continuation}: right iff the argmax at every continuation position
      is the continuation's token (greedy decoding would produce it exactly).

Each accuracy is centered, (acc - baseline) / (1 - baseline), so chance scores 0 on every task,
and CORE is their mean. Prompts, row order and few-shot draws follow nanochat exactly, so a full
run scores the prompts nanochat scores (except that prompts longer than the model's context lose
their start). Tasks whose data file is absent are reported as missing, never dropped silently:
CORE over 18 of 22 tasks is not CORE over 22.
"""

from __future__ import annotations

import csv
import json
import os
import random
import shutil
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..common import PicochatError, Progress, autocast, fsync, log, set_threads, write_atomic
from ..data.datasets import DATASETS, dataset_path
from ..inference import LoadOptions, open_for_inference
from ..settings import check, setting
from .results import eval_name, save_eval

FIELDS = {"multiple_choice": ("query", "choices", "gold"),
          "schema": ("context_options", "continuation", "gold"),
          "language_modeling": ("context", "continuation")}
ORDER_SEED, SHOTS_SEED = 1337, 1234  # nanochat's: rows shuffled once per task, shots drawn per row


# ----------------------------------------------------------------------------- the bundle

def resolve_bundle(bundle: str | None = None, cache_dir: str | None = None, url: str | None = None) -> Path:
    """A local bundle directory, or (bundle None or an http(s) URL) the zip downloaded into the
    cache (default: the data dir's core_eval_bundle, where `picochat data download core` puts it).

    The zip is extracted into a temporary directory next to the cache and renamed into place, so
    the cache path either holds a whole bundle or does not exist: a killed run never leaves half."""
    bundle = None if bundle is None else str(bundle)
    if bundle and not bundle.startswith(("http://", "https://")):
        path = Path(bundle).expanduser()
        if (path / "core_eval_bundle" / "core.yaml").is_file():  # a data root laid out like ../shared/data
            path = path / "core_eval_bundle"
        if not (path / "core.yaml").is_file():
            raise PicochatError(f"CORE bundle {path} has no core.yaml (expected nanochat's eval_bundle "
                                "layout: core.yaml, eval_meta_data.csv, eval_data/)")
        return path
    from ..data.urls import download_file  # resumable, retried, atomic; 404 is a PicochatError

    url = bundle or url or DATASETS["core"].source.resolved()
    dest = Path(cache_dir).expanduser() if cache_dir else dataset_path("core")
    if (dest / "core.yaml").is_file():
        return dest
    if dest.exists():
        raise PicochatError(f"CORE bundle cache {dest} exists but has no core.yaml: remove it or pick another")
    dest.parent.mkdir(parents=True, exist_ok=True)
    log(f"core: downloading {url}")
    zip_path = download_file(url, dest.with_name(dest.name + ".zip"))
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        try:
            with zipfile.ZipFile(zip_path) as zf:
                zf.extractall(tmp)  # zipfile drops absolute and ".." parts of member names
        except zipfile.BadZipFile:
            zip_path.unlink()  # e.g. an HTML error page served with status 200: fetch again next time
            raise PicochatError(f"CORE bundle download {url} is not a zip file") from None
        found = sorted((p.parent for p in tmp.rglob("core.yaml")), key=lambda p: len(p.parts))
        if not found:
            raise PicochatError(f"CORE bundle download {url} has no core.yaml")
        os.replace(found[0], dest)  # the zip holds eval_bundle/ at its top
        fsync(dest.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    zip_path.unlink(missing_ok=True)
    return dest


def load_tasks(bundle: Path, labels: list[str] | str | None = None) -> list[dict]:
    """core.yaml's entries (all, or those labelled), each with its baseline as a fraction."""
    import yaml

    bundle = Path(bundle)
    try:
        entries = yaml.safe_load((bundle / "core.yaml").read_text(encoding="utf-8"))["icl_tasks"]
        with open(bundle / "eval_meta_data.csv", newline="", encoding="utf-8") as f:
            baselines = {r["Eval Task"]: float(r["Random baseline"]) / 100 for r in csv.DictReader(f)}
    except (OSError, yaml.YAMLError, KeyError, TypeError, ValueError) as e:
        raise PicochatError(f"CORE bundle {bundle}: cannot read core.yaml / eval_meta_data.csv ({e!r})") from None
    tasks = []
    for e in entries:
        try:
            shots = e["num_fewshot"]
            task = {"label": e["label"], "type": e["icl_task_type"], "path": bundle / "eval_data" / e["dataset_uri"],
                    "shots": int(shots[0] if isinstance(shots, list) else shots),
                    "delimiter": e.get("continuation_delimiter", " ")}
        except (KeyError, TypeError, IndexError, ValueError) as err:
            raise PicochatError(f"CORE bundle {bundle}: core.yaml entry {e!r} is incomplete ({err!r})") from None
        if task["type"] not in FIELDS:
            raise PicochatError(f"CORE task {task['label']}: unsupported icl_task_type {task['type']!r}")
        if task["label"] not in baselines:
            raise PicochatError(f"CORE task {task['label']}: no random baseline in {bundle / 'eval_meta_data.csv'}")
        tasks.append({**task, "baseline": baselines[task["label"]]})
    if labels:  # None or empty: every task
        labels = labels.split(",") if isinstance(labels, str) else list(labels)
        unknown = [l for l in labels if l not in {t["label"] for t in tasks}]
        if unknown:
            raise PicochatError(f"unknown CORE task(s) {', '.join(unknown)} "
                                f"(the bundle has: {', '.join(t['label'] for t in tasks)})")
        tasks = [t for t in tasks if t["label"] in labels]
    return tasks


# ----------------------------------------------------------------------------- prompts and tokens

def fewshot_indices(idx: int, n: int, k: int) -> list[int]:
    """nanochat's draw, random.Random(1234 + idx).sample(<the other n-1 rows>, k), without building
    that list per row (bigbench_qa_wikidata has 20k rows): sample() picks population positions
    from the population's length alone, so sampling range(n - 1) and stepping over idx is the same."""
    if k <= 0 or n <= 1:
        return []
    return [j + (j >= idx) for j in random.Random(SHOTS_SEED + idx).sample(range(n - 1), min(k, n - 1))]


def render(kind: str, item: dict, shots: list[dict], delim: str) -> list[str]:
    """nanochat's prompts: solved shots, each followed by a blank line, then the item. Multiple
    choice and schema give one prompt per option; language modeling gives [bare, with answer]."""
    if kind == "multiple_choice":
        prefix = "".join(f"{s['query']}{delim}{s['choices'][s['gold']]}\n\n" for s in shots)
        return [f"{prefix}{item['query']}{delim}{c}" for c in item["choices"]]
    if kind == "schema":
        prefix = "".join(f"{s['context_options'][s['gold']]}{delim}{s['continuation']}\n\n" for s in shots)
        return [f"{prefix}{c}{delim}{item['continuation']}" for c in item["context_options"]]
    # some contexts end in stray whitespace: trimmed, and the bare prompt stripped of the trailing
    # delimiter space, so that its tokens are a clean prefix of the full prompt's
    prefix = "".join(f"{s['context'].strip()}{delim}{s['continuation']}\n\n" for s in shots)
    full = f"{prefix}{item['context'].strip()}{delim}"
    return [full.strip(), full + item["continuation"]]


def common_length(seqs: list[list[int]], from_end: bool = False) -> int:
    """Length of the prefix (or suffix) all sequences share. In numpy: 10-shot prompts run to
    thousands of tokens, and a Python loop over them was most of the time of a small model."""
    n = min(len(s) for s in seqs)
    a = np.array([s[len(s) - n:] if from_end else s[:n] for s in seqs])
    same = (a == a[0]).all(axis=0)
    if from_end:
        same = same[::-1]
    return n if same.all() else int(same.argmin())


def sequences(tokenizer, kind: str, prompts: list[str], max_len: int) -> list[tuple[list[int], int, int]]:
    """(tokens, start, end) per sequence, tokens[start:end] the scored ones, BOS first.

    The scored tokens are found in token space (where the options differ, or what they share at
    the end) rather than by tokenizing the pieces apart, because BPE can merge across the seam.
    At least one token is always scored. A sequence longer than the model's context loses its
    start; if even the scored span does not fit, its first tokens go too."""
    toks = [[tokenizer.bos_id] + tokenizer.encode(p) for p in prompts]
    shortest = min(len(t) for t in toks) - 1
    if kind == "multiple_choice":
        start = min(common_length(toks), shortest)
        spans = [(start, len(t)) for t in toks]
    elif kind == "schema":
        tail = min(common_length(toks, from_end=True), shortest)
        spans = [(len(t) - tail, len(t)) for t in toks]
    else:  # the answer is what the full prompt has beyond the bare one
        full = toks[1]
        toks, spans = [full], [(min(common_length(toks), len(full) - 1), len(full))]
    out = []
    for t, (s, e) in zip(toks, spans):
        cut = max(0, len(t) - max_len)
        out.append((t[cut:], max(s - cut, 1), e - cut))
    return out


# ----------------------------------------------------------------------------- scoring

@torch.no_grad()
def score(model, seqs: list[tuple[list[int], int, int]], device, dtype, pad_id: int,
          batch_tokens: int = 8192) -> list[tuple[float, bool, list[int]]]:
    """Per sequence: (mean loss over its scored tokens, argmax right at all of them, argmax tokens).

    Longest first, packed into right-padded batches of about batch_tokens tokens: one forward
    covers many examples and neighbours in length waste little padding. Padding comes after every
    scored position of its row and the model is causal, so it changes nothing."""
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i][0]))
    out: list = [None] * len(seqs)
    i = 0
    while i < len(order):
        width = len(seqs[order[i]][0])
        rows = order[i:i + max(1, batch_tokens // width)]
        i += len(rows)
        x = torch.full((len(rows), width), pad_id, dtype=torch.long)
        y = torch.full_like(x, -1)  # y[r, p]: the token position p must predict, where scored
        for r, k in enumerate(rows):
            t, s, e = seqs[k]
            x[r, :len(t)] = torch.tensor(t)
            y[r, s - 1:e - 1] = torch.tensor(t[s:e])
        x, y = x.to(device), y.to(device)
        mask = y >= 0
        with autocast(device, dtype):
            logits = model(x, where=mask).float()
        target = y[mask]
        losses = F.cross_entropy(logits, target, reduction="none")
        guess = logits.argmax(-1)
        counts = mask.sum(1).tolist()
        for k, loss, g, t in zip(rows, losses.split(counts), guess.split(counts), target.split(counts)):
            out[k] = (loss.mean().item(), bool((g == t).all()), g.tolist())
    return out


# ----------------------------------------------------------------------------- tasks and CORE

def evaluate_task(model, tokenizer, task: dict, device, dtype, limit: int | None = None,
                  batch_tokens: int = 8192, chunk: int = 256) -> list[dict]:
    """One row per example: task, index (its row in the file), prediction, gold, correct (and the
    options' mean losses for multiple choice and schema). Examples go `chunk` at a time, so that
    the token lists of a 10k-row task never all sit in memory at once."""
    from ..tasks.base import read_records

    kind, label = task["type"], task["label"]
    data = read_records(task["path"], FIELDS[kind], what=f"CORE task {label}")
    # nanochat's order: the files are sorted (by category, or in pairs), so a --limit prefix of
    # the file would not be a fair sample. Shots come from every row, so a limited run scores its
    # examples exactly as the full run does.
    order = list(range(len(data)))
    random.Random(ORDER_SEED).shuffle(order)
    n = min(len(order), limit or len(order))
    chunks = range(0, n, chunk)
    progress = Progress(len(chunks), desc=f"core {label}", every=max(1, len(chunks) // 10))
    rows = []
    for c, first in enumerate(chunks):
        examples = range(first, min(first + chunk, n))
        seqs, owner = [], []
        for p in examples:
            try:
                shots = [data[order[j]] for j in fewshot_indices(p, len(order), task["shots"])]
                prompts = render(kind, data[order[p]], shots, task["delimiter"])
            except (KeyError, IndexError, TypeError, AttributeError) as e:
                raise PicochatError(f"CORE task {label}: row {order[p]} of {task['path']} (or one of its "
                                    f"shots) is malformed ({e!r})") from None
            if not prompts:
                raise PicochatError(f"CORE task {label}: row {order[p]} of {task['path']} has no options")
            for s in sequences(tokenizer, kind, prompts, model.config.sequence_len):
                seqs.append(s)
                owner.append(p)
        per_example: dict[int, list] = {p: [] for p in examples}
        for p, sc in zip(owner, score(model, seqs, device, dtype, tokenizer.bos_id, batch_tokens)):
            per_example[p].append(sc)
        for p, mine in per_example.items():
            item = data[order[p]]
            if kind == "language_modeling":
                _, exact, guess = mine[0]
                row = {"prediction": tokenizer.decode(guess), "gold": item["continuation"], "correct": exact}
            else:
                losses = [sc[0] for sc in mine]
                pred = losses.index(min(losses))
                row = {"prediction": pred, "gold": item["gold"], "correct": pred == item["gold"], "losses": losses}
            rows.append({"task": label, "index": order[p], **row})
        progress.update(c + 1, f"| {len(rows)} examples | accuracy {sum(r['correct'] for r in rows) / len(rows):.3f}")
    progress.close()
    return rows


def score_core(model, tokenizer, bundle: str | Path, device, dtype, limit: int | None = None,
               tasks: list[str] | None = None, batch_tokens: int = 8192) -> tuple[dict, list[dict]]:
    """CORE over the bundle's tasks (or `tasks`), at most `limit` examples each: the summary, and
    one row per example."""
    if limit is not None and limit < 1:
        raise PicochatError(f"limit must be a positive number of examples per task, got {limit}")
    set_threads()
    selected = load_tasks(Path(bundle), tasks)
    missing = [t["label"] for t in selected if not t["path"].is_file()]
    present = [t for t in selected if t["path"].is_file()]
    if missing:
        log(f"core: no data file for {len(missing)} of {len(selected)} tasks: {', '.join(missing)}")
    if not present:
        raise PicochatError(f"CORE bundle {bundle}: none of the selected tasks has its data file")
    results, all_rows = {}, []
    for task in present:
        t0 = time.perf_counter()
        rows = evaluate_task(model, tokenizer, task, device, dtype, limit, batch_tokens)
        acc, b = sum(r["correct"] for r in rows) / len(rows), task["baseline"]
        r = results[task["label"]] = {"accuracy": acc, "centered": (acc - b) / (1 - b), "n": len(rows),
                                      "baseline": b, "type": task["type"], "shots": task["shots"],
                                      "seconds": time.perf_counter() - t0}
        all_rows += rows
        log(f"core {task['label']}: accuracy {acc:.4f} | centered {r['centered']:.4f} | n {len(rows)} "
            f"| {r['seconds']:.1f}s")
    result = {"core": sum(r["centered"] for r in results.values()) / len(results), "tasks": results,
              "missing": missing, "evaluated": len(results), "total": len(selected)}
    log(summary(result))
    return result, all_rows


def evaluate_core(model, tokenizer, bundle: str | Path, device, dtype, limit: int | None = None,
                  tasks: list[str] | None = None, results_path: str | Path | None = None,
                  batch_tokens: int = 8192) -> dict:
    """score_core's summary; its rows go to `results_path` (JSONL) if given."""
    result, rows = score_core(model, tokenizer, bundle, device, dtype, limit, tasks, batch_tokens)
    if results_path is not None:
        write_atomic(results_path, "".join(json.dumps(r) + "\n" for r in rows))
    return result


def summary(result: dict) -> str:
    line = f"CORE {result['core']:.4f} over {result['evaluated']} of {result['total']} tasks"
    return line + (f"; missing: {', '.join(result['missing'])}" if result["missing"] else "")


def format_core_table(result: dict) -> str:
    """Markdown: one row per evaluated task, then the CORE line naming the missing tasks."""
    lines = ["| task | type | shots | n | accuracy | centered | baseline |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for label, r in result["tasks"].items():
        lines.append(f"| {label} | {r['type']} | {r.get('shots', '')} | {r['n']} | {r['accuracy']:.4f} "
                     f"| {r['centered']:.4f} | {r['baseline']:.3f} |")
    return "\n".join(lines) + "\n\n" + summary(result) + "\n"


def run_core(run, bundle: str | Path, limit: int | None = None, tasks: list[str] | None = None,
             results: str | Path | None = None) -> dict:
    """CORE of a loaded run; the summary goes to <run>/evals/core.json for the report card, the
    per-example rows to `results` (default: <run>/evals/core.jsonl)."""
    result, rows = score_core(run.model, run.tokenizer, bundle, run.device, run.dtype, limit=limit, tasks=tasks)
    if results:
        write_atomic(results, "".join(json.dumps(r) + "\n" for r in rows))
    n = sum(r["n"] for r in result["tasks"].values())
    save_eval(run.path, eval_name(run, "core"), {**result, "limit": limit, "n": n}, None if results else rows)
    return result


@dataclass
class CoreConfig:
    model: LoadOptions = setting(help="the base model to evaluate")
    data: str | None = setting(None, "the CORE eval bundle: a directory, or a URL of its zip (default: download "
                                     "nanochat's eval_bundle.zip once, then use the cache)")
    limit: int | None = setting(None, "at most N examples per task (default: all)", low=1)
    tasks: str | None = setting(None, "comma-separated task labels (default: all of core.yaml)")
    results: str | None = setting(None, "per-example JSONL (default: <load>/evals/core.jsonl)")


def eval_core(cfg: CoreConfig) -> dict:
    """`picochat eval core`: CORE of a run dir's model."""
    check(cfg)
    path = resolve_bundle(cfg.data)
    tasks = [t.strip() for t in cfg.tasks.split(",") if t.strip()] if cfg.tasks else None
    load_tasks(path, tasks)  # a bad --tasks fails before the model loads
    return run_core(open_for_inference(cfg.model), path, cfg.limit, tasks, cfg.results)
