"""ARC (AI2 Reasoning Challenge), Easy and Challenge, as lettered multiple choice.

Reads the HF `allenai/ai2_arc` records: {"question", "choices": {"text": [...], "label": [...]},
"answerKey"}. Items have 3 to 5 choices and some are labelled "1".."4" instead of "A".."D"; every
item is re-lettered A, B, C... by position, so the model only ever answers with a letter.
"""

from __future__ import annotations

from pathlib import Path

from picochat.common import PicochatError
from picochat.tasks.base import MultipleChoiceTask, multiple_choice, read_records

SUBSETS = ("Easy", "Challenge")


def arc_files(path: Path, split: str, subset: str | None) -> list[Path]:
    """A file, or a directory in the jsonl export layout (ARC-Easy-train.jsonl) or the HF parquet
    layout (ARC-Easy/train-00000-of-00001.parquet)."""
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise PicochatError(f"arc: path not found: {path}")
    files = []
    for sub in ([subset] if subset else SUBSETS):
        files += sorted(path.glob(f"ARC-{sub}-{split}.jsonl")) + sorted(path.glob(f"ARC-{sub}/{split}-*.parquet"))
    if not files:
        raise PicochatError(f"arc: no {subset or 'Easy/Challenge'} {split!r} split under {path}")
    return files


class ARC(MultipleChoiceTask):
    def __init__(self, path: str | Path, split: str = "train", subset: str | None = None):
        if subset is not None and subset not in SUBSETS:
            raise PicochatError(f"arc: unknown subset {subset!r} (expected {' or '.join(SUBSETS)})")
        self.name = f"arc-{subset.lower()}" if subset else "arc"
        examples = []
        for file in arc_files(Path(path), split, subset):
            for i, rec in enumerate(read_records(file, ("question", "choices", "answerKey"), what="arc")):
                labels, texts = rec["choices"]["label"], rec["choices"]["text"]
                if rec["answerKey"] not in labels:
                    raise PicochatError(f"arc: {file}: record {i}: answerKey {rec['answerKey']!r} "
                                        f"is not one of the labels {labels}")
                examples.append(multiple_choice(rec["question"], texts, labels.index(rec["answerKey"]),
                                                id=rec.get("id")))
        super().__init__(examples)
