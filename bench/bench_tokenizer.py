"""Tokenizer benchmark: training time and encoding speed, ours vs Hugging Face `tokenizers`.

    python bench/bench_tokenizer.py            # 50 MB of English text
    python bench/bench_tokenizer.py --mb 10    # a quick run

Training: ours (rustbpe) vs HF BpeTrainer with the same split regex and byte-level alphabet.
Encoding: ours encode_batch (tiktoken, N threads), tiktoken one thread, HF encode_batch (on the
tokenizer.json we saved, so both sides use the very same merges). Text: the Gutenberg books in
../shared/data/pretrain_text, repeated until --mb megabytes. The machine is shared and noisy:
compare rows of one run, not absolute numbers across runs.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from picochat.tokenizer import SPECIAL_TOKENS, SPLIT_PATTERN, Tokenizer  # noqa: E402

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "pretrain_text" / "gutenberg"


def load_documents(mb: float, doc_chars: int = 16_000) -> list[str]:
    """Paragraph-aligned documents of about doc_chars characters, repeated up to mb megabytes."""
    if not DATA.is_dir():
        sys.exit(f"error: benchmark data not found at {DATA}")
    docs = []
    for path in sorted(DATA.glob("*.txt")):
        text = path.read_text(encoding="utf-8", errors="replace")
        buf, size = [], 0
        for para in text.split("\n\n"):
            buf.append(para + "\n\n")
            size += len(para) + 2
            if size >= doc_chars:
                docs.append("".join(buf))
                buf, size = [], 0
        if buf:
            docs.append("".join(buf))
    target = int(mb * 1e6)
    out, total = [], 0
    while total < target:  # repeat the books when more text is asked for than there is
        for d in docs:
            if total >= target:
                break
            out.append(d)
            total += len(d.encode("utf-8"))
    return out


def hf_train(docs: list[str], vocab_size: int):
    from tokenizers import Regex, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=0,
        show_progress=False,
    )
    hf.train_from_iterator(docs, trainer=trainer)
    return hf


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=float, default=50.0, help="megabytes of text (default 50)")
    ap.add_argument("--vocab", type=int, nargs="+", default=[8192, 32768], help="vocab sizes")
    ap.add_argument("--threads", type=int, default=2, help="threads for our encode_batch")
    ap.add_argument("--skip-hf-train", action="store_true", help="skip the (slower) HF training")
    args = ap.parse_args()

    import tokenizers

    docs = load_documents(args.mb)
    nbytes = sum(len(d.encode("utf-8")) for d in docs)
    mb = nbytes / 1e6
    print(f"text: {mb:.1f} MB in {len(docs):,} documents\n")

    train_rows, enc_rows = [], []
    for vocab in args.vocab:
        tok, t_ours = timed(lambda: Tokenizer.train(docs, vocab))
        t_hf = None
        if not args.skip_hf_train:
            _, t_hf = timed(lambda: hf_train(docs, vocab))
        train_rows.append((vocab, t_ours, t_hf))

        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "tokenizer.json"
            tok.save(path)
            hf = tokenizers.Tokenizer.from_file(str(path))
        ids, t_batch = timed(lambda: tok.encode_batch(docs, num_threads=args.threads))
        ids1, t_single = timed(lambda: [tok.enc.encode_ordinary(d) for d in docs])
        enc, t_hf_enc = timed(lambda: hf.encode_batch(docs, add_special_tokens=False))
        same = ids == ids1 == [e.ids for e in enc]
        ntok = sum(map(len, ids))
        enc_rows.append((vocab, nbytes / ntok, mb / t_batch, mb / t_single, mb / t_hf_enc, same))

    print(f"### Training time, {mb:.0f} MB of English text\n")
    print("| vocab | ours (rustbpe) | HF tokenizers BpeTrainer | speedup |")
    print("|---:|---:|---:|---:|")
    for vocab, t_ours, t_hf in train_rows:
        hf_cell = f"{t_hf:.1f} s" if t_hf is not None else "-"
        speed = f"{t_hf / t_ours:.1f}x" if t_hf is not None else "-"
        print(f"| {vocab:,} | {t_ours:.1f} s | {hf_cell} | {speed} |")

    print(f"\n### Encoding speed (MB/s), {mb:.0f} MB\n")
    print(f"| vocab | bytes/token | ours encode_batch ({args.threads} threads) | tiktoken 1 thread "
          "| HF encode_batch | identical ids |")
    print("|---:|---:|---:|---:|---:|:---:|")
    for vocab, bpt, r_batch, r_single, r_hf, same in enc_rows:
        print(f"| {vocab:,} | {bpt:.2f} | {r_batch:.1f} | {r_single:.1f} | {r_hf:.1f} | {'yes' if same else 'NO'} |")


if __name__ == "__main__":
    main()
