"""The command line, and nothing else: each command is a config dataclass, whose fields are its flags
(settings.py), and a function that takes it. This file names them, parses, runs, and prints.

Only the chosen command's module is imported, so that `picochat --help` starts fast.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from dataclasses import dataclass, field, fields, replace
from typing import Callable

from . import __version__
from .common import PicochatError, first_line


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, like every other user error
        print(f"error: {self.prog}: {message}", file=sys.stderr)
        sys.exit(2)


def _summary(result: dict) -> str | None:
    """A training stage's summary as one JSON line (rank 0 only under torchrun)."""
    from . import distributed
    return json.dumps({k: v for k, v in result.items() if k != "metrics"}) if distributed.is_main() else None


def _table(module: str, name: str) -> Callable:
    return lambda result: getattr(importlib.import_module(module), name)(result)


def _samples(texts: list[str]) -> str:
    return "\n".join(f"{t}\n{'-' * 40}" for t in texts)


@dataclass(frozen=True)
class Command:
    help: str
    config: str  # "module:Class" of its config
    run: str  # "module:function" that does the work
    show: Callable[[object], str | None] | None = None  # what of the result goes to stdout
    fixed: dict = field(default_factory=dict)  # config fields the command name decides (which evals)


_EVAL = "picochat.evals.chat_eval"
COMMANDS: dict[tuple[str, ...], Command] = {
    ("tokenizer", "train"): Command("train byte-level BPE on text", "picochat.tokenizer:TokenizerTrainConfig",
                                    "picochat.tokenizer:tokenizer_train"),
    ("tokenizer", "eval"): Command("bytes per token on several kinds of text", "picochat.tokenizer:TokenizerEvalConfig",
                                   "picochat.tokenizer:tokenizer_eval",
                                   _table("picochat.tokenizer", "format_eval_table")),
    ("data", "prepare"): Command("turn text files into parquet shards with a `text` column",
                                 "picochat.data.prepare:PrepareConfig", "picochat.data.prepare:prepare"),
    ("data", "download"): Command("fetch datasets into the data dir: pretraining shards, chat and eval sets "
                                  "(resumable, verified)", "picochat.data.download:DownloadConfig",
                                  "picochat.data.download:download"),
    ("pretrain",): Command("pretrain a base model", "picochat.train.pretrain:PretrainConfig",
                           "picochat.train.pretrain:pretrain", _summary),
    ("midtrain",): Command("teach a base model the chat format and tool use (packed conversations)",
                           "picochat.train.sft:MidtrainConfig", "picochat.train.sft:chat_train", _summary),
    ("sft",): Command("supervised fine-tuning on whole conversations", "picochat.train.sft:SFTConfig",
                      "picochat.train.sft:chat_train", _summary),
    ("rl",): Command("reinforcement learning (GRPO) on graded tasks, calculator on", "picochat.train.rl:RLConfig",
                     "picochat.train.rl:rl_train", _summary),
    ("eval", "bpb"): Command("bits per byte on held-out text", "picochat.evals.bpb:BpbConfig",
                             "picochat.evals.bpb:eval_bpb", lambda bpb: json.dumps({"bpb": round(bpb, 6)})),
    ("eval", "core"): Command("the DCLM CORE metric of a base model (few-shot, 22 tasks)",
                              "picochat.evals.core:CoreConfig", "picochat.evals.core:eval_core",
                              _table("picochat.evals.core", "format_core_table")),
    ("sample",): Command("continue a prompt with a trained model", "picochat.sample:SampleConfig",
                         "picochat.sample:sample", _samples),
    ("chat",): Command("talk to a chat model in the terminal", "picochat.chat:ChatConfig", "picochat.chat:chat"),
    ("serve",): Command("serve a chat model: OpenAI-compatible HTTP API and web chat page",
                        "picochat.serve.app:ServeConfig", "picochat.serve.app:serve"),
    ("quantize",): Command("write an INT8 (weight-only) copy of a run dir, for inference",
                           "picochat.quantize:QuantizeConfig", "picochat.quantize:quantize_run", json.dumps),
    ("export",): Command("write a run dir as a transformers model directory (AutoModelForCausalLM loads it)",
                         "picochat.convert.commands:ExportConfig", "picochat.convert.commands:export",
                         lambda path: f"exported: {path}"),
    ("import",): Command("make a run dir from a transformers NanoChat directory or a nanochat checkpoint, local or "
                         "on the Hub",
                         "picochat.convert.commands:ImportConfig", "picochat.convert.commands:import_model",
                         lambda path: f"imported: {path}"),
    ("speedrun",): Command("the whole pipeline in one command (offline by default)",
                           "picochat.speedrun:SpeedrunConfig", "picochat.speedrun:speedrun",
                           _table("picochat.speedrun", "shown")),
    ("report",): Command("the report card of a pipeline's run dirs (report.md with plots)",
                         "picochat.report:ReportConfig", "picochat.report:report", lambda path: f"report: {path}"),
}


def _eval_commands() -> None:
    """`picochat eval <task>` for every task with an eval, and the groups (registry.py)."""
    from .tasks.registry import EVAL_GROUPS, EVALS
    show = _table(_EVAL, "format_chat_results")
    for name, spec in EVALS.items():
        config, run = spec.eval.command.split(":")
        COMMANDS["eval", name] = Command(spec.eval.about, f"{_EVAL}:{config}", f"{_EVAL}:{run}", show,
                                         {"tasks": (name,)})
    for name, (tasks, about) in EVAL_GROUPS.items():
        COMMANDS["eval", name] = Command(about, f"{_EVAL}:ChatEvalConfig", f"{_EVAL}:run_chat_evals", show,
                                         {"tasks": tuple(tasks)})


_eval_commands()
GROUPS = {"tokenizer": "train or evaluate a BPE tokenizer", "data": "prepare or download data",
          "eval": "evaluate a model"}


def _load(path: str):
    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


def _overview() -> argparse.ArgumentParser:
    """The parser of `picochat` and `picochat GROUP`: names and help only, nothing imported."""
    parser = _Parser(prog="picochat", description="Train a small ChatGPT-style model from scratch, and use it.")
    parser.add_argument("--version", action="version", version=f"picochat {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser, metavar="COMMAND")
    groups: dict[str, argparse._SubParsersAction] = {}
    for path, cmd in COMMANDS.items():
        if len(path) == 1:
            sub.add_parser(path[0], help=cmd.help, add_help=False)
            continue
        if path[0] not in groups:
            g = sub.add_parser(path[0], help=GROUPS[path[0]])
            groups[path[0]] = g.add_subparsers(dest="action", required=True, parser_class=_Parser, metavar="ACTION")
        groups[path[0]].add_parser(path[1], help=cmd.help, add_help=False)
    return parser


def build_parser(path: tuple[str, ...]) -> tuple[argparse.ArgumentParser, type]:
    """A command's parser, its flags made from its config class; and that class."""
    cmd = COMMANDS[path]
    cls = _load(cmd.config)
    parser = _Parser(prog="picochat " + " ".join(path), description=cmd.help,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    from .settings import add_flags
    add_flags(parser, cls)
    return parser, cls


def parse(argv: list[str]) -> tuple[Command, object]:
    """(the command, its config) from the command line; exits 2 with one line on bad flags."""
    path = tuple(argv[:2]) if tuple(argv[:2]) in COMMANDS else tuple(argv[:1])
    if path not in COMMANDS:
        _overview().parse_args(argv)  # prints help or a usage error, and exits
        raise SystemExit(2)
    rest = argv[len(path):]
    parser, cls = build_parser(path)
    values = vars(parser.parse_args(rest))
    from .settings import from_flags
    cmd = COMMANDS[path]
    cfg = from_flags(cls, values)
    if cmd.fixed:
        cfg = replace(cfg, **cmd.fixed)
    if any(f.name == "controls" for f in fields(cfg)):  # a training stage: which settings the user chose
        cfg = replace(cfg, controls=replace(cfg.controls, given=frozenset(values)))
    return cmd, cfg


def main(argv: list[str] | None = None) -> int:
    cmd, cfg = parse(sys.argv[1:] if argv is None else argv)
    try:
        result = _load(cmd.run)(cfg)
        out = cmd.show(result) if cmd.show is not None else None
        if out is not None:
            print(out)
    except PicochatError as e:  # one line; a training stage stopped by a signal says how to resume
        print(f"{e.label}: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except RuntimeError as e:
        from . import distributed
        if not distributed.peer_lost(e):
            raise
        print(f"error: rank {distributed.rank()}: lost contact with the other processes (one died or stopped "
              f"answering; see the first failing rank's output): {first_line(e, 300)}", file=sys.stderr, flush=True)
        # exit now: tearing down a process group whose peer is gone can abort the process (SIGABRT
        # from the backend's destructor); the run dir on disk is whole either way
        sys.stdout.flush()
        os._exit(1)
    finally:
        if "torch.distributed" in sys.modules:  # commands that never load torch stay fast
            from . import distributed
            distributed.teardown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
