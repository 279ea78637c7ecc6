"""HumanEval: 164 Python functions to complete, graded by running their unit tests.

The user is shown the function's signature and docstring; the assistant's reference is the
canonical body. Grading means running model-written code, which belongs in the evals' sandbox
(a separate process with limits), so this module only assembles the program to run: prompt +
completion + the task's tests + check(entry_point).
"""

from __future__ import annotations

import re
from pathlib import Path

from picochat.tasks.base import ListTask, read_records

INSTRUCTION = "Complete the following Python function. Reply with the rest of its body only.\n\n"
_FENCE = re.compile(r"```(?:python|py)?\n(.*?)(?:```|$)", re.DOTALL)


def extract_code(completion: str) -> str:
    """The code in a reply: the first ``` fenced block if there is one, else the reply itself."""
    m = _FENCE.search(completion)
    return m.group(1) if m else completion


def program(example: dict, completion: str) -> str:
    """The program the sandbox runs: it exits cleanly iff the completion passes the tests."""
    code = extract_code(completion)
    return f"{example['prompt']}{code}\n\n{example['test']}\n\ncheck({example['entry_point']})\n"


class HumanEval(ListTask):
    name = "humaneval"
    kind = "generative"

    def __init__(self, path: str | Path):
        path = Path(path)
        if path.is_dir():
            path = path / "HumanEval.jsonl.gz"
        fields = ("task_id", "prompt", "canonical_solution", "test", "entry_point")
        examples = [{
            "messages": [
                {"role": "user", "content": INSTRUCTION + rec["prompt"]},
                {"role": "assistant", "content": rec["canonical_solution"]},
            ],
            "task_id": rec["task_id"],
            "prompt": rec["prompt"],
            "test": rec["test"],
            "entry_point": rec["entry_point"],
        } for rec in read_records(path, fields, what="humaneval")]
        super().__init__(examples)

    def reward(self, conversation: dict, completion: str) -> float:
        raise NotImplementedError("humaneval is graded by running program(example, completion) in "
                                  "the evals' code sandbox, not in-process")
