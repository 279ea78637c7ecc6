"""HumanEval: 164 Python functions to complete, graded by running their unit tests.

The user is shown the function's signature and docstring; the assistant's reference is the
canonical body. Grading runs model-written code, so it happens in the evals' sandbox (a separate,
jailed process, see picochat.evals.sandbox): program() assembles prompt + completion + the task's
tests + check(entry_point), and grade_many() (or reward()) runs it there.
"""

from __future__ import annotations

import dataclasses
import re
import secrets
from pathlib import Path

from picochat.evals.sandbox import SandboxResult, run_many
from picochat.tasks.base import ListTask, read_records, read_split

INSTRUCTION = "Complete the following Python function. Reply with the rest of its body only.\n\n"
_FENCE = re.compile(r"```(?:python|py)?\n(.*?)(?:```|$)", re.DOTALL)


def extract_code(completion: str) -> str:
    """The code in a reply: the first ``` fenced block if there is one, else the reply itself."""
    m = _FENCE.search(completion)
    return m.group(1) if m else completion


def program(example: dict, completion: str) -> str:
    """The program the sandbox runs: it exits cleanly iff the completion passes the tests.

    A reply may be the body alone (as the canonical solution is) or the whole function (usually
    in a fenced block): then the prompt's own `def` of it is dropped, and its imports and helper
    functions, which the reply may rely on, are kept."""
    code, prompt, entry = extract_code(completion), example["prompt"], example["entry_point"]
    own_def = re.compile(rf"^def {re.escape(entry)}\s*\(", re.MULTILINE)
    if own_def.search(code) and (m := own_def.search(prompt)):
        prompt = prompt[: m.start()]
    return f"{prompt}{code}\n\n{example['test']}\n\ncheck({entry})\n"


def canonical_completion(example: dict) -> str:
    """The dataset's reference answer (the function body), which passes its tests."""
    return example["messages"][-1]["content"]


def grade_many(pairs, workers: int | None = None, timeout: float = 10.0) -> list[SandboxResult]:
    """Run each (example, completion) program in the sandbox, `workers` at a time, in order."""
    pairs = list(pairs)
    # The program ends by printing a fresh token: exiting 0 before the tests have run (exit(),
    # sys.exit(0) in the body) must not count as passing.
    tokens = [secrets.token_hex(8) for _ in pairs]
    sources = [f"{program(ex, c)}print({t!r})\n" for (ex, c), t in zip(pairs, tokens)]
    results = run_many(sources, workers=workers, timeout=timeout)
    return [r if not r.passed or r.stdout.rstrip().endswith(t)
            else dataclasses.replace(r, passed=False, status="failed")
            for r, t in zip(results, tokens)]


class HumanEval(ListTask):
    name = "humaneval"
    kind = "generative"

    def __init__(self, path: str | Path):
        path = Path(path)
        fields = ("task_id", "prompt", "canonical_solution", "test", "entry_point")
        # the repo's HumanEval.jsonl.gz, or the Hub export's test-*.parquet
        records = read_split(path, "test", ("HumanEval.jsonl.gz",), fields, "humaneval") if path.is_dir() \
            else read_records(path, fields, what="humaneval")
        examples = [{
            "messages": [
                {"role": "user", "content": INSTRUCTION + rec["prompt"]},
                {"role": "assistant", "content": rec["canonical_solution"]},
            ],
            "task_id": rec["task_id"],
            "prompt": rec["prompt"],
            "test": rec["test"],
            "entry_point": rec["entry_point"],
        } for rec in records]
        super().__init__(examples)

    def reward(self, conversation: dict, completion: str) -> float:
        """1.0 iff the completion passes the example's tests, run in the sandbox."""
        return float(grade_many([(conversation, completion)], workers=1)[0].passed)
