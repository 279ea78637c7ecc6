"""The data dir: one directory where every dataset lives under its own name, so that the tasks,
the evals, `--eval-data` and the report find their files with no further flags.

    <data dir>/arc/  gsm8k/  mmlu/  humaneval/  words/words_alpha.txt  smoltalk/  core_eval_bundle/

The data dir is --data-dir / --eval-data where a command takes one, else $PICOCHAT_DATA, else
~/.cache/picochat/data (`picochat data download` fills it). ../shared/data has the same layout.
"""

from __future__ import annotations

import os
from pathlib import Path

DATA_ENV = "PICOCHAT_DATA"

# dataset name -> its place in the data dir
LOCATIONS = {
    "arc": "arc",
    "gsm8k": "gsm8k",
    "mmlu": "mmlu",
    "humaneval": "humaneval",
    "words": "words/words_alpha.txt",
    "smoltalk": "smoltalk",
    "core": "core_eval_bundle",
}


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
