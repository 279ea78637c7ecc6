"""Questions about Python, answered from the docstrings of the installed standard library.

The offline speedrun pretrains on this machine's Python documentation; these conversations, made
from the same text, teach its chat stages to answer questions about it:
  - What does the json module do?         -> the module docstring's first paragraph
  - What does json.dumps() do?            -> the function docstring's first paragraph
  - What are the parameters of json.dumps? -> the names in its signature
  - Which module provides dumps?          -> "dumps is in the json module." (names in one module only)
Sources are parsed with ast, never imported, and walked in sorted order, so a machine always
builds the same set. A fixed tenth of the questions (by a hash of the question) is held out as
the test split. The grader scores a reply by its word overlap with the reference (F1 >= 0.5).
"""

from __future__ import annotations

import ast
import hashlib
import re
import sysconfig
from functools import lru_cache
from pathlib import Path

from picochat.tasks.base import ListTask

MAX_ANSWER_CHARS = 240
_WORD = re.compile(r"[a-z0-9_]+")


def _first_paragraph(doc: str) -> str | None:
    """The docstring's first paragraph, if it is prose, cut at a sentence end near the cap."""
    para = " ".join(doc.strip().split("\n\n")[0].split())
    letters = sum(c.isalpha() or c.isspace() for c in para)
    if len(para) < 20 or letters < 0.8 * len(para) or para.startswith((">>>", "..", "::")):
        return None
    if len(para) > MAX_ANSWER_CHARS:
        cut = para[:MAX_ANSWER_CHARS].rfind(". ")
        para = para[:cut + 1] if cut > 40 else para[:MAX_ANSWER_CHARS].rsplit(" ", 1)[0] + "..."
    return para


def _params(fn: ast.FunctionDef) -> list[str]:
    a = fn.args
    names = [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs]
    names += [f"*{a.vararg.arg}"] if a.vararg else []
    names += [f"**{a.kwarg.arg}"] if a.kwarg else []
    return names


def _modules() -> list[tuple[str, Path]]:
    """(dotted name, source file) of the public standard-library modules, sorted."""
    from picochat.data.builtin import _skip_path, _source_files
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for path in _source_files(root):
        parts = path.relative_to(root).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if not parts or any(p.startswith("_") for p in parts) or _skip_path(Path(*parts)):
            continue
        out.append((".".join(parts), path))
    return out


def _and(names: list[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


@lru_cache(maxsize=1)
def build_pairs() -> tuple[tuple[str, str], ...]:
    """Every (question, answer) pair this Python's standard library gives, in a fixed order."""
    pairs, homes = [], {}
    for module, path in _modules():
        try:
            tree = ast.parse(path.read_bytes())
        except (SyntaxError, ValueError, OSError):
            continue
        doc = ast.get_docstring(tree)
        if doc and (text := _first_paragraph(doc)):
            pairs.append((f"What does the {module} module do?", text))
        for node in tree.body:
            if not isinstance(node, ast.FunctionDef) or node.name.startswith("_"):
                continue
            homes.setdefault(node.name, []).append(module)
            doc = ast.get_docstring(node)
            if not doc or not (text := _first_paragraph(doc)):
                continue
            pairs.append((f"What does {module}.{node.name}() do?", text))
            params = _params(node)
            said = f"{module}.{node.name} takes {_and(params)}." if params else \
                f"{module}.{node.name} takes no parameters."
            pairs.append((f"What are the parameters of {module}.{node.name}?", said))
    for name, modules in sorted(homes.items()):
        if len(modules) == 1:
            pairs.append((f"Which module provides {name}?", f"{name} is in the {modules[0]} module."))
    return tuple(pairs)


def held_out(question: str) -> bool:
    return hashlib.sha256(question.encode()).digest()[0] % 10 == 0


def sample_questions() -> list[tuple[str, str]]:
    """A held-out question of each kind (module, function, parameters, where), with its answer:
    what the speedrun's report asks every chat stage."""
    kinds = (("What does the ", " module do?"), ("What does ", "() do?"), ("What are the parameters of ", ""),
             ("Which module provides ", ""))
    test = [(q, a) for q, a in build_pairs() if held_out(q)]
    return [pair for start, end in kinds
            for pair in [next(((q, a) for q, a in test if q.startswith(start) and q.endswith(end)), None)] if pair]


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def overlap_f1(reply: str, reference: str) -> float:
    """Word-overlap F1 (SQuAD's): how much of the reference the reply says, and how much else."""
    got, want = words(reply), words(reference)
    if not got or not want:
        return 0.0
    common = sum(min(got.count(w), want.count(w)) for w in set(got))
    if not common:
        return 0.0
    p, r = common / len(got), common / len(want)
    return 2 * p * r / (p + r)


class PyDocs(ListTask):
    name = "pydocs"
    kind = "generative"

    def __init__(self, split: str = "train"):
        test = split != "train"
        super().__init__([
            {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}], "answer": a}
            for q, a in build_pairs() if held_out(q) == test])

    def reward(self, conversation: dict, completion: str) -> float:
        """1.0 when the reply says at least half of the reference's words without much else (F1 >= 0.5)."""
        return float(overlap_f1(completion, conversation["answer"]) >= 0.5)
