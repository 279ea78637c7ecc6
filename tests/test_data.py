"""Data pipeline: document sources, parquet shards, builtin corpus, token cache, packing loader."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from picochat.common import PicochatError, log
from picochat.data.loader import PackingLoader, TokenDataset
from picochat.data.prepare import prepare_shards
from picochat.data.sources import iter_documents, list_files, strip_gutenberg

from .conftest import TEST_DATA  # noqa: E402
GUTENBERG = TEST_DATA / "pretrain_text" / "gutenberg"
BOOKS = [GUTENBERG / "11-0.txt", GUTENBERG / "5200.txt"]  # Alice in Wonderland, Metamorphosis (excerpts)



class ByteTokenizer:
    """Stand-in used only if picochat.tokenizer is unavailable: bytes are ids, BOS is 256."""

    bos_id = 256
    vocab_size = 257

    def encode_batch(self, texts):
        return [list(t.encode("utf-8")) for t in texts]

    def fingerprint(self):
        return "bytes-v1"


@pytest.fixture(scope="module")
def tok():
    try:
        from picochat.tokenizer import Tokenizer
    except ImportError:
        return ByteTokenizer()
    text = ("Alice was beginning to get very tired of sitting by her sister on the bank, and of "
            "having nothing to do: once or twice she had peeped into the book her sister was reading. ") * 20
    return Tokenizer.train([text], 300)


# ----------------------------------------------------------------------------- sources

def test_txt_paragraphs_and_whole_file(tmp_path):
    paras = [f"Paragraph {i} " + "word " * 60 for i in range(40)]  # ~320 chars each
    f = tmp_path / "a.txt"
    f.write_text("\n\n".join(paras) + "\n")
    docs = list(iter_documents([f]))
    # merged to ~2000 chars: no 1-paragraph fragments, nothing lost, order kept
    assert 3 <= len(docs) <= 8
    assert all(len(d) >= 2000 for d in docs[:-1])
    assert "\n\n".join(docs) == "\n\n".join(p.strip() for p in paras)
    assert list(iter_documents([f], txt_split="file")) == [f.read_text()]


def test_gutenberg_header_footer_stripped(tmp_path):
    f = tmp_path / "book.txt"
    f.write_text("Project Gutenberg license blah\n*** START OF THE PROJECT GUTENBERG EBOOK X ***\n\n"
                 "Chapter one. It was a dark night.\n\n*** END OF THE PROJECT GUTENBERG EBOOK X ***\nlicense\n")
    assert list(iter_documents([f])) == ["Chapter one. It was a dark night."]
    assert strip_gutenberg("no markers here") == "no markers here"


def test_jsonl_parquet_and_directories(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    with open(tmp_path / "d" / "b.jsonl", "w") as f:
        for t in ["jsonl one", "", "jsonl two"]:
            f.write(json.dumps({"text": t, "id": 1}) + "\n")
    # several row groups: the reader goes group by group
    pq.write_table(pa.table({"text": ["pq one", "pq two", "pq three"], "x": [1, 2, 3]}),
                   tmp_path / "d" / "sub" / "c.parquet", row_group_size=1)
    (tmp_path / "d" / "a.txt").write_text("txt doc")
    (tmp_path / "d" / "notes.csv").write_text("ignored")
    docs = list(iter_documents([tmp_path / "d"]))
    # sorted recursive walk: a.txt, b.jsonl, sub/c.parquet; the empty jsonl text is skipped
    assert docs == ["txt doc", "jsonl one", "jsonl two", "pq one", "pq two", "pq three"]
    assert [p.name for p in list_files(tmp_path / "d")] == ["a.txt", "b.jsonl", "c.parquet"]


def test_source_errors(tmp_path):
    with pytest.raises(PicochatError, match="not found"):
        list(iter_documents([tmp_path / "missing.txt"]))
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(PicochatError, match="empty_dir"):
        list(iter_documents([tmp_path / "empty_dir"]))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"content": "x"}) + "\n")
    with pytest.raises(PicochatError, match=r"bad\.jsonl:1.*'text'"):
        list(iter_documents([bad]))
    pq.write_table(pa.table({"content": ["x"]}), tmp_path / "bad.parquet")
    with pytest.raises(PicochatError, match=r"bad\.parquet.*'text'"):
        list(iter_documents([tmp_path / "bad.parquet"]))
    blank = tmp_path / "blank.txt"
    blank.write_text("\n\n   \n")
    with pytest.raises(PicochatError, match="no non-empty documents.*blank.txt"):
        list(iter_documents([blank]))
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(PicochatError, match="unsupported"):
        list(iter_documents([tmp_path / "x.csv"]))


def test_real_books_and_prepare_roundtrip(tmp_path):
    docs = list(iter_documents(BOOKS))
    assert len(docs) > 40  # 120,000 characters in documents of about 2,000
    assert not any("Project Gutenberg" in d and "*** START OF" in d for d in docs)
    assert "Alice" in docs[0]
    shards = prepare_shards(BOOKS, tmp_path / "shards", shard_chars=40_000)
    assert [p.name for p in shards[:2]] == ["shard_00000.parquet", "shard_00001.parquet"]
    assert len(shards) >= 3
    assert list(iter_documents(shards)) == docs
    assert not list((tmp_path / "shards").glob(".*tmp*"))
    with pytest.raises(PicochatError, match="already has"):
        prepare_shards(BOOKS, tmp_path / "shards")


# ----------------------------------------------------------------------------- token cache

def _write_docs(path: Path, n: int, words: int = 30, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    vocab = "the cat sat on a mat and dog ran far away from home while birds sang loudly".split()
    with open(path, "w") as f:
        for i in range(n):
            k = int(rng.integers(1, words))
            f.write(json.dumps({"text": f"doc{i} " + " ".join(rng.choice(vocab, k))}) + "\n")
    return path


def test_token_cache_built_once(tmp_path, tok, monkeypatch):
    data = _write_docs(tmp_path / "d.jsonl", 50)
    calls = []
    orig = type(tok).encode_batch

    def counting(self, texts, *args, **kwargs):
        calls.append(len(texts))
        return orig(self, texts, *args, **kwargs)

    monkeypatch.setattr(type(tok), "encode_batch", counting)
    ds = TokenDataset.build([data], tok, cache_dir=tmp_path / "cache", batch_docs=16)
    assert sum(calls) == 50 and len(calls) == 4
    assert ds.num_docs == 50 and ds.tokens.dtype == np.uint16
    docs = list(iter_documents([data]))
    for i in (0, 17, 49):
        assert ds.doc(i)[0] == tok.bos_id
        assert ds.doc(i)[1:].tolist() == orig(tok, [docs[i]])[0]
    assert ds.num_tokens == sum(len(ids) + 1 for ids in orig(tok, docs))

    calls.clear()
    ds2 = TokenDataset.build([data], tok, cache_dir=tmp_path / "cache")
    assert calls == []  # cache hit: no tokenization
    assert isinstance(ds2.tokens, np.memmap)
    np.testing.assert_array_equal(ds2.tokens, ds.tokens)
    np.testing.assert_array_equal(ds2.offsets, ds.offsets)

    # changing the data invalidates the cache
    _write_docs(data, 60, seed=1)
    ds3 = TokenDataset.build([data], tok, cache_dir=tmp_path / "cache")
    assert sum(calls) == 60 and ds3.num_docs == 60
    assert not list((tmp_path / "cache").glob(".*tmp*"))


def test_split_disjoint_and_fixed(tmp_path, tok):
    ds = TokenDataset.build([_write_docs(tmp_path / "d.jsonl", 300)], tok, cache_dir=tmp_path / "c")
    train, val = ds.split_ids("train"), ds.split_ids("val")
    assert len(val) == 3 and len(train) == 297
    assert not set(train) & set(val)
    assert sorted(set(train) | set(val)) == list(range(300))
    assert len(ds.split_ids("val", val_fraction=0.0)) == 1  # never empty
    np.testing.assert_array_equal(ds.split_ids("val"), val)  # independent of anything but the data
    assert len(ds.split_ids("val", val_fraction=0.5, max_val_tokens=1)) == 1  # the token cap


def test_too_few_documents(tmp_path, tok):
    f = tmp_path / "one.txt"
    f.write_text("just one short document")
    ds = TokenDataset.build([f], tok, cache_dir=tmp_path / "c")
    with pytest.raises(PicochatError, match="at least 2"):
        PackingLoader(ds, "train", batch_size=1, seq_len=8)


# ----------------------------------------------------------------------------- packing loader

@pytest.fixture(scope="module")
def small_ds(tmp_path_factory, tok):
    tmp = tmp_path_factory.mktemp("packing")
    # lengths from 2 to ~100 tokens, plus a few documents longer than seq_len
    data = _write_docs(tmp / "d.jsonl", 400, words=60)
    with open(data, "a") as f:
        for i in range(5):
            f.write(json.dumps({"text": f"long{i} " + "the cat sat on the mat " * 80}) + "\n")
    return TokenDataset.build([data], tok, cache_dir=tmp / "cache")


def _collect(loader, n):
    return [loader.next_batch() for _ in range(n)]


def test_rows_start_with_bos_shift_and_no_padding(small_ds):
    loader = PackingLoader(small_ds, "train", batch_size=8, seq_len=64, seed=1)
    for x, y in _collect(loader, 10):
        assert x.shape == y.shape == (8, 64) and x.dtype == y.dtype == torch.int64
        assert (x[:, 0] == small_ds.bos_id).all()
        assert torch.equal(x[:, 1:], y[:, :-1])
        assert x.min() >= 0 and x.max() < 1 << 16  # every slot is a real token: no padding
    util = 1.0  # by construction every one of the B*(T+1) slots holds a document token
    log(f"packing utilization: {util:.3f}")


def test_packing_segments_cover_documents_exactly(small_ds):
    """Across the first epoch's rows every document is used piece by piece, in order, no overlap,
    and the row tokens are exactly [BOS] + the document's tokens at those offsets."""
    T = 64
    loader = PackingLoader(small_ds, "train", batch_size=1, seq_len=T, seed=3, buffer_size=16)
    pieces: dict[int, list[tuple[int, int]]] = {}
    total = small_ds.doc_lens[loader.ids].sum()
    used = 0
    while loader.epoch == 0:
        segments = loader._plan_row()
        assert sum(1 + b for _, _, b in segments) == T + 1
        row = np.empty(T + 1, dtype=np.int64)
        loader._fill_row(row, segments)
        pos = 0
        for doc_id, off, body in segments:
            assert body <= T
            assert row[pos] == small_ds.bos_id
            np.testing.assert_array_equal(row[pos + 1:pos + 1 + body], small_ds.doc(doc_id)[1 + off:1 + off + body])
            pieces.setdefault(doc_id, []).append((off, body))
            pos += 1 + body
            used += body
    complete = 0
    for doc_id, ps in pieces.items():
        nxt = 0
        for off, body in ps:  # pieces of one document come in order, back to back
            assert off == nxt
            nxt += body
        complete += nxt == small_ds.doc_lens[doc_id] - 1
    assert complete >= len(loader.ids) - loader.buffer_size - 1  # only the buffer tail is unfinished
    assert used <= total


def test_best_fit_takes_largest_that_fits(small_ds):
    loader = PackingLoader(small_ds, "train", batch_size=1, seq_len=64, seed=0, buffer_size=64)
    for _ in range(20):
        loader._refill()
        sizes_before = sorted(k[0] for k in loader._keys)
        segments = loader._plan_row()
        first = 1 + segments[0][2]
        fitting = [s for s in sizes_before if s <= 65]
        if fitting:
            assert first == max(fitting)


def test_determinism_and_seed(small_ds):
    a = _collect(PackingLoader(small_ds, "train", 4, 32, seed=7), 5)
    b = _collect(PackingLoader(small_ds, "train", 4, 32, seed=7), 5)
    c = _collect(PackingLoader(small_ds, "train", 4, 32, seed=8), 5)
    assert all(torch.equal(p[0], q[0]) for p, q in zip(a, b))
    assert not all(torch.equal(p[0], q[0]) for p, q in zip(a, c))


def test_state_resume_exact_across_epochs(tmp_path, tok):
    ds = TokenDataset.build([_write_docs(tmp_path / "d.jsonl", 30, words=20)], tok, cache_dir=tmp_path / "c")
    ref = PackingLoader(ds, "train", batch_size=4, seq_len=32, seed=5, buffer_size=8)
    epochs = []
    states, batches = [], []
    for _ in range(30):
        states.append(json.loads(json.dumps(ref.state_dict())))  # must survive JSON
        batches.append(ref.next_batch())
        epochs.append(ref.epoch)
    assert epochs[-1] >= 3, "tiny dataset should loop over several epochs"
    for k in (0, 3, 11, 20):
        other = PackingLoader(ds, "train", batch_size=4, seq_len=32, seed=0, buffer_size=8)
        other.next_batch()  # arbitrary prior state is overwritten
        other.load_state_dict(states[k])
        for j in range(k, min(k + 6, len(batches))):
            x, y = other.next_batch()
            assert torch.equal(x, batches[j][0]) and torch.equal(y, batches[j][1]), (k, j)
    assert len(json.dumps(ref.state_dict())) < 2000
    bad = dict(states[3], buffer=[[10_000, 0]])
    with pytest.raises(PicochatError, match="document 10000"):
        ref.load_state_dict(bad)
    with pytest.raises(PicochatError, match="split"):
        PackingLoader(ds, "val", batch_size=1, seq_len=8).load_state_dict(states[3])


def test_rank_slices_equal_single_rank(small_ds):
    full = _collect(PackingLoader(small_ds, "train", batch_size=8, seq_len=48, seed=2), 4)
    parts = [_collect(PackingLoader(small_ds, "train", batch_size=4, seq_len=48, seed=2, rank=r, world_size=2), 4)
             for r in range(2)]
    for i in range(4):
        assert torch.equal(torch.cat([parts[0][i][0], parts[1][i][0]]), full[i][0])
        assert torch.equal(torch.cat([parts[0][i][1], parts[1][i][1]]), full[i][1])


def test_val_split_deterministic_and_reset(small_ds):
    val = PackingLoader(small_ds, "val", batch_size=2, seq_len=32, seed=1)
    first = _collect(val, 3)
    val.reset()
    again = _collect(val, 3)
    other_seed = _collect(PackingLoader(small_ds, "val", batch_size=2, seq_len=32, seed=99), 3)
    for a, b, c in zip(first, again, other_seed):
        assert torch.equal(a[0], b[0]) and torch.equal(a[0], c[0])
    train_docs = set(small_ds.split_ids("train"))
    assert not train_docs & set(val.ids)


def test_real_books_loader(tmp_path, tok):
    ds = TokenDataset.build(BOOKS, tok, cache_dir=tmp_path / "c")
    loader = PackingLoader(ds, "train", batch_size=4, seq_len=128)
    x, y = loader.next_batch()
    assert (x[:, 0] == tok.bos_id).all() and torch.equal(x[:, 1:], y[:, :-1])


# ----------------------------------------------------------------------------- builtin corpus

def test_builtin_corpus(tmp_path):
    from picochat.data.builtin import build_builtin_corpus

    paths = build_builtin_corpus(tmp_path, max_bytes=1_500_000)
    total = sum(p.stat().st_size for p in paths)
    assert total > 1_000_000
    assert {p.name for p in paths} >= {"python_topics.txt", "stdlib_docstrings.txt"}
    sources = (tmp_path / "SOURCES.md").read_text()
    assert "python_topics.txt" in sources
    for p in paths:
        text = p.read_text(encoding="utf-8")  # inspectable UTF-8 text
        assert text.count("\n\n") > 10
    docs = list(iter_documents(paths))
    assert len(docs) > 200
    assert any("for" in d and "loop" in d for d in docs)
    assert not list(tmp_path.glob(".*tmp*"))


# ----------------------------------------------------------------------------- property test


@settings(max_examples=40, deadline=None)
@given(lens=st.lists(st.integers(1, 90), min_size=2, max_size=40), seq_len=st.integers(1, 40),
       buffer_size=st.integers(1, 12), batch=st.integers(1, 3), seed=st.integers(0, 3))
def test_packing_properties(lens, seq_len, buffer_size, batch, seed):
    """Synthetic docs whose token values encode their position: every row is BOS-started, fully
    packed, and each BOS-delimited run is a contiguous slice of one document."""
    bos = 0
    toks, offsets = [], [0]
    for d, n in enumerate(lens):
        toks += [bos] + [1000 * (d + 1) + k for k in range(n)]
        offsets.append(len(toks))
    ds = TokenDataset(np.array(toks, dtype=np.uint32), np.array(offsets, dtype=np.int64), bos)
    loader = PackingLoader(ds, "train", batch, seq_len, seed=seed, buffer_size=buffer_size,
                           val_fraction=0.0)
    for _ in range(3):
        x, y = loader.next_batch()
        assert torch.equal(x[:, 1:], y[:, :-1])
        rows = torch.cat([x, y[:, -1:]], dim=1)
        for row in rows.tolist():
            assert row[0] == bos
            runs, cur = [], None
            for t in row:
                if t == bos:
                    cur = []
                    runs.append(cur)
                else:
                    cur.append(t)
            for run in runs:
                assert len(run) <= seq_len
                if run:
                    assert len({t // 1000 for t in run}) == 1  # one document
                    assert run == list(range(run[0], run[0] + len(run)))  # contiguous, in order
