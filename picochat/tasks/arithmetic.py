"""Synthetic arithmetic that needs the calculator.

"What is 4821 * 377?" -> the assistant calls the tool (4821*377), reads its output, and answers
"The answer is 1817517." A small model cannot multiply 4-digit numbers in its head, so this task
measures whether SFT taught it to use the tool. Deterministic from (seed, index); `digits` is the
difficulty knob (operands have 1..digits digits).
"""

from __future__ import annotations

from picochat.common import PicochatError
from picochat.tasks.base import Task, example_rng, last_number, same_number
from picochat.tools import calculate

PROMPTS = ["What is {e}?", "Compute {e}.", "Calculate {e}", "What's {e}?", "{e} = ?"]
OPS = ("+", "-", "*", "/")


class Arithmetic(Task):
    name = "arithmetic"
    kind = "generative"

    def __init__(self, size: int = 10_000, seed: int = 0, digits: int = 4):
        if size < 1 or not 1 <= digits <= 12:
            raise PicochatError(f"arithmetic: need size >= 1 and 1 <= digits <= 12 (got {size}, {digits})")
        self.size, self.seed, self.digits = size, seed, digits

    def __len__(self) -> int:
        return self.size

    def _operand(self, rng) -> int:
        n = rng.randint(1, self.digits)
        return rng.randint(10 ** (n - 1) if n > 1 else 0, 10 ** n - 1)

    def example(self, i: int) -> dict:
        rng = example_rng(self.seed, i)
        op = rng.choice(OPS)
        a, b = self._operand(rng), self._operand(rng)
        if op == "/":  # exact division only: a = b * q, so the answer is a whole number
            b = max(b, 1)
            a = b * self._operand(rng)
        expr = f"{a} {op} {b}"
        result = calculate(expr.replace(" ", ""))
        answer = a + b if op == "+" else a - b if op == "-" else a * b if op == "*" else a // b
        parts = [
            {"type": "python", "text": expr.replace(" ", "")},
            {"type": "python_output", "text": result},
            {"type": "text", "text": f"The answer is {answer}."},
        ]
        return {
            "messages": [{"role": "user", "content": rng.choice(PROMPTS).format(e=expr)},
                         {"role": "assistant", "content": parts}],
            "answer": answer,
        }

    def reward(self, conversation: dict, completion: str) -> float:
        return float(same_number(last_number(completion), conversation["answer"]))
