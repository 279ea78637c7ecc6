"""The data dir, and every dataset picochat can fetch into it: one table, one place for each fact.

    <data dir>/fineweb-edu/  climbmix/  smoltalk/  mmlu/  gsm8k/  arc/  humaneval/
               words/words_alpha.txt  core_eval_bundle/

The data dir is --data-dir / --eval-data where a command takes one, else $PICOCHAT_DATA, else
~/.cache/picochat/data. Every task, eval and the report find their files there with no further
flags; ../shared/data and tests/data have the same layout (with other copies of some sets: JSONL
for ARC and GSM8K, arrow for MMLU, which the tasks read as well).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

DATA_ENV = "PICOCHAT_DATA"


@dataclass(frozen=True)
class HubParquet:
    """A Hub dataset's parquet export: (config, splits) pairs. Files land in the dataset's place as
    <split>-NNNNN.parquet (under <config>/ when `by_config`)."""
    repo: str
    configs: tuple[tuple[str, tuple[str, ...]], ...]
    by_config: bool = False


@dataclass(frozen=True)
class HubShards:
    """Pretraining shards shard_NNNNN.parquet in a Hub dataset repo (nanochat's layout); `count`
    shards exist, and --num-shards takes the first few (nanochat keeps the last for validation)."""
    repo: str
    count: int
    chars_per_shard: float  # what a shard holds, for planning how many a run needs


FILES_ENV = "PICOCHAT_FILES_URL"


@dataclass(frozen=True)
class Url:
    """A file at a plain URL; a zip is unpacked in place. $PICOCHAT_FILES_URL, if set, is a base
    URL to fetch every such file from instead, by its file name (a mirror, as HF_ENDPOINT is for
    the Hub's files)."""
    url: str
    unzip: bool = False

    def resolved(self) -> str:
        base = os.environ.get(FILES_ENV)
        return f"{base.rstrip('/')}/{self.url.rsplit('/', 1)[1]}" if base else self.url


@dataclass(frozen=True)
class Dataset:
    name: str
    place: str  # where it lives in the data dir
    source: HubParquet | HubShards | Url
    about: str
    mb: float  # about how much it downloads (for the plan; shards: per shard)


CORE_BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"
WORDS_URL = "https://raw.githubusercontent.com/dwyl/english-words/refs/heads/master/words_alpha.txt"
_ARC_SPLITS = ("train", "validation", "test")
DATASETS = {d.name: d for d in [
    Dataset("fineweb-edu", "fineweb-edu", HubShards("karpathy/fineweb-edu-100b-shuffle", 1823, 250e6),
            "FineWeb-Edu, nanochat's 100B-token shuffle (pretraining)", 95),
    Dataset("climbmix", "climbmix", HubShards("karpathy/climbmix-400b-shuffle", 6543, 250e6),
            "ClimbMix, the 400B-token shuffle nanochat moved to in 2026 (pretraining)", 95),
    Dataset("smoltalk", "smoltalk", HubParquet("HuggingFaceTB/smol-smoltalk", (("default", ("train", "test")),)),
            "SmolTalk (smol), 460K general conversations", 420),
    Dataset("mmlu", "mmlu", HubParquet("cais/mmlu", (("all", ("auxiliary_train", "dev", "validation", "test")),),
                                       by_config=True),
            "MMLU, all 57 subjects, with auxiliary_train", 160),
    Dataset("gsm8k", "gsm8k", HubParquet("openai/gsm8k", (("main", ("train", "test")),)),
            "GSM8K grade-school math", 3),
    Dataset("arc", "arc", HubParquet("allenai/ai2_arc", (("ARC-Easy", _ARC_SPLITS), ("ARC-Challenge", _ARC_SPLITS)),
                                     by_config=True),
            "ARC-Easy and ARC-Challenge", 2),
    Dataset("humaneval", "humaneval", HubParquet("openai/openai_humaneval", (("openai_humaneval", ("test",)),)),
            "HumanEval, 164 Python problems", 0.1),
    Dataset("words", "words/words_alpha.txt", Url(WORDS_URL), "an English word list (the spelling task)", 4),
    Dataset("core", "core_eval_bundle", Url(CORE_BUNDLE_URL, unzip=True),
            "the DCLM CORE eval bundle, as nanochat uses it", 170),
]}
GROUPS = {"chat": ("smoltalk", "mmlu", "gsm8k", "arc", "humaneval", "words", "core")}  # every chat/eval set
LOCATIONS = {name: d.place for name, d in DATASETS.items()}


def data_dir(given: str | os.PathLike | None = None) -> Path:
    """The data dir: `given`, else $PICOCHAT_DATA, else ~/.cache/picochat/data."""
    if given:
        return Path(given).expanduser()
    if os.environ.get(DATA_ENV):
        return Path(os.environ[DATA_ENV]).expanduser()
    return Path.home() / ".cache" / "picochat" / "data"


def dataset_path(name: str, given: str | os.PathLike | None = None) -> Path:
    """Where dataset `name` lives in the data dir (it may not be there yet)."""
    return data_dir(given) / LOCATIONS[name]


def shard_files(name: str, given: str | os.PathLike | None = None) -> list[Path]:
    """The pretraining shards of dataset `name` in the data dir, in order."""
    return sorted(dataset_path(name, given).glob("shard_*.parquet"))


def is_present(name: str, given: str | os.PathLike | None = None, shards: int = 0) -> bool:
    """Whether the data dir holds the dataset (for shards: at least `shards` of them)."""
    path = dataset_path(name, given)
    if isinstance(DATASETS[name].source, HubShards):
        return len(shard_files(name, given)) >= max(shards, 1)
    return path.exists() and (path.is_file() or any(path.iterdir()))
