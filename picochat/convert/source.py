"""What `picochat import --load` names: a local directory, or a Hub model repo (OWNER/NAME[@REVISION])
that is downloaded first; and which published layout its files are in:

    hf        config.json, model*.safetensors, tokenizer.json: transformers' NanoChat (model_type
              nanochat) or picochat's own export (model_type picochat, remote code)
    nanochat  model_NNNNNN.pt, meta_NNNNNN.json and tokenizer.pkl: nanochat's checkpoint dir, as
              karpathy/nanochat-d32 publishes it

Only what the import reads comes down: one checkpoint of a nanochat repo, not every step's."""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from pathlib import PurePosixPath

from ..common import PicochatError, log

FORMATS = ("hf", "nanochat")
_CHECKPOINT = re.compile(r"model_(\d+)\.pt")
HF_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
            "generation_config.json", "model*.safetensors", "model.safetensors.index.json")


def layout(names: list[str]) -> str | None:
    """Which format a folder's files (paths relative to it) are in, or None."""
    root = {n for n in names if "/" not in n}
    if "config.json" in root and any(n.startswith("model") and n.endswith(".safetensors") for n in root):
        return "hf"
    if any(_CHECKPOINT.fullmatch(PurePosixPath(n).name) for n in names):
        return "nanochat"
    return None


def describe(names: list[str], most: int = 12) -> str:
    shown = sorted(names)[:most]
    return ", ".join(shown) + (f" and {len(names) - most} more" if len(names) > most else "") if names else "no files"


def unknown_layout(where: str, names: list[str]) -> PicochatError:
    return PicochatError(f"{where} is in no layout picochat imports (transformers: config.json, model.safetensors, "
                         f"tokenizer.json; nanochat: model_NNNNNN.pt, meta_NNNNNN.json, tokenizer.pkl); it has "
                         f"{describe(names)}")


def check_format(where: str, names: list[str], given: str | None) -> str:
    """The layout the files are in, which must be the one asked for when one was."""
    found = layout(names)
    if found is None:
        raise unknown_layout(where, names)
    if given and given != found:
        raise PicochatError(f"--format {given}: {where} is in {found}'s layout ({describe(names, 4)}): "
                            f"use --format {found}, or leave --format out")
    return found


def nanochat_files(where: str, names: list[str], step: int | None) -> tuple[str, int, list[str]]:
    """(the folder holding the checkpoints, the step, the files to fetch) of a nanochat repo."""
    folders = sorted({str(PurePosixPath(n).parent) for n in names if _CHECKPOINT.fullmatch(PurePosixPath(n).name)})
    if len(folders) > 1:
        raise PicochatError(f"{where} has checkpoints in {len(folders)} folders ({', '.join(folders)}): picochat "
                            "imports a repo with one; download it and give --load the folder")
    folder = folders[0]
    prefix = "" if folder == "." else folder + "/"
    steps = sorted(int(m[1]) for n in names if n.startswith(prefix) and "/" not in n[len(prefix):]
                   and (m := _CHECKPOINT.fullmatch(n[len(prefix):])))
    step = step or steps[-1]
    if step not in steps:
        raise PicochatError(f"{where} has no checkpoint at step {step} (it has {', '.join(map(str, steps))})")
    meta = f"{prefix}meta_{step:06d}.json"
    if meta not in names:
        raise PicochatError(f"{where} has model_{step:06d}.pt but not its {meta}")
    # nanochat's reader looks for tokenizer.pkl beside the checkpoint or in a tokenizer/ folder above it
    tokenizers = [n for n in names if PurePosixPath(n).name == "tokenizer.pkl"]
    if not tokenizers:
        raise PicochatError(f"{where} has no tokenizer.pkl (it has {describe(names)})")
    return folder, step, [f"{prefix}model_{step:06d}.pt", meta, *tokenizers]


@dataclass
class Source:
    path: str  # the local folder the reader reads
    format: str
    origin: dict  # what the run dir records of where it came from
    step: int | None = None


def _files(where: str, names: list[str], given: str | None, step: int | None) -> tuple[str, str, int | None, list[str]]:
    """(format, the folder the reader reads, the step, the files it reads) of a repo's files."""
    fmt = check_format(where, names, given)
    if fmt == "nanochat":
        return (fmt, *nanochat_files(where, names, step))
    return fmt, ".", step, [n for n in names if any(fnmatch.fnmatch(n, p) for p in HF_FILES)]


def from_hub(repo: str, revision: str, given: str | None, step: int | None) -> Source:
    """Download what the import needs of a Hub model repo into the client's cache; where the Hub
    cannot be reached (offline, HF_HUB_OFFLINE=1), what an earlier import left in the cache."""
    from ..data.hub import HubUnreachable, cached_model, download_model, endpoint, model_files
    at = repo + (f"@{revision}" if revision != "main" else "")
    try:
        commit, sizes = model_files(repo, revision)
    except HubUnreachable:
        if (snapshot := cached_model(repo, revision)) is None:
            raise
        names = [str(p.relative_to(snapshot)) for p in snapshot.rglob("*") if p.is_file()]
        fmt, folder, step, _ = _files(f"the cached {at}", names, given, step)
        log(f"import: the Hub cannot be reached; the cached {at} (commit {snapshot.name[:10]}) is in the Hub "
            "client's cache")
        return Source(str(snapshot / folder), fmt, {"hub": repo, "revision": revision, "commit": snapshot.name}, step)
    where = f"the Hub's {at}"
    fmt, folder, step, wanted = _files(where, list(sizes), given, step)
    total = sum(sizes.get(n) or 0 for n in wanted)
    log(f"import: {where} is in {fmt}'s layout; fetching {len(wanted)} files ({total / 2**20:,.1f} MiB) of commit "
        f"{commit[:10]} from {endpoint()} into the Hub client's cache")
    snapshot = download_model(repo, revision, wanted)
    origin = {"hub": repo, "revision": revision, "commit": snapshot.name, "endpoint": endpoint()}
    return Source(str(snapshot / folder), fmt, origin, step)
