"""What every task shares: the Task interface, record reading, and lettered multiple choice.

A task is a sequence of conversations (dicts with "messages", see conversation.render_conversation)
that knows how to grade a model's answer. Tasks are "generative" (sample a completion, grade it
with reward()) or "categorical" (the answer is one letter from example["letters"], so an eval can
restrict the logits to those letters' tokens).
"""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

from picochat.common import PicochatError


class Task:
    """A sequence of conversations. Subclasses set name/kind and implement __len__ and example()."""

    name = "task"
    kind = "generative"  # or "categorical"

    def __len__(self) -> int:
        raise NotImplementedError

    def example(self, i: int) -> dict:
        """The i-th conversation, 0 <= i < len(self)."""
        raise NotImplementedError

    def __getitem__(self, i: int) -> dict:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"{self.name}: index {i} out of range ({n} examples)")
        return self.example(i % n)

    def __iter__(self):
        for i in range(len(self)):
            yield self.example(i)

    def reward(self, conversation: dict, completion: str) -> float:
        """1.0 if `completion` (the assistant's reply as text) answers `conversation` correctly."""
        raise NotImplementedError(f"the {self.name} task has no grader (it is for training only)")

    @classmethod
    def graded(cls) -> bool:
        """Whether it has a grader (reward): what RL and generative evals need."""
        return cls.reward is not Task.reward

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}: {len(self)} examples>"


class ListTask(Task):
    """A task whose conversations are built up front (cheap for datasets of a few 10k rows)."""

    def __init__(self, examples: list[dict]):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def example(self, i: int) -> dict:
        return self.examples[i]


# ----------------------------------------------------------------------------- reading records

RECORD_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".parquet", ".arrow")


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return next((s for s in RECORD_SUFFIXES if name.endswith(s)), path.suffix)


def read_records(path: str | Path, fields: tuple[str, ...] = (), what: str = "data") -> list[dict]:
    """All records of a .jsonl, .jsonl.gz, .json (an array), .parquet or .arrow (an HF
    save_to_disk IPC stream) file. The first records must have `fields`: a wrong file fails here,
    at load time, naming the file, instead of deep inside training."""
    path = Path(path)
    if not path.is_file():
        raise PicochatError(f"{what}: file not found: {path}")
    kind = _suffix(path)
    try:
        if kind in (".jsonl", ".jsonl.gz"):
            opener = gzip.open if kind == ".jsonl.gz" else open
            records = []
            with opener(path, "rt", encoding="utf-8") as f:
                for lineno, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            records.append(json.loads(line))
                        except json.JSONDecodeError as e:
                            raise PicochatError(f"{what}: {path}:{lineno}: invalid JSON ({e.msg})") from None
        elif kind == ".json":
            records = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(records, list):
                raise PicochatError(f"{what}: {path} must hold a JSON array of records")
        elif kind == ".parquet":
            import pyarrow.parquet as pq
            records = pq.read_table(path).to_pylist()
        elif kind == ".arrow":
            import pyarrow as pa
            with pa.OSFile(str(path), "rb") as f:
                records = pa.ipc.open_stream(f).read_all().to_pylist()
        else:
            raise PicochatError(f"{what}: unsupported file {path} (expected {', '.join(RECORD_SUFFIXES)})")
    except PicochatError:
        raise
    except (OSError, UnicodeDecodeError, ValueError, EOFError) as e:  # pyarrow errors are ValueErrors/OSErrors
        raise PicochatError(f"{what}: cannot read {path}: {e}") from None
    check_fields(records, fields, f"{what}: {path}")
    return records


def split_files(directory: Path, split: str, names: tuple[str, ...] = ()) -> list[Path]:
    """A split's files in a dataset directory: any of `names` (e.g. train.jsonl), else the parquet
    export's <split>-*.parquet (as `picochat data download` writes them), in order."""
    for name in names:
        if (directory / name).is_file():
            return [directory / name]
    return sorted(directory.glob(f"{split}-*.parquet"))


def read_split(directory: Path, split: str, names: tuple[str, ...], fields: tuple[str, ...], what: str) -> list[dict]:
    """All records of a split (split_files), or a clear error naming what was looked for."""
    files = split_files(directory, split, names)
    if not files:
        looked = " or ".join([*names, f"{split}-*.parquet"])
        raise PicochatError(f"{what}: no {split!r} split in {directory} (looked for {looked})")
    return [r for f in files for r in read_records(f, fields, what)]


def check_fields(records: list, fields: tuple[str, ...], where: str, sample: int = 5) -> None:
    if not records:
        raise PicochatError(f"{where} has no records")
    for i, rec in enumerate(records[:sample] if fields else []):
        if not isinstance(rec, dict):
            raise PicochatError(f"{where}: record {i} is not an object")
        missing = [f for f in fields if f not in rec]
        if missing:
            raise PicochatError(f"{where}: record {i} lacks the field(s) {', '.join(missing)} "
                                f"(it has {', '.join(rec) or 'none'})")


# ----------------------------------------------------------------------------- multiple choice

LETTERS = "ABCDEFGHIJ"


def multiple_choice(question: str, choices: list[str], answer: int, **meta) -> dict:
    """A lettered multiple-choice conversation: the user sees "A. ..." lines, the assistant
    answers with the letter alone, so its first token is the letter an eval scores."""
    letters = list(LETTERS[: len(choices)])
    lines = [question.strip(), ""] + [f"{l}. {c}" for l, c in zip(letters, choices)]
    lines += ["", "Answer with the letter of the correct choice."]
    return {
        "messages": [
            {"role": "user", "content": "\n".join(lines)},
            {"role": "assistant", "content": letters[answer]},
        ],
        "letters": letters,
        "answer": letters[answer],
        **meta,
    }


class MultipleChoiceTask(ListTask):
    kind = "categorical"

    def reward(self, conversation: dict, completion: str) -> float:
        """The first letter of the completion against the answer ("B", " B.", "(B)" all count)."""
        m = re.search(r"[A-Za-z]", completion)
        return float(m is not None and m.group(0).upper() == conversation["answer"])


# ----------------------------------------------------------------------------- grading numbers

_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def parse_number(text: str) -> float | None:
    """"1,234.50" / "$12" / "-3" -> float; None when it is not a number."""
    try:
        return float(text.replace(",", "").replace("$", "").rstrip("."))
    except ValueError:
        return None


def last_number(text: str) -> float | None:
    found = _NUMBER.findall(text)
    return parse_number(found[-1]) if found else None


def same_number(a: float | None, b: float | None) -> bool:
    return a is not None and b is not None and abs(a - b) <= 1e-6 * max(1.0, abs(b))


def example_rng(seed: int, i: int):
    """The RNG for example i of a synthetic task: each example depends only on (seed, i), so
    random access, any order and any subset give the same conversations."""
    import random
    return random.Random(seed * 1_000_003 + i)
