"""Task mixtures: `--data "a.jsonl:1.0,b.jsonl:0.5"` or `gsm8k:../data/train.jsonl:2,arithmetic::1`.

Each comma-separated item is `task[:path][:weight]` or `path[:weight]`; a bare path's task is
inferred from its first record (`messages`/`conversations` -> chat, GSM8K/ARC/MMLU/HumanEval/
identity fields -> that task). Paths may not contain ':' or ','.

A weight sets how many of a task's examples one epoch of the mixture holds: 2 = each twice,
0.5 = a seeded half (without replacement), =10000 = that many (a seeded sample, or repeats). The
epoch is then shuffled with the same seed, so a spec and a seed always give the same sequence of
conversations. A task whose dataset is in the data dir ($PICOCHAT_DATA, or ~/.cache/picochat/data)
needs no path: `smoltalk::=10000,gsm8k::2`.
"""

from __future__ import annotations

import math
import random
from pathlib import Path

from picochat.common import PicochatError
from picochat.data.datasets import dataset_path
from picochat.tasks.base import Task, read_records
from picochat.tasks.registry import TASKS, make_task

def build_task(name: str, path: str | Path | None = None, split: str = "train", seed: int = 0,
               **kwargs) -> Task:
    """The task called `name` (registry.TASKS), reading `path` (a file, or a directory in the
    dataset's layout). kwargs go to the task (size/digits for synthetic tasks, subject for MMLU)."""
    if name not in TASKS:
        raise PicochatError(f"unknown task {name!r} (known: {', '.join(TASKS)})")
    if TASKS[name].needs_path and not path:
        raise PicochatError(f"task {name!r} needs a path (write it as {name}:PATH[:WEIGHT])")
    if path and not Path(path).exists():
        raise PicochatError(f"{name}: path not found: {path}")
    return make_task(name, path or None, split=split, seed=seed, **kwargs)


def infer_task(path: str | Path) -> str:
    """Which task reads this file, judged by its first record's fields."""
    path = Path(path)
    if path.is_file() and path.suffix == ".txt":
        return "spelling"  # a word list
    rec = read_records(path, what="mixture")[0]
    if isinstance(rec, list):
        return "identity"
    keys = set(rec) if isinstance(rec, dict) else set()
    if keys & {"messages", "conversations"}:
        return "chat"
    if {"prompt", "canonical_solution", "entry_point"} <= keys:
        return "humaneval"
    if {"question", "choices", "answerKey"} <= keys:
        return "arc"
    if {"question", "choices", "answer"} <= keys:
        return "mmlu"
    if {"question", "answer"} <= keys:
        return "gsm8k"
    if {"user", "assistant"} <= keys:
        return "identity"
    raise PicochatError(f"cannot tell which task reads {path} (first record has: {', '.join(map(str, keys))}); "
                        f"write it as TASK:{path}")


class Examples(int):
    """A weight given as a number of examples (=N), not as a multiple of the task."""


def _weight(text: str, item: str) -> float:
    if text.startswith("=") and text[1:].isdigit() and int(text[1:]) > 0:
        return Examples(text[1:])
    try:
        w = float(text)
    except ValueError:
        w = float("nan")
    if not (math.isfinite(w) and w > 0):
        raise PicochatError(f"mixture item {item!r}: weight {text!r} must be a positive number, or =N examples")
    return w


def _is_number(text: str) -> bool:
    if text.startswith("=") and text[1:].isdigit():
        return True
    try:
        float(text)
        return True
    except ValueError:
        return False


def parse_mixture(spec: str) -> list[tuple[str, str | None, float]]:
    """"gsm8k:train.jsonl:2,arithmetic::1,chat.jsonl:0.5" -> [(task, path or None, weight), ...]."""
    out = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            raise PicochatError(f"empty item in mixture {spec!r}")
        fields = item.split(":")
        if len(fields) > 3:
            raise PicochatError(f"mixture item {item!r}: expected TASK[:PATH][:WEIGHT] or PATH[:WEIGHT]")
        if fields[0] in TASKS:
            name, rest = fields[0], fields[1:]
            if len(rest) == 2:
                path, weight = rest[0], _weight(rest[1], item)
            elif len(rest) == 1 and _is_number(rest[0]) and not Path(rest[0]).exists():
                path, weight = "", _weight(rest[0], item)  # "arithmetic:2"
            else:
                path, weight = (rest[0] if rest else ""), 1.0
        else:
            if len(fields) == 3:
                raise PicochatError(f"mixture item {item!r}: unknown task {fields[0]!r} "
                                    f"(known: {', '.join(TASKS)})")
            path = fields[0]
            weight = _weight(fields[1], item) if len(fields) == 2 else 1.0
            if not Path(path).exists():
                raise PicochatError(f"mixture item {item!r}: {path!r} is neither a task "
                                    f"({', '.join(TASKS)}) nor an existing file")
            name = infer_task(path)
        if path and not Path(path).exists():
            raise PicochatError(f"mixture item {item!r}: path not found: {path}")
        if TASKS[name].needs_path and not path:
            dataset = TASKS[name].dataset
            where = dataset_path(dataset) if dataset else None
            if where is None or not where.exists():
                hint = f", or its dataset in the data dir ({where}: picochat data download {dataset})" if where else ""
                raise PicochatError(f"mixture item {item!r}: task {name!r} needs a path{hint}")
            path = str(where)
        out.append((name, path or None, weight))
    return out


class Mixture(Task):
    """Several tasks, weighted and shuffled into one deterministic epoch."""

    name = "mixture"

    def __init__(self, tasks: list[tuple[Task, float]], seed: int = 0):
        if not tasks:
            raise PicochatError("a mixture needs at least one task")
        rng = random.Random(seed)
        self.tasks = [t for t, _ in tasks]
        self.index: list[tuple[int, int]] = []  # (task number, example number)
        for k, (task, weight) in enumerate(tasks):
            n = len(task)
            if isinstance(weight, Examples):
                weight = weight / n
            whole, frac = int(weight), weight - int(weight)
            picks = list(range(n)) * whole + rng.sample(range(n), round(frac * n))
            self.index += [(k, i) for i in picks]
        if not self.index:
            raise PicochatError("the mixture's weights leave no examples")
        rng.shuffle(self.index)
        kinds = {t.kind for t in self.tasks}
        self.kind = kinds.pop() if len(kinds) == 1 else "mixed"

    def __len__(self) -> int:
        return len(self.index)

    def example(self, i: int) -> dict:
        k, j = self.index[i]
        # Tagged with its task so that reward() can hand the conversation to the right grader.
        return {**self.tasks[k][j], "task": k}

    def reward(self, conversation: dict, completion: str) -> float:
        return self.tasks[conversation["task"]].reward(conversation, completion)


def build_mixture(spec: str, split: str = "train", seed: int = 0) -> Mixture:
    """`--data` spec -> Mixture. Synthetic tasks get the same seed, so the whole mix is seeded."""
    parts = []
    for name, path, weight in parse_mixture(spec):
        parts.append((build_task(name, path, split=split, seed=seed), weight))
    return Mixture(parts, seed=seed)
