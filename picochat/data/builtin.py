"""The builtin offline corpus: real English text gathered from what this machine already has.

`picochat speedrun` must work on a machine with no network and no data. Every Python install
carries a few MB of carefully written English: the language reference help topics
(pydoc_data), the docstrings of the standard library, and the READMEs/long descriptions of the
installed packages. That is enough to train a tokenizer and a tiny model end to end.

Docstrings are read by parsing source files with `ast`, never by importing modules: importing
parts of the stdlib has side effects (antigravity opens a browser, `this` prints, tkinter needs
a display). The order is sorted everywhere, so a given machine always builds the same corpus.
Output is plain .txt (documents separated by blank lines) plus SOURCES.md, so it can be read.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.metadata
import os
import re
import sysconfig
import time
from pathlib import Path

from picochat.common import PicochatError, log, write_atomic

MIN_CHARS = 200  # shorter fragments ("Return self.") teach little and are mostly boilerplate
MAX_FILE_BYTES = 2_000_000  # skip huge doc files (generated references, vendored bundles)
PER_PACKAGE_DOCSTRING_CHARS = 400_000  # so one big library (torch) does not dominate
# Parsing is the slow part (~1 MB of source per second): read at most this much source per
# package, so the build stays fast however many big packages (torch, sympy) are installed.
PER_PACKAGE_SOURCE_BYTES = 600_000
MAX_SOURCE_FILE_BYTES = 300_000  # larger sources are generated tables, not documentation

# stdlib parts that are tests, tools or vendored code rather than documentation-quality prose
_SKIP_DIRS = {"test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages", "turtledemo",
              "__pycache__", "_vendor", "vendor", "_vendored", "testing", "benchmarks"}
_DOC_SUFFIXES = {".md", ".rst", ".txt"}
_SKIP_DOC_NAMES = re.compile(r"(licen[cs]e|copying|notice|authors|record|top_level|entry_points|"
                             r"requires|sources|dependency_links|installer|requested|wheel|"
                             r"namespace_packages|not-zip-safe|direct_url)", re.I)


def _clean(text: str) -> str:
    text = text.replace("\r\n", "\n").replace("\t", "    ")
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def _is_prose(para: str) -> bool:
    """Mostly letters: keeps English sentences, drops code, JSON, tables and number dumps."""
    chars = "".join(para.split())
    return bool(chars) and sum(c.isalpha() for c in chars) / len(chars) >= 0.85


def _prose(text: str) -> str:
    """Keep only the prose paragraphs of a text (docs mix prose with code blocks and tables)."""
    return "\n\n".join(p.strip("\n") for p in re.split(r"\n\s*\n", _clean(text)) if _is_prose(p))


class _Collector:
    """Accumulate unique documents for one output file."""

    def __init__(self, seen: set[bytes], budget: int):
        self.docs: list[str] = []
        self.chars = 0
        self.seen = seen  # shared across files: the same README shipped twice counts once
        self.budget = budget

    @property
    def full(self) -> bool:
        return self.chars >= self.budget

    def add(self, text: str) -> bool:
        text = _prose(text)
        if len(text) < MIN_CHARS or self.full:
            return False
        key = hashlib.sha1(" ".join(text.split()).encode()).digest()
        if key in self.seen:
            return False
        self.seen.add(key)
        self.docs.append(text)
        self.chars += len(text) + 2
        return True


def _python_topics(col: _Collector) -> None:
    from pydoc_data.topics import topics  # the text behind help('FOR'), help('if'), ...

    for name in sorted(topics):
        col.add(topics[name])


def _skip_path(rel: Path) -> bool:
    return any(part in _SKIP_DIRS or part.startswith("test_") for part in rel.parts)


def _docstrings(path: Path) -> list[str]:
    """Module, class and function docstrings of one source file, in source order."""
    try:
        data = path.read_bytes()
        if len(data) > MAX_SOURCE_FILE_BYTES or (b'"""' not in data and b"'''" not in data):
            return []  # too big to be hand-written, or no triple-quoted docstring to find
        tree = ast.parse(data, filename=str(path))
    except (SyntaxError, ValueError, OSError, UnicodeDecodeError, RecursionError):
        return []  # py2-only or templated sources in some packages
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc:
                out.append(doc)
    return out


def _source_files(root: Path) -> list[Path]:
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel = Path(dirpath).relative_to(root)
        if _skip_path(rel):
            dirnames[:] = []
            continue
        dirnames.sort()
        files.extend(Path(dirpath) / f for f in sorted(filenames)
                     if f.endswith(".py") and not f.startswith("test_"))
    return sorted(files)


def _stdlib_docstrings(col: _Collector) -> None:
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in _source_files(root):
        for doc in _docstrings(path):
            col.add(doc)


def _distributions() -> list[importlib.metadata.Distribution]:
    by_name = {}
    for dist in importlib.metadata.distributions():
        name = (dist.metadata["Name"] or "").lower()
        if name and name not in by_name:  # the first on sys.path wins, as for imports
            by_name[name] = dist
    return [by_name[n] for n in sorted(by_name)]


def _package_docs(col: _Collector, dists: list[importlib.metadata.Distribution]) -> None:
    for dist in dists:
        desc = dist.metadata.get_payload() or dist.metadata.get("Description") or ""
        col.add(desc)
        for f in sorted(dist.files or [], key=str):
            if (f.suffix.lower() not in _DOC_SUFFIXES or _SKIP_DOC_NAMES.search(f.name)
                    or _skip_path(Path(*f.parts[:-1]))):
                continue
            try:
                path = Path(dist.locate_file(f))
                if path.stat().st_size > MAX_FILE_BYTES:
                    continue
                text = path.read_text(encoding="utf-8", errors="replace")
            except OSError:
                continue
            col.add(text)


def _package_docstrings(col: _Collector, dists: list[importlib.metadata.Distribution]) -> None:
    """Docstrings of installed packages' Python sources, up to a per-package share of the budget."""
    done: set[Path] = set()
    for dist in dists:
        roots = set()
        for f in dist.files or []:
            if (f.suffix == ".py" and len(f.parts) > 1 and f.parts[0] != ".."
                    and not f.parts[0].endswith((".dist-info", ".data"))):
                roots.add(Path(dist.locate_file(f.parts[0])))
        for root in sorted(roots):
            if col.full or root in done or not root.is_dir():
                continue
            done.add(root)
            start, parsed = col.chars, 0
            for path in _source_files(root):
                if (col.full or col.chars - start >= PER_PACKAGE_DOCSTRING_CHARS
                        or parsed >= PER_PACKAGE_SOURCE_BYTES):
                    break
                parsed += path.stat().st_size
                for doc in _docstrings(path):
                    col.add(doc)


CORPUS_CHARS = 8_000_000  # the offline corpus's size, about (mostly ASCII: characters ~ bytes)


def build_builtin_corpus(out_dir: str | Path, max_bytes: int = CORPUS_CHARS) -> list[Path]:
    """Write the offline corpus into out_dir as a few .txt files (+ SOURCES.md); returns the .txt paths.

    Sources in priority order, each filling what the earlier ones left of max_bytes (characters,
    which for this almost-ASCII text is about bytes):
      python_topics.txt       pydoc_data.topics: the language reference help topics
      stdlib_docstrings.txt   docstrings of the standard library (ast-parsed, not imported)
      package_docs.txt        long descriptions and .md/.rst/.txt docs of installed distributions
      package_docstrings.txt  docstrings of installed packages' sources (capped per package)
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    seen: set[bytes] = set()
    dists = _distributions()
    plan = [
        ("python_topics.txt", "pydoc_data.topics (Python language reference help topics)", _python_topics),
        ("stdlib_docstrings.txt", f"docstrings of the standard library in {sysconfig.get_paths()['stdlib']}",
         _stdlib_docstrings),
        ("package_docs.txt", "long descriptions (METADATA) and .md/.rst/.txt docs of installed "
         "distributions (importlib.metadata)", lambda c: _package_docs(c, dists)),
        ("package_docstrings.txt", "docstrings of installed packages' Python sources (ast-parsed)",
         lambda c: _package_docstrings(c, dists)),
    ]
    used = 0
    paths: list[Path] = []
    rows: list[str] = []
    for name, where, gather in plan:
        if used >= max_bytes:
            break
        col = _Collector(seen, budget=max_bytes - used)
        gather(col)
        if not col.docs:
            continue
        text = "\n\n".join(col.docs) + "\n"
        path = out_dir / name
        write_atomic(path, text)
        paths.append(path)
        used += col.chars
        size = path.stat().st_size
        rows.append(f"| {name} | {len(col.docs):,} | {size:,} | {where} |")
    if not paths:
        raise PicochatError("could not gather any builtin text from this Python installation")
    total = sum(p.stat().st_size for p in paths)
    sources = ("# picochat builtin corpus\n\n"
               "Real English text gathered offline from this machine's Python installation by\n"
               "`picochat.data.builtin.build_builtin_corpus`. Documents are separated by blank lines;\n"
               "exact duplicates and fragments under {} characters were dropped.\n\n"
               "| file | documents | bytes | source |\n|---|---|---|---|\n{}\n\n"
               "Total: {:,} bytes. Python {}.\n").format(MIN_CHARS, "\n".join(rows), total,
                                                        sysconfig.get_python_version())
    write_atomic(out_dir / "SOURCES.md", sources)
    log(f"builtin corpus: {len(paths)} files, {total / 1e6:.1f} MB in {out_dir} "
        f"({time.perf_counter() - t0:.1f}s)")
    return paths
