"""GSM8K: grade-school math word problems with calculator annotations.

Each reference solution marks its arithmetic as <<48/2=24>>. Those become tool calls: a python
part (`48/2`) and its python_output part (`24`), so the model learns to call the calculator and
read its answer instead of doing arithmetic in its head. The last line is "#### <answer>", and
grading compares the number after "####" in the model's reply with the reference.
"""

from __future__ import annotations

import re
from pathlib import Path

from picochat.common import PicochatError
from picochat.tasks.base import ListTask, parse_number, read_records, read_split, same_number

_ANNOTATION = re.compile(r"<<([^<>]*)>>")
_FINAL = re.compile(r"####\s*(-?\$?[\d,]*\.?\d+)")


def solution_parts(answer: str) -> list[dict]:
    """A GSM8K answer -> assistant parts: text, then (python, python_output) per annotation."""
    parts: list[dict] = []
    pos = 0
    for m in _ANNOTATION.finditer(answer):
        if m.start() > pos:
            parts.append({"type": "text", "text": answer[pos:m.start()]})
        expr, _, result = m.group(1).rpartition("=")
        parts.append({"type": "python", "text": expr})
        parts.append({"type": "python_output", "text": result})
        pos = m.end()
    if pos < len(answer):
        parts.append({"type": "text", "text": answer[pos:]})
    return parts


def final_answer(text: str) -> float | None:
    """The number after the last "####" ("#### 1,200" -> 1200.0), or None."""
    found = _FINAL.findall(text)
    return parse_number(found[-1]) if found else None


class GSM8K(ListTask):
    name = "gsm8k"
    kind = "generative"

    def __init__(self, path: str | Path, split: str = "train"):
        path = Path(path)
        fields = ("question", "answer")
        if path.is_dir():  # the repo's <dir>/{train,test}.jsonl, or the Hub export's parquet
            records = read_split(path, split, (f"{split}.jsonl",), fields, "gsm8k")
        else:
            records = read_records(path, fields, what="gsm8k")
        examples = []
        for i, rec in enumerate(records):
            ref = final_answer(rec["answer"])
            if ref is None:
                raise PicochatError(f"gsm8k: {path}: record {i} has no '#### <number>' final answer")
            examples.append({
                "messages": [
                    {"role": "user", "content": rec["question"]},
                    {"role": "assistant", "content": solution_parts(rec["answer"])},
                ],
                "answer": ref,
            })
        super().__init__(examples)

    def reward(self, conversation: dict, completion: str) -> float:
        return float(same_number(final_answer(completion), conversation["answer"]))
