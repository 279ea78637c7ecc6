"""Synthetic spelling and letter counting, from a word list.

Token-level models cannot see letters, so "how many r's in strawberry" is hard for them. Two
kinds of example teach the workaround: spelling a word out letter by letter ("s-t-r-a-w-..."),
and counting a letter by first spelling the word, then checking with the calculator
('strawberry'.count('r')), then answering. Deterministic from (seed, index).
"""

from __future__ import annotations

import re
import string
from functools import lru_cache
from pathlib import Path

from picochat.common import PicochatError
from picochat.tasks.base import Task, example_rng, last_number
from picochat.tools import calculate

MIN_LEN, MAX_LEN = 3, 12  # long enough to be worth spelling, short enough to stay cheap

SPELL_PROMPTS = ["Spell the word {w}", "How do you spell '{w}'?", "Spell {w} letter by letter.",
                 "Can you spell the word \"{w}\"?"]
COUNT_PROMPTS = ["How many '{c}' are in '{w}'?", "How many times does the letter {c} appear in {w}?",
                 "Count the letter '{c}' in the word \"{w}\".", "How many {c}'s are there in {w}?"]
_SPELLED = re.compile(r"\b[a-z](?:-[a-z])+\b")


@lru_cache(maxsize=4)
def load_words(path: str) -> tuple[str, ...]:
    """Lowercase a-z words of MIN_LEN..MAX_LEN letters (the file may have CRLF line endings)."""
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        raise PicochatError(f"spelling: word list not found: {path}") from None
    except OSError as e:
        raise PicochatError(f"spelling: cannot read {path}: {e}") from None
    words = tuple(w for w in (line.strip().lower() for line in text.splitlines())
                  if MIN_LEN <= len(w) <= MAX_LEN and w.isascii() and w.isalpha())
    if not words:
        raise PicochatError(f"spelling: no usable words ({MIN_LEN}-{MAX_LEN} letters a-z) in {path}")
    return words


def spell(word: str) -> str:
    return "-".join(word)


class Spelling(Task):
    name = "spelling"
    kind = "generative"

    def __init__(self, path: str | Path, size: int = 10_000, seed: int = 0):
        if size < 1:
            raise PicochatError(f"spelling: size must be at least 1, got {size}")
        self.words = load_words(str(path))
        self.size, self.seed = size, seed

    def __len__(self) -> int:
        return self.size

    def example(self, i: int) -> dict:
        rng = example_rng(self.seed, i)
        word = rng.choice(self.words)
        if rng.random() < 0.5:
            return {
                "messages": [{"role": "user", "content": rng.choice(SPELL_PROMPTS).format(w=word)},
                             {"role": "assistant", "content": spell(word)}],
                "kind": "spell", "word": word, "answer": spell(word),
            }
        # Mostly letters of the word; sometimes one it lacks, so that 0 is a possible answer.
        letter = rng.choice(word) if rng.random() < 0.8 else rng.choice(string.ascii_lowercase)
        expr = f"'{word}'.count('{letter}')"
        count = word.count(letter)
        parts = [
            {"type": "text", "text": f"Let me spell it out: {spell(word)}. Now I count the '{letter}'s: "},
            {"type": "python", "text": expr},
            {"type": "python_output", "text": calculate(expr)},
            {"type": "text", "text": f"There {'is' if count == 1 else 'are'} {count} '{letter}' in '{word}'. "
                                     f"The answer is {count}."},
        ]
        return {
            "messages": [{"role": "user", "content": rng.choice(COUNT_PROMPTS).format(c=letter, w=word)},
                         {"role": "assistant", "content": parts}],
            "kind": "count", "word": word, "letter": letter, "answer": count,
        }

    def reward(self, conversation: dict, completion: str) -> float:
        if conversation["kind"] == "spell":
            spelled = _SPELLED.findall(completion.lower())
            return float(bool(spelled) and spelled[-1] == conversation["answer"])
        return float(last_number(completion) == conversation["answer"])
