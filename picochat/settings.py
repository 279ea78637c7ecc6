"""Settings: each one defined once, as a dataclass field with its default and its help text.

A command's config dataclass is its whole input, and its fields are the command's flags:
`add_flags` builds them, `from_flags` builds the config back from the flags that were typed. The
parser keeps no default of its own (argparse.SUPPRESS), so a flag left out takes the field's
default, and `picochat sft ...` cannot differ from `chat_train(SFTConfig(...))`.

    @dataclass
    class PretrainConfig:
        depth: int = setting(4, "model size", choices=sorted(DEPTH_PRESETS))
        optim: OptimConfig = setting(factory=OptimConfig, flags=("matrix_lr", "head_lr"))

A field becomes `--depth` (underscores to dashes). A bool that defaults to False is a switch; one
that defaults to True is turned off by `--no-<name>` (or `--<name> false`); a `bool | None`
(None: decided at run time, by the device) has both. A nested config dataclass gives flags of its
own fields (all, or those named in `flags`). cli=False keeps a field for Python callers only.

A setting of a training stage either defines the run (the default: the model's shape, the data,
the batch, the optimizer, the seed) or may change when the run is resumed (defines_run=False:
where to save, how often to log or evaluate, the device). A resume restores the first kind from
the run dir and refuses a typed value that contradicts it (train/stage.py reads the mark; no list
of names is kept anywhere else). A run dir written before a setting existed has no value for it and
resumes with the field's own default, so a new setting's field default must be what runs did
without it; a command may still default to something newer through a nested config's factory
(pretraining's `features` and `optim`).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import types
import typing
from dataclasses import MISSING, dataclass, field


def setting(default=MISSING, help: str = "", *, factory=None, flag: str | None = None, aliases: tuple = (),
            choices=None, metavar: str | None = None, cli: bool = True, flags: tuple[str, ...] | None = None,
            positional: bool = False, low: float | None = None, high: float | None = None,
            defines_run: bool = True):
    """A config field that is also a flag. `factory` makes mutable defaults (a nested config, a
    list); `flags` names the fields of a nested config that are flags (default: all); `low` and
    `high` bound a number (check() enforces them, for the CLI and Python callers alike);
    defines_run=False: a resumed run may take another value (see the module's docstring)."""
    meta = {"help": help, "flag": flag, "aliases": tuple(aliases), "choices": choices, "metavar": metavar,
            "cli": cli, "flags": flags, "positional": positional, "low": low, "high": high,
            "defines_run": defines_run}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def default_of(f: dataclasses.Field):
    """A field's default value (MISSING when it has none: a required setting)."""
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    return MISSING


@functools.cache
def _types(cls) -> dict[str, object]:
    """Field name -> its type, with `X | None` taken as X (None is then a default, not a value
    anyone types)."""
    out = {}
    for name, tp in typing.get_type_hints(cls).items():
        if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            tp = args[0] if len(args) == 1 else tp
        out[name] = tp
    return out


def _nested(cls, f: dataclasses.Field):
    """The nested config class of a field, or None."""
    tp = _types(cls)[f.name]
    return tp if dataclasses.is_dataclass(tp) and f.metadata.get("cli", True) else None


def _flags(cls, only=None):
    """(field, its type) for each field of cls that is a flag (nested configs not expanded)."""
    for f in dataclasses.fields(cls):
        if f.metadata.get("cli", True) and (only is None or f.name in only or _nested(cls, f)):
            yield f, _types(cls)[f.name]


def flag_name(cls, f: dataclasses.Field, default=MISSING) -> str:
    """The flag of field f of cls; `default`: its default where a nested config's factory gives
    another than the field's own (a switch is named for what typing it does)."""
    if f.metadata.get("flag"):
        return f.metadata["flag"]
    dashed = f.name.replace("_", "-")
    default = default_of(f) if default is MISSING else default
    return f"--no-{dashed}" if _types(cls)[f.name] is bool and default is True else f"--{dashed}"


def show(value) -> str:
    """A setting's value as it would be typed."""
    return " ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def _help(f: dataclasses.Field, tp, default) -> str:
    text = f.metadata.get("help", "")
    if default is MISSING:
        return text
    if tp is bool and default is None:
        return text  # --x and --no-x: the help says what decides otherwise
    if tp is bool:  # a switch: `--x` for a False default, `--no-x` for a True one
        return f"{text} (default: {'on' if default else 'off'})"
    if "default" in text:
        return text  # the help itself says what happens without it
    if default is None or default == "" or default == [] or default == ():
        return f"{text} (default: none)"
    return f"{text} (default: {show(default)})"


def add_flags(parser: argparse.ArgumentParser, cls, only: tuple[str, ...] | None = None, defaults=None,
              optional: bool = False) -> None:
    """One flag per field of the config class `cls`, nested configs' fields included. `defaults`:
    the instance whose values are the defaults (a nested config made by its field's factory);
    `optional`: a nested config that may be left out (None), so none of its flags is required."""
    for f, tp in _flags(cls, only):
        if (sub := _nested(cls, f)) is not None:
            base = default_of(f)
            add_flags(parser, sub, f.metadata.get("flags"), None if base in (MISSING, None) else base,
                      optional or base is None)
            continue
        default = getattr(defaults, f.name) if defaults is not None else default_of(f)
        text = _help(f, tp, default) + (" (default: none)" if optional and default is MISSING else "")
        kw: dict = {"help": text, "default": argparse.SUPPRESS}
        for key in ("choices", "metavar"):
            if f.metadata.get(key) is not None:
                kw[key] = f.metadata[key]
        origin = typing.get_origin(tp)
        if tp is bool:
            kw["action"] = argparse.BooleanOptionalAction if default is None else \
                "store_false" if default is True else "store_true"
        elif origin in (list, tuple):
            args = typing.get_args(tp)
            kw["type"] = args[0]
            kw["nargs"] = len(args) if origin is tuple and Ellipsis not in args else "+"
        else:
            kw["type"] = tp
        if f.metadata.get("positional"):
            if default is not MISSING:
                kw["nargs"] = "*" if kw.get("nargs") == "+" else "?"
            parser.add_argument(f.name, **kw)
        else:
            kw["required"] = default is MISSING and not optional
            parser.add_argument(flag_name(cls, f, default), *f.metadata.get("aliases", ()), dest=f.name, **kw)
            if tp is bool and default is True and not f.metadata.get("flag"):  # the switch as a value too
                dashed = f.name.replace("_", "-")
                parser.add_argument(f"--{dashed}", dest=f.name, type=_truth, metavar="true|false",
                                    default=argparse.SUPPRESS, help=f"--{dashed} false is --no-{dashed} (default: "
                                                                    "true)")


def _truth(text: str) -> bool:
    words = {"true": True, "on": True, "yes": True, "1": True, "false": False, "off": False, "no": False, "0": False}
    if text.lower() not in words:
        raise argparse.ArgumentTypeError(f"expected true or false, not {text!r}")
    return words[text.lower()]


def from_flags(cls, values: dict, only: tuple[str, ...] | None = None):
    """The config from the flags given (field name -> parsed value); every other field keeps
    its default, the fields of nested configs too."""
    kw = {}
    for f, tp in _flags(cls, only):
        if (sub := _nested(cls, f)) is not None:
            base = default_of(f)
            if base is None and not all(g.name in values for g in dataclasses.fields(sub) if default_of(g) is MISSING):
                continue  # an optional nested config left out (its required settings not given)
            made = from_flags(sub, values, f.metadata.get("flags"))
            if base in (MISSING, None):  # a required nested config (the model a command loads)
                kw[f.name] = made
            else:  # its factory's defaults, with what was given
                chosen = {g.name: getattr(made, g.name) for g in dataclasses.fields(sub) if g.name in values}
                kw[f.name] = dataclasses.replace(base, **chosen)
        elif f.name in values:
            value = values[f.name]
            kw[f.name] = tuple(value) if typing.get_origin(tp) is tuple else value
    return cls(**kw)


def flags_of(cls, defaults=None) -> dict[str, str]:
    """Field name -> flag, nested configs included: how a message names a setting."""
    out = {}
    for f, _ in _flags(cls):
        if (sub := _nested(cls, f)) is not None:
            base = default_of(f)
            out.update(flags_of(sub, None if base in (MISSING, None) else base))
        else:
            out[f.name] = flag_name(cls, f, getattr(defaults, f.name) if defaults is not None else MISSING)
    return out


def check(cfg) -> None:
    """Every bounded number and every choice of a config (nested ones too) in range: one clear
    PicochatError naming the flag, before any work starts."""
    from .common import PicochatError
    cls = type(cfg)
    for f in dataclasses.fields(cls):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            check(value)
            continue
        low, high, choices = f.metadata.get("low"), f.metadata.get("high"), f.metadata.get("choices")
        name = flag_name(cls, f) if f.metadata.get("cli", True) else f.name
        if choices is not None and value is not None and value not in choices:
            raise PicochatError(f"{name} must be one of {', '.join(map(str, choices))}, not {value!r}")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if value != value or (low is not None and value < low) or (high is not None and value > high):
            bounds = f"between {low} and {high}" if low is not None and high is not None else (
                f"at least {low}" if low is not None else f"at most {high}")
            raise PicochatError(f"{name} must be {bounds}, not {value}")


# ----------------------------------------------------------------------------- what defines a run

@dataclass(frozen=True)
class Leaf:
    """One setting of a config, nested configs opened: its path of field names from the top, its
    field, the config holding it and its default there."""
    path: tuple[str, ...]
    field: dataclasses.Field
    holder: object
    default: object

    @property
    def defines_run(self) -> bool:
        return self.field.metadata.get("defines_run", True)


def leaves(cfg, path: tuple[str, ...] = (), defaults=None) -> list[Leaf]:
    """Every setting of `cfg`, nested configs opened. A nested config's defaults are those of the
    instance its field's factory makes (SFT's optimizer decays over the whole stage, say)."""
    out = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        default = getattr(defaults, f.name) if defaults is not None else default_of(f)
        if dataclasses.is_dataclass(value):
            out += leaves(value, path + (f.name,), default if dataclasses.is_dataclass(default) else None)
        else:
            out.append(Leaf(path + (f.name,), f, cfg, default))
    return out


def record(cfg) -> dict:
    """A config as JSON-ready data: nested configs as objects, tuples and sets as lists."""
    def plain(value):
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, (list, tuple, set, frozenset)):
            return sorted(value) if isinstance(value, (set, frozenset)) else [plain(v) for v in value]
        return value
    return plain(cfg)


def typed(leaf: Leaf, value):
    """A recorded value back in its field's type (JSON has no tuples)."""
    tp = _types(type(leaf.holder))[leaf.field.name]
    return tuple(value) if typing.get_origin(tp) is tuple and isinstance(value, list) else value


def replaced(cfg, values: dict[tuple[str, ...], object]):
    """cfg with the settings at these paths replaced (nested configs copied, never changed)."""
    top: dict = {}
    nested: dict = {}
    for path, value in values.items():
        if len(path) == 1:
            top[path[0]] = value
        else:
            nested.setdefault(path[0], {})[path[1:]] = value
    for name, sub in nested.items():
        top[name] = replaced(getattr(cfg, name), sub)
    return dataclasses.replace(cfg, **top)

