"""Tokenizer: training, the HF tokenizer.json round trip, special tokens, exact round trips."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from picochat.common import PicochatError
from picochat.tokenizer import (
    EVAL_SAMPLES,
    MIN_VOCAB_SIZE,
    SPECIAL_TOKENS,
    SPLIT_PATTERN,
    Tokenizer,
    eval_tokenizer,
    format_eval_table,
)

from .conftest import TEST_DATA as DATA  # noqa: E402
GUTENBERG = DATA / "pretrain_text" / "gutenberg"

# Books with plenty of non-ASCII (Ulysses, War and Peace) next to plain ones.
TRAIN_BOOKS = ["11-0.txt", "84-0.txt", "1342-0.txt", "4300-0.txt"]
TEST_BOOKS = ["2600-0.txt", "2701-0.txt", "1232.txt"]
TRAIN_CHARS = 240_000  # all of the four excerpts
VOCAB = 2048


def read_book(name: str, limit: int | None = None) -> str:
    return (GUTENBERG / name).read_text(encoding="utf-8", errors="replace")[:limit]


def train_texts() -> list[str]:
    # Split books into paragraph-sized documents, as a real corpus would arrive.
    docs, total = [], 0
    for name in TRAIN_BOOKS:
        for para in read_book(name).split("\n\n"):
            if total >= TRAIN_CHARS:
                return docs
            docs.append(para + "\n\n")
            total += len(para) + 2
    return docs


# Hand-written edge cases: unicode scripts, emoji (incl. ZWJ sequences and flags), numbers,
# code, whitespace runs, contractions, control chars, and special-token lookalikes.
EDGE_TEXTS = [
    "",
    " ",
    "   \n\n\t\t  \r\n  ",
    "Hello world! It's, we'll, THEY'RE, I'M, you'Ve",
    "1 12 123 1234 12345 3.14159 1,000,000 ٣٤٥ ¼ ²³ 0x1F 1e-9",
    "def f(x):\n    return {'a': [x ** 2 for x in range(10)]}  # comment\n\n\n",
    "    indented\n\t\ttabbed   trailing   \n",
    "Ünïcödé — “quotes” ‘single’ … naïve café résumé",
    "敏捷的棕色狐狸跳过了懒狗。素早い茶色の狐。빠른 갈색 여우. Быстрая лиса. الثعلب البني",
    "🦊💨🐕 👩‍👩‍👧‍👦 🇫🇷🇯🇵 ❤️ a\u0301 e\u0308 \u200b\u200d\ufeff",
    "\x00\x01\x7f control \x1b[31mred\x1b[0m",
    "<|bos|> <|user_start|>hi<|user_end|> <|assistant_end|>",
    "a" * 500 + " " + "ab" * 300,
    "!!!???...,,,;;;---___===+++***",
]


def varied_texts() -> list[str]:
    texts = list(EDGE_TEXTS) + list(EVAL_SAMPLES.values())
    for name in TEST_BOOKS:
        texts.append(read_book(name))
    with gzip.open(DATA / "humaneval" / "HumanEval.jsonl.gz", "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    texts += [r["prompt"] + r["canonical_solution"] + r["test"] for r in rows]
    with open(DATA / "gsm8k" / "test.jsonl", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    texts += [r["question"] + "\n" + r["answer"] for r in rows]
    return texts


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(train_texts(), VOCAB)


@pytest.fixture(scope="module")
def saved(tok, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(path)
    return path


# ----------------------------------------------------------------------------- layout

def test_vocab_layout_and_specials(tok):
    assert tok.vocab_size == VOCAB
    n = VOCAB - len(SPECIAL_TOKENS)
    # specials are the last ids, in SPECIAL_TOKENS order
    assert [tok.special_id(name) for name in SPECIAL_TOKENS] == list(range(n, VOCAB))
    assert tok.bos_id == n
    # the first 256 ids are the bytes
    assert [tok.token_bytes(i) for i in range(256)] == [bytes([i]) for i in range(256)]
    assert tok.token_bytes(tok.bos_id) == b"<|bos|>"
    with pytest.raises(PicochatError, match="unknown special token"):
        tok.special_id("<|nope|>")
    with pytest.raises(PicochatError):
        tok.token_bytes(VOCAB)


def test_special_strings_in_text_are_ordinary(tok):
    for name in SPECIAL_TOKENS:
        ids = tok.encode(f"before {name} after")
        assert all(i < VOCAB - len(SPECIAL_TOKENS) for i in ids), name
        assert tok.decode(ids) == f"before {name} after"
    assert tok.decode([tok.bos_id]) == "<|bos|>"


def test_vocab_too_small():
    with pytest.raises(PicochatError, match=str(MIN_VOCAB_SIZE)):
        Tokenizer.train(["hello world"], MIN_VOCAB_SIZE - 1)
    # exactly bytes + specials (no merges) is allowed
    small = Tokenizer.train(["hello world"] * 3, MIN_VOCAB_SIZE)
    assert small.vocab_size == MIN_VOCAB_SIZE
    assert small.decode(small.encode("hello wörld")) == "hello wörld"


def test_token_byte_lengths(tok):
    lengths = tok.token_byte_lengths()
    assert len(lengths) == VOCAB
    assert lengths[:256] == [1] * 256
    assert lengths[-len(SPECIAL_TOKENS):] == [0] * len(SPECIAL_TOKENS)
    assert all(lengths[i] == len(tok.token_bytes(i)) for i in range(VOCAB - len(SPECIAL_TOKENS)))
    for text in varied_texts()[:30]:
        assert sum(lengths[i] for i in tok.encode(text)) == len(text.encode("utf-8"))


def test_compresses_english(tok):
    text = read_book(TEST_BOOKS[1])
    ratio = len(text.encode("utf-8")) / len(tok.encode(text))
    assert 2.2 < ratio < 5.0, ratio  # 2.4 bytes/token on Moby Dick at vocab 2048 from 240K chars (4.4 at 32k)


# ----------------------------------------------------------------------------- encode/decode

def test_encode_batch_matches_encode(tok):
    texts = varied_texts()
    expected = [tok.encode(t) for t in texts]
    assert tok.encode_batch(texts) == expected
    assert tok.encode_batch(texts, num_threads=1) == expected


def test_round_trip_varied(tok):
    for text in varied_texts():
        assert tok.decode(tok.encode(text)) == text


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text())
def test_round_trip_any_unicode(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_decode_cut_character_replaces(tok):
    ids = tok.encode("🦊")
    assert tok.decode(ids[:-1]).endswith("\ufffd") or len(ids) == 1


def test_matches_rustbpe_encoding(tok):
    """rustbpe applies its merge list pair by pair; our tiktoken encoder merges by rank.
    Retrain an identical rustbpe tokenizer and check both give the same ids on real text."""
    rustbpe = pytest.importorskip("rustbpe")
    trainer = rustbpe.Tokenizer()
    trainer.train_from_iterator(iter(train_texts()), VOCAB - len(SPECIAL_TOKENS), pattern=SPLIT_PATTERN)
    assert dict(trainer.get_mergeable_ranks()) == tok.mergeable_ranks  # training is deterministic
    for text in varied_texts():
        assert trainer.encode(text) == tok.encode(text)


# ----------------------------------------------------------------------------- HF tokenizer.json

def test_hf_tokenizers_loads_and_encodes_identically(tok, saved):
    tokenizers = pytest.importorskip("tokenizers")
    hf = tokenizers.Tokenizer.from_file(str(saved))
    assert hf.get_vocab_size() == tok.vocab_size
    for name in SPECIAL_TOKENS:
        assert hf.token_to_id(name) == tok.special_id(name)
    texts = [t for t in varied_texts() if not any(s in t for s in SPECIAL_TOKENS)]
    # (HF always matches added tokens inside text; ours never does, so texts with them differ
    # by design and are left out here.)
    for text in texts:
        ids = tok.encode(text)
        assert hf.encode(text, add_special_tokens=False).ids == ids, text[:80]
        assert hf.decode(ids) == text
    batch = hf.encode_batch(texts, add_special_tokens=False)
    assert [e.ids for e in batch] == [tok.encode(t) for t in texts]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=60))
def test_hf_matches_on_random_text(tok, saved, text):
    tokenizers = pytest.importorskip("tokenizers")
    assume(not any(s in text for s in SPECIAL_TOKENS))  # HF matches added tokens in text by design
    hf = _hf_cache.get(saved) or _hf_cache.setdefault(saved, tokenizers.Tokenizer.from_file(str(saved)))
    assert hf.encode(text, add_special_tokens=False).ids == tok.encode(text)


_hf_cache: dict = {}


def test_save_load_round_trip(tok, saved):
    loaded = Tokenizer.load(saved)
    assert loaded.fingerprint() == tok.fingerprint()
    assert loaded.vocab_size == tok.vocab_size
    assert loaded.mergeable_ranks == tok.mergeable_ranks
    for text in varied_texts():
        assert loaded.encode(text) == tok.encode(text)
    # saving the loaded one gives the same file
    assert json.loads(saved.read_text(encoding="utf-8")) == loaded.to_hf_json()


def test_save_is_atomic_and_overwrites(tok, tmp_path):
    path = tmp_path / "tokenizer.json"
    path.write_text("old junk")
    tok.save(path)
    tok.save(path)
    assert os.listdir(tmp_path) == ["tokenizer.json"]  # no temporary files left behind
    assert Tokenizer.load(path).fingerprint() == tok.fingerprint()


def test_fingerprint(tok):
    assert tok.fingerprint() == tok.fingerprint()
    assert len(tok.fingerprint()) == 64
    other = Tokenizer.train(train_texts()[:200], VOCAB // 2)
    assert other.fingerprint() != tok.fingerprint()


def test_load_errors(tmp_path):
    missing = tmp_path / "missing.json"
    with pytest.raises(PicochatError, match="missing.json"):
        Tokenizer.load(missing)
    corrupt = tmp_path / "corrupt.json"
    corrupt.write_text('{"model": {"type": "BPE", "vocab": {')
    with pytest.raises(PicochatError, match="corrupt.json"):
        Tokenizer.load(corrupt)
    foreign = tmp_path / "foreign.json"
    foreign.write_text(json.dumps({"model": {"type": "WordPiece", "vocab": {"a": 0}}}))
    with pytest.raises(PicochatError, match="foreign.json"):
        Tokenizer.load(foreign)
    not_dict = tmp_path / "list.json"
    not_dict.write_text("[1, 2, 3]")
    with pytest.raises(PicochatError, match="list.json"):
        Tokenizer.load(not_dict)


def test_load_refuses_tampered_file(tmp_path):
    tok = Tokenizer.train(["the cat sat on the mat. " * 50], MIN_VOCAB_SIZE + 20)
    good = tok.to_hf_json()
    cases = {
        "pattern": lambda d: d["pre_tokenizer"]["pretokenizers"][0]["pattern"].update(Regex=r"\w+"),
        "specials": lambda d: d["added_tokens"].pop(),
        "merges": lambda d: d["model"]["merges"].reverse(),
        "vocab": lambda d: d["model"]["vocab"].update({"Ā": 5}),
    }
    for name, tamper in cases.items():
        data = json.loads(json.dumps(good))
        tamper(data)
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
        with pytest.raises(PicochatError, match=f"{name}.json"):
            Tokenizer.load(path)


# ----------------------------------------------------------------------------- eval

def test_eval_tokenizer(tok):
    rows = eval_tokenizer(tok)
    assert [r["kind"] for r in rows] == list(EVAL_SAMPLES)
    for r in rows:
        assert r["tokens"] > 0 and r["bytes"] > 0
        assert r["bytes_per_token"] == pytest.approx(r["bytes"] / r["tokens"])
    by_kind = {r["kind"]: r for r in rows}
    assert by_kind["english"]["bytes_per_token"] > by_kind["multilingual"]["bytes_per_token"]
    # chat markers are one special token each, worth 0 bytes
    chat = eval_tokenizer(tok, {"c": "<|user_start|>hi<|user_end|>"})[0]
    assert chat["bytes"] == 2 and chat["tokens"] == 2 + len(tok.encode("hi"))
    table = format_eval_table(rows)
    assert table.splitlines()[0].startswith("| kind |") and len(table.splitlines()) == 2 + len(rows)


def test_train_tokenizer_stage(tmp_path):
    sources = pytest.importorskip("picochat.data.sources", reason="picochat.data.sources not written yet")
    assert hasattr(sources, "iter_documents")
    from picochat.tokenizer import train_tokenizer

    out = tmp_path / "run" / "tokenizer.json"
    tok = train_tokenizer([str(GUTENBERG / TRAIN_BOOKS[0])], 512, str(out), max_chars=100_000)
    assert tok.vocab_size == 512
    assert Tokenizer.load(out).fingerprint() == tok.fingerprint()
