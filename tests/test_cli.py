"""The command line is only a front door: every flag is a config field, with the field's default and
help; the package has no import cycles."""

import argparse
import ast
import dataclasses
import typing

import pytest

from picochat.cli import COMMANDS, build_parser, parse
from picochat.common import PicochatError
from picochat.settings import default_of

from .conftest import REPO


def _required(parser: argparse.ArgumentParser) -> list[str]:
    """Dummy values for a command's required flags (and positionals)."""
    argv = []
    for action in parser._actions:
        if action.required and action.option_strings:
            value = action.choices[0] if action.choices else "x"  # a required choice takes its first
            argv += [action.option_strings[0], *([value] if action.nargs in (None, "+") else [])]
        elif not action.option_strings and action.nargs in (None, "+"):  # a positional
            argv.append("x")
    return argv


@pytest.mark.parametrize("path", list(COMMANDS), ids=" ".join)
def test_the_cli_and_a_python_caller_get_the_same_defaults(path):
    """`picochat <command> <required flags>` builds exactly the config a Python caller gets by
    passing those values: no default lives in the parser."""
    parser, cls = build_parser(path)
    argv = _required(parser)
    _, cfg = parse([*path, *argv])
    given = vars(parser.parse_args(argv))
    by_hand = {}
    types = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in given:
            by_hand[f.name] = given[f.name]
        elif default_of(f) is dataclasses.MISSING:  # a required nested config: the model to load
            sub = types[f.name]
            by_hand[f.name] = sub(**{g.name: given[g.name] for g in dataclasses.fields(sub) if g.name in given})
    expected = cls(**by_hand)
    for name, value in COMMANDS[path].fixed.items():
        expected = dataclasses.replace(expected, **{name: value})
    if hasattr(cfg, "controls"):  # the CLI also says which settings were typed
        assert cfg.controls.given == frozenset(given)
        cfg = dataclasses.replace(cfg, controls=dataclasses.replace(cfg.controls, given=None))
    assert cfg == expected


@pytest.mark.parametrize("path", list(COMMANDS), ids=" ".join)
def test_every_flag_has_help_and_shows_its_default(path):
    parser, _ = build_parser(path)
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help, f"{action.option_strings}: no help"
        if not action.required:
            assert "default" in action.help, f"{action.option_strings}: its help does not give the default"


def test_one_default_per_setting_sft_and_midtrain():
    """The sft flag and SFTConfig agree on the learning-rate scale (they used to differ: 0.1 vs 1.0)."""
    from picochat.train.sft import MidtrainConfig, SFTConfig
    _, sft = parse(["sft", "--load", "a", "--data", "b", "--save", "c"])
    _, mid = parse(["midtrain", "--load", "a", "--data", "b", "--save", "c"])
    assert sft.lr_scale == SFTConfig("a", "b", "c").lr_scale == 0.1
    assert mid.lr_scale == MidtrainConfig("a", "b", "c").lr_scale == 1.0


def test_a_switch_the_device_decides_has_both_flags():
    """--compile / --no-compile, and neither: the device decides (on CUDA, compiled)."""
    import torch

    from picochat.common import choose_compile
    base = ["pretrain", "--data", "d", "--save", "s"]
    asked = [parse([*base, *flag])[1].controls.compile for flag in (["--compile"], ["--no-compile"], [])]
    assert asked == [True, False, None]
    assert [choose_compile(a, torch.device("cpu")) for a in asked] == [True, False, False]
    assert [choose_compile(a, torch.device("cuda")) for a in asked] == [True, False, True]
    assert parse(["rl", "--load", "m", "--task", "t", "--save", "s"])[1].controls.compile is False  # shapes vary
    with pytest.raises(SystemExit):
        parse(["rl", "--load", "m", "--task", "t", "--save", "s", "--compile"])


def test_a_switch_that_defaults_on_also_takes_a_value():
    """--no-lora-merge, or --lora-merge false (as some spell it); the LoRA settings reach the config."""
    base = ["sft", "--load", "a", "--data", "b", "--save", "c", "--lora", "16"]
    merges = [parse([*base, *flag])[1].adapters.lora_merge
              for flag in ([], ["--no-lora-merge"], ["--lora-merge", "false"], ["--lora-merge", "true"])]
    assert merges == [True, False, False, True]
    assert parse(base)[1].adapters.lora == 16 and parse(base[:-2])[1].adapters.lora is None
    assert parse(["rl", "--load", "m", "--task", "t", "--save", "s", "--std", "off"])[1].std is False
    with pytest.raises(SystemExit):
        parse([*base, "--lora-merge", "maybe"])


def test_depth_lists_the_table_and_other_depths_take_nanochats_sizing():
    from picochat.config import ModelConfig
    parser, _ = build_parser(("pretrain",))
    depth = next(a for a in parser._actions if "--depth" in a.option_strings)
    assert "2, 4, 6, 8, 12, 16, 20, 24, 26, 32" in depth.help
    with pytest.raises(PicochatError, match=r"no preset for depth 10 .*--sizing nanochat"):
        ModelConfig.from_depth(10)
    m = ModelConfig.from_depth(10, "nanochat")  # 64 x 10 = 640, rounded up to 128-wide heads
    assert (m.n_embd, m.n_head, m.n_kv_head) == (640, 5, 5)
    assert ModelConfig.from_depth(24, "nanochat").n_embd == ModelConfig.from_depth(24).n_embd == 1536


def _imports() -> dict[str, set[str]]:
    """module -> the picochat modules it imports, anywhere in it (functions too)."""
    root = REPO / "picochat"
    names = {}
    for p in root.rglob("*.py"):
        parts = list(p.relative_to(REPO).with_suffix("").parts)
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    graph = {}
    for mod, path in names.items():
        package = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = package.split(".")[:len(package.split(".")) - max(node.level - 1, 0)] if node.level else []
                target = ".".join(base + ([node.module] if node.module else [])) if node.level else node.module
                deps |= {f"{target}.{a.name}" if f"{target}.{a.name}" in names else target for a in node.names}
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names}
        graph[mod] = {d for d in deps if d in names and d != mod}
    return graph


def test_no_import_cycles():
    graph = _imports()
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(mod, path):
        state[mod] = 1
        for dep in sorted(graph[mod]):
            if state.get(dep) == 1:
                cycle = path[path.index(dep):] + [dep]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep, path + [dep])
        state[mod] = 2

    for mod in sorted(graph):
        if mod not in state:
            visit(mod, [mod])
    assert len(graph) > 40  # it read the package


def test_layout_is_documented():
    """Every module of the package is named in the README's layout section and in DESIGN.md."""
    readme = (REPO / "README.md").read_text()
    layout = readme[readme.index("## Layout"):]
    design = (REPO / "DESIGN.md").read_text() if (REPO / "DESIGN.md").exists() else ""
    for p in sorted((REPO / "picochat").rglob("*.py")):
        if p.name.startswith("__") or p.parent.name == "static":
            continue
        name = p.name if p.parent.name == "picochat" else f"{p.parent.name}/"
        assert name.removesuffix(".py") in layout, f"{p.relative_to(REPO)} is missing from the README's layout"
        if design:
            assert name.removesuffix(".py") in design, f"{p.relative_to(REPO)} is missing from DESIGN.md"
