"""MMLU: 57 subjects of four-way multiple choice, as lettered multiple choice.

Records follow HF `cais/mmlu`: {"question", "subject", "choices": [4 strings], "answer": 0..3}.
Three layouts are read:
- files: .parquet / .jsonl / .json / .arrow with those fields (a directory is searched for files
  of the split, e.g. `all/test-00000-of-00001.parquet`);
- the HF save_to_disk layout: <root>/<subject>/<split>/data-00000-of-00001.arrow;
- the CSV re-export: <root>/<split>/<subject>_<split>.csv with question,choice0..3,answer.
"""

from __future__ import annotations

import csv
from pathlib import Path

from picochat.common import PicochatError
from picochat.tasks.base import (
    MultipleChoiceTask,
    check_fields,
    multiple_choice,
    read_records,
)

FIELDS = ("question", "choices", "answer")


def _read_csv(path: Path, split: str) -> list[dict]:
    subject = path.name.removesuffix(".csv").removesuffix(f"_{split}")
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise PicochatError(f"mmlu: cannot read {path}: {e}") from None
    check_fields(rows, ("question", "choice0", "choice1", "choice2", "choice3", "answer"), f"mmlu: {path}")
    return [{"question": r["question"], "subject": subject, "answer": int(r["answer"]),
             "choices": [r[f"choice{k}"] for k in range(4)]} for r in rows]


def mmlu_records(path: Path, split: str) -> list[dict]:
    if path.is_file():
        return _read_csv(path, split) if path.suffix == ".csv" else read_records(path, FIELDS, "mmlu")
    if not path.is_dir():
        raise PicochatError(f"mmlu: path not found: {path}")
    if (path / "all").is_dir():  # HF cais/mmlu: `all` repeats every subject's rows
        path = path / "all"
    files = sorted(path.glob(f"**/{split}/*.arrow")) or sorted(path.glob("*.arrow") if path.name == split else [])
    if not files:
        files = sorted(path.glob(f"**/*_{split}.csv"))
    if not files:
        files = sorted(p for p in path.rglob(f"{split}[-.]*") if p.suffix in (".parquet", ".jsonl", ".json"))
    if not files:
        raise PicochatError(f"mmlu: no {split!r} files under {path} (expected <subject>/{split}/*.arrow, "
                            f"{split}/<subject>_{split}.csv or {split}-*.parquet)")
    records = []
    for file in files:
        records += _read_csv(file, split) if file.suffix == ".csv" else read_records(file, FIELDS, "mmlu")
    return records


class MMLU(MultipleChoiceTask):
    name = "mmlu"

    def __init__(self, path: str | Path, split: str = "test", subject: str | list[str] | None = None):
        # MMLU's training split is auxiliary_train (100K questions from other exams), where it is there
        if split == "train":
            split = "auxiliary_train"
        records = mmlu_records(Path(path), split)
        if subject is not None:
            wanted = {subject} if isinstance(subject, str) else set(subject)
            records = [r for r in records if r.get("subject") in wanted]
            if not records:
                raise PicochatError(f"mmlu: no {split!r} rows for subject(s) {', '.join(sorted(wanted))} in {path}")
        examples = []
        for i, r in enumerate(records):
            if not 0 <= int(r["answer"]) < len(r["choices"]):
                raise PicochatError(f"mmlu: {path}: row {i}: answer {r['answer']} out of range")
            examples.append(multiple_choice(r["question"], list(r["choices"]), int(r["answer"]),
                                            subject=r.get("subject", "")))
        super().__init__(examples)
