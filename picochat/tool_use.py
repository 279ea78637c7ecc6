"""The calculator as generation drives it: each row's tool call in progress, forced tokens, and end.

A row samples tokens. <|python_start|> opens a call; the tokens up to <|python_end|> are its
expression; at <|python_end|> the calculator (tools.calculate) runs, and its output,
<|output_start|> result <|output_end|>, is fed to the row one token per step in place of sampling
(so that every row of a batch stays at the same position), each marked forced: the model did not
choose it (RL never trains on it). A row ends at one of its stop tokens, which is its last token,
or when its budget of steps runs out. Both the batched decoder (decode_batch.DecodeBatch) and the
compiled single-request path (engine.Engine) step their rows through RowState.
"""

from __future__ import annotations

from collections import deque

from .tokenizer import OUTPUT_END, OUTPUT_START, PYTHON_END, PYTHON_START
from .tools import calculate


class ToolTokens:
    """A tokenizer's tool markers, and the forced tokens that answer a call."""

    def __init__(self, tokenizer):
        sid = tokenizer.special_id
        self.tokenizer = tokenizer
        self.python_start, self.python_end = sid(PYTHON_START), sid(PYTHON_END)
        self.output_start, self.output_end = sid(OUTPUT_START), sid(OUTPUT_END)

    def answer(self, expr_tokens: list[int]) -> list[int]:
        result = calculate(self.tokenizer.decode(expr_tokens))  # never raises: errors are text
        return [self.output_start, *self.tokenizer.encode(result), self.output_end]


class RowState:
    """One row: its open call (None when no call is open), the tokens to force, its steps left."""

    __slots__ = ("tools", "stops", "left", "call", "queue", "done")

    def __init__(self, tools: ToolTokens | None, stops: frozenset, steps: int):
        self.tools, self.stops, self.left = tools, stops, steps
        self.call: list[int] | None = None
        self.queue: deque = deque()
        self.done = False

    def step(self, sampled: int) -> tuple[int, bool, str | None]:
        """The row's token this step: the next forced one, or `sampled`; whether it was forced; and
        how the row ends with it, if it does ("stop": a stop token, "length": no steps left)."""
        finish = None
        if self.queue:
            tok, forced = self.queue.popleft(), True
        else:
            tok, forced = sampled, False
            if tok in self.stops:
                finish = "stop"
            elif self.tools is not None:
                t = self.tools
                if tok == t.python_start:
                    self.call = []
                elif self.call is not None:
                    if tok == t.python_end:
                        self.queue.extend(t.answer(self.call))
                        self.call = None
                    else:
                        self.call.append(tok)
        self.left -= 1
        if finish is None and self.left <= 0:
            finish = "length"
        self.done = finish is not None
        return tok, forced, finish
