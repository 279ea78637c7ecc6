"""Every chat task, in one table: how to build it, where its data lives, whether it can be graded,
and how `picochat eval` and the report card treat it.

A new task is a module in picochat/tasks/ with a Task subclass, plus one TaskSpec here: training
mixtures (`--data name:path:weight`), RL (if it has a grader), `picochat eval <name>` (if it has
an EvalSpec) and the report's table all take it from this table.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class EvalSpec:
    """How `picochat eval <name>` treats a task. Whether it is categorical (a letter from the
    logits) or generative (sampled and graded) is the task class's own `kind`."""
    baseline: float  # accuracy by chance
    split: str = "test"
    max_tokens: int = 256  # generative: reply length cap
    chatcore: bool = False  # one of the tasks ChatCORE averages
    about: str = ""  # what `picochat eval <name>` does, for --help
    command: str = "ChatEvalConfig:run_chat_evals"  # its config and function in evals/chat_eval.py


@dataclass(frozen=True)
class TaskSpec:
    name: str
    cls: str  # "module:Class" under picochat.tasks
    takes: tuple[str, ...]  # which of path, split and seed its constructor takes
    dataset: str | None  # its files in the data dir (data.datasets.LOCATIONS); None: built in, no path
    label: str  # how the report names it
    options: tuple[tuple[str, object], ...] = ()  # fixed constructor arguments
    eval: EvalSpec | None = None

    def task_class(self) -> type:
        module, cls = self.cls.split(":")
        return getattr(importlib.import_module(f"picochat.tasks.{module}"), cls)

    @property
    def needs_path(self) -> bool:
        """A mixture item must name its files (or find them in the data dir)."""
        return self.dataset is not None

    @property
    def graded(self) -> bool:
        """It has a grader: usable in RL and in generative evals."""
        return self.task_class().graded()

    @property
    def kind(self) -> str:
        return self.task_class().kind


SPECS = [
    TaskSpec("chat", "chat:Chat", ("path", "split"), "smoltalk", "Chat"),
    TaskSpec("smoltalk", "chat:Chat", ("path", "split"), "smoltalk", "SmolTalk", (("name", "smoltalk"),)),
    TaskSpec("arc", "arc:ARC", ("path", "split"), "arc", "ARC"),
    TaskSpec("arc-easy", "arc:ARC", ("path", "split"), "arc", "ARC-Easy", (("subset", "Easy"),),
             eval=EvalSpec(0.25, chatcore=True, about="ARC-Easy (categorical)")),
    TaskSpec("arc-challenge", "arc:ARC", ("path", "split"), "arc", "ARC-Challenge", (("subset", "Challenge"),),
             eval=EvalSpec(0.25, chatcore=True, about="ARC-Challenge (categorical)")),
    TaskSpec("mmlu", "mmlu:MMLU", ("path", "split"), "mmlu", "MMLU",
             eval=EvalSpec(0.25, chatcore=True, about="MMLU, 57 subjects (categorical)")),
    TaskSpec("gsm8k", "gsm8k:GSM8K", ("path", "split"), "gsm8k", "GSM8K",
             eval=EvalSpec(0.0, max_tokens=384, chatcore=True, about="GSM8K with the calculator (generative)")),
    TaskSpec("humaneval", "humaneval:HumanEval", ("path",), "humaneval", "HumanEval",
             eval=EvalSpec(0.0, max_tokens=384, chatcore=True, about="HumanEval, run in a sandbox (generative)",
                           command="HumanEvalConfig:eval_humaneval")),  # it also grades the reference solutions
    TaskSpec("identity", "identity:Identity", ("path",), None, "Identity"),
    # spelling is in picochat's ChatCORE, not in nanochat's (which dropped it): the small models
    # here are trained on it, and it tests letter-level skill and the calculator together
    TaskSpec("spelling", "spelling:Spelling", ("path", "seed"), "words", "Spelling",
             eval=EvalSpec(0.0, max_tokens=96, chatcore=True, about="spelling and letter counting (generative)")),
    TaskSpec("arithmetic", "arithmetic:Arithmetic", ("seed",), None, "Arithmetic (tools)",
             eval=EvalSpec(0.0, max_tokens=48, about="synthetic arithmetic with the calculator (generative, built in)")),
    TaskSpec("pydocs", "pydocs:PyDocs", ("split",), None, "Python docs Q&A",
             eval=EvalSpec(0.0, max_tokens=64,
                           about="questions on the installed Python's standard library, answered from its "
                                 "docstrings (held-out questions; built in)")),
    TaskSpec("text", "text:Text", ("path",), "fineweb-edu", "Pretraining text"),
]
TASKS = {spec.name: spec for spec in SPECS}
EVALS = {name: spec for name, spec in TASKS.items() if spec.eval is not None}
CHATCORE = [name for name, spec in EVALS.items() if spec.eval.chatcore]
NANOCHAT_CHATCORE = ["arc-easy", "arc-challenge", "mmlu", "gsm8k", "humaneval"]  # nanochat's five, for comparison
# `picochat eval NAME`: each eval task, and these groups
EVAL_GROUPS = {"arc": (["arc-easy", "arc-challenge"], "ARC-Easy and ARC-Challenge (categorical)"),
               "chat": (CHATCORE, f"ChatCORE's {len(CHATCORE)} tasks, and ChatCORE")}


def graded_names() -> list[str]:
    return [name for name, spec in TASKS.items() if spec.graded]


def make_task(name: str, path=None, split: str = "train", seed: int = 0, **kwargs):
    """Build task `name` (a known one) from its constructor's arguments."""
    spec = TASKS[name]
    given = {"path": path, "split": split, "seed": seed}
    args = {k: given[k] for k in spec.takes}
    return spec.task_class()(**args, **dict(spec.options), **kwargs)
