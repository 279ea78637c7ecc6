"""Document sources: turn a list of files/directories into a stream of text documents.

Supported inputs, chosen by file extension:
  .txt      the whole file is one document, or (txt_split="paragraphs") it is split on blank
            lines and consecutive paragraphs are merged up to ~2000 characters, so a book becomes
            many documents of useful length instead of one huge one or thousands of 1-line scraps
  .jsonl    one JSON object per line with a `text` field
  .parquet  a `text` column (the FineWeb-Edu shard layout), read one row group at a time so a
            multi-GB shard never has to fit in memory

Directories are walked recursively in sorted order, so the same inputs always give the same
documents in the same order (the token cache and the train/val split depend on that).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

from picochat.common import PicochatError, log

SUPPORTED_SUFFIXES = (".txt", ".jsonl", ".parquet")
# what --data is for every command that reads text (pretrain, tokenizer train, data prepare, eval bpb, speedrun)
TEXT_FILES = "files or directories (.txt, .jsonl, .parquet with a `text` column)"
TXT_SPLITS = ("paragraphs", "file")
PARAGRAPH_CHARS = 2000  # merge paragraphs until a document reaches about this many characters

_BLANK_LINES = re.compile(r"\n[ \t\r\f\v]*\n")


def list_files(paths: list[str | Path] | str | Path) -> list[Path]:
    """Expand files and directories into the sorted list of supported files they name."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    if not paths:
        raise PicochatError("no data paths given")
    files: list[Path] = []
    for p in map(Path, paths):
        if not p.exists():
            raise PicochatError(f"data path not found: {p}")
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in SUPPORTED_SUFFIXES
                           and not f.name.startswith("."))
            if not found:
                raise PicochatError(f"no .txt/.jsonl/.parquet files under directory {p}")
            files.extend(found)
        elif p.suffix in SUPPORTED_SUFFIXES:
            files.append(p)
        else:
            raise PicochatError(f"unsupported data file {p} (expected .txt, .jsonl or .parquet)")
    return files


def strip_gutenberg(text: str) -> str:
    """Keep only the book between Project Gutenberg's `*** START OF ...` and `*** END OF ...` lines.

    The license boilerplate is identical in every PG file; left in, the model would memorise it."""
    start = text.find("*** START OF")
    if start != -1:
        nl = text.find("\n", start)
        text = text[nl + 1:] if nl != -1 else ""
    end = text.find("*** END OF")
    if end != -1:
        text = text[:end]
    return text


def split_paragraphs(text: str, target_chars: int = PARAGRAPH_CHARS) -> Iterator[str]:
    """Split on blank lines, then merge consecutive paragraphs up to ~target_chars characters."""
    acc: list[str] = []
    size = 0
    for para in _BLANK_LINES.split(text):
        para = para.strip()
        if not para:
            continue
        acc.append(para)
        size += len(para) + 2
        if size >= target_chars:
            yield "\n\n".join(acc)
            acc, size = [], 0
    if acc:
        yield "\n\n".join(acc)


NOT_TEXT_WARNING = 0.1  # warn when more than this fraction of a file's characters are not text


def not_text_fraction(text: str) -> float:
    """The fraction of characters that no text has: undecodable bytes (U+FFFD) and control
    characters other than whitespace."""
    if not text:
        return 0.0
    bad = text.count("\ufffd") + sum(1 for c in text if c < " " and c not in "\n\r\t\f\v")
    return bad / len(text)


def _read_txt(path: Path, txt_split: str) -> Iterator[str]:
    # utf-8-sig drops a byte-order mark; undecodable bytes become U+FFFD rather than aborting a run
    text = path.read_text(encoding="utf-8-sig", errors="replace").replace("\r\n", "\n")
    bad = not_text_fraction(text[:1_000_000])
    if bad > NOT_TEXT_WARNING:
        log(f"warning: {path} does not look like text: {bad:.0%} of its characters are undecodable bytes or "
            "control characters (is it a binary file?)")
    text = strip_gutenberg(text)
    if txt_split == "file":
        yield text
    else:
        yield from split_paragraphs(text)


def _read_jsonl(path: Path) -> Iterator[str]:
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise PicochatError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
            if not isinstance(row, dict) or "text" not in row:
                raise PicochatError(f"{path}:{lineno}: JSON object has no 'text' field")
            if not isinstance(row["text"], str):
                raise PicochatError(f"{path}:{lineno}: 'text' field is not a string")
            yield row["text"]


def _read_parquet(path: Path) -> Iterator[str]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid/OSError for corrupt or non-parquet files
        raise PicochatError(f"cannot read parquet file {path}: {e}") from None
    if "text" not in pf.schema_arrow.names:
        raise PicochatError(f"parquet file {path} has no 'text' column "
                            f"(columns: {', '.join(pf.schema_arrow.names)})")
    for rg in range(pf.num_row_groups):
        for text in pf.read_row_group(rg, columns=["text"]).column("text").to_pylist():
            if text is not None:
                yield text


def iter_file(path: Path, txt_split: str = "paragraphs") -> Iterator[str]:
    """Raw documents of one file (possibly empty strings; iter_documents filters those)."""
    if path.suffix == ".txt":
        return _read_txt(path, txt_split)
    if path.suffix == ".jsonl":
        return _read_jsonl(path)
    if path.suffix == ".parquet":
        return _read_parquet(path)
    raise PicochatError(f"unsupported data file {path}")


def iter_documents(paths: list[str | Path] | str | Path, txt_split: str = "paragraphs") -> Iterator[str]:
    """Yield the non-empty documents of every file, in a deterministic order."""
    if txt_split not in TXT_SPLITS:
        raise PicochatError(f"unknown txt_split {txt_split!r} (choose from {', '.join(TXT_SPLITS)})")
    files = list_files(paths)  # validate every path before yielding anything
    count = 0
    for path in files:
        for doc in iter_file(path, txt_split):
            if doc.strip():
                count += 1
                yield doc
    if count == 0:
        raise PicochatError(f"no non-empty documents in {', '.join(str(p) for p in files)}")
