"""Rebuild tests/data from the full datasets (../shared/data, or --source DIR): the same layout,
a few hundred KB of real rows. The tests read these; README.md says where each comes from.

    python tests/data/make_excerpts.py [--source ../shared/data]

Text is stored gzipped (tests/conftest.py unpacks it once per session). Every excerpt is the
first rows of its file, unless a test needs a particular row too (named below)."""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
from pathlib import Path

import pyarrow as pa

HERE = Path(__file__).resolve().parent
TEXTS = {  # file -> characters kept
    "tinyshakespeare/input.txt": 190_000,
    **{f"pretrain_text/gutenberg/{b}": 60_000 for b in ("11-0.txt", "84-0.txt", "1342-0.txt", "4300-0.txt",
                                                          "5200.txt")},
    **{f"pretrain_text/gutenberg/{b}": 30_000 for b in ("2600-0.txt", "2701-0.txt", "1232.txt")},
}
JSONL = {  # file -> (first rows kept, extra row numbers kept)
    **{f"arc/ARC-{s}-{split}.jsonl": (12, ()) for s in ("Easy", "Challenge") for split in ("train", "validation",
                                                                                         "test")},
    "arc/ARC-Easy-train.jsonl": (12, (289, 753)),  # a 3-choice and a 5-choice item
    "gsm8k/train.jsonl": (50, ()),
    "gsm8k/test.jsonl": (20, ()),
    **{f"core_eval_bundle/eval_data/{f}": (40, ()) for f in (
        "commonsense_reasoning/copa.jsonl", "world_knowledge/arc_easy.jsonl", "world_knowledge/jeopardy_all.jsonl",
        "language_understanding/winograd_wsc.jsonl", "language_understanding/lambada_openai.jsonl")},
}
MMLU = {"anatomy": {"dev": 5, "validation": 14, "test": 30}, "astronomy": {"dev": 5, "validation": 8, "test": 20}}
COPIED = ["core_eval_bundle/core.yaml", "core_eval_bundle/eval_meta_data.csv", "gsm8k/LICENSE", "humaneval/LICENSE"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--source", default=str(HERE.parents[2] / "shared" / "data"))
    src = Path(ap.parse_args().source)
    for name, chars in TEXTS.items():
        text = (src / name).read_text(encoding="utf-8", errors="replace")[:chars]
        out = HERE / (name + ".gz")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(gzip.compress(text.encode("utf-8"), mtime=0))
    for name, (first, extra) in JSONL.items():
        lines = (src / name).read_text(encoding="utf-8").splitlines(keepends=True)
        out = HERE / name
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("".join(lines[:first] + [lines[i] for i in extra]), encoding="utf-8")
    for name in COPIED:
        (HERE / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / name, HERE / name)
    # MMLU: the HF save_to_disk layout (arrow streams) and the CSV re-export, two subjects
    for subject, splits in MMLU.items():
        for split, n in splits.items():
            with pa.OSFile(str(src / "mmlu/hf_arrow_mmlu_no_train" / subject / split / "data-00000-of-00001.arrow"),
                           "rb") as f:
                table = pa.ipc.open_stream(f).read_all().slice(0, n)
            out = HERE / "mmlu/hf_arrow_mmlu_no_train" / subject / split / "data-00000-of-00001.arrow"
            out.parent.mkdir(parents=True, exist_ok=True)
            with pa.OSFile(str(out), "wb") as f, pa.ipc.new_stream(f, table.schema) as w:
                w.write_table(table)
            if split != "validation":
                csv = f"mmlu/csv_haechan/{split}/{subject}_{split}.csv"
                lines = (src / csv).read_text(encoding="utf-8").splitlines(keepends=True)
                (HERE / csv).parent.mkdir(parents=True, exist_ok=True)
                (HERE / csv).write_text("".join(lines[:n + 1]), encoding="utf-8")  # + the header
    # HumanEval: the first 40 problems, gzipped JSONL as upstream
    with gzip.open(src / "humaneval/HumanEval.jsonl.gz", "rt", encoding="utf-8") as f:
        rows = [line for _, line in zip(range(40), f)]
    (HERE / "humaneval/HumanEval.jsonl.gz").write_bytes(gzip.compress("".join(rows).encode("utf-8"), mtime=0))
    # the word list: every 300th word (CRLF endings kept, as upstream)
    words = (src / "words/words_alpha.txt").read_bytes().split(b"\r\n")
    (HERE / "words").mkdir(exist_ok=True)
    (HERE / "words/words_alpha.txt").write_bytes(b"\r\n".join(words[::300]) + b"\r\n")
    # ShareGPT-layout chat: the first 30 conversations
    convs = json.loads((src / "chat/fastchat/dummy_conversation.json").read_text(encoding="utf-8"))[:30]
    (HERE / "chat/fastchat").mkdir(parents=True, exist_ok=True)
    (HERE / "chat/fastchat/dummy_conversation.json").write_text(json.dumps(convs, ensure_ascii=False, indent=1))
    total = sum(p.stat().st_size for p in HERE.rglob("*") if p.is_file())
    print(f"tests/data: {total / 1e3:.0f} KB")


if __name__ == "__main__":
    main()
