"""Token cache and the best-fit packing loader.

TokenDataset: every document tokenized once, `[BOS] + ids`, into one flat token array plus
document offsets, cached on disk as .npy files (memory-mapped on load) under a key that changes
whenever the tokenizer or the data files change. The second run skips tokenization.

PackingLoader: fills rows of T+1 tokens so that every row starts with a BOS and no token is
padding. It keeps a buffer of pending items, each the not-yet-used rest of one document; for each
row it repeatedly takes the largest item that fits the space left, and when none fits it crops
one to fill the row exactly and puts the remainder back (prefixed with its own BOS when it is
used). An item is at most T+1 tokens (BOS + T), so a long document is consumed T tokens at a time.
The loader's whole state is (epoch, cursor, buffer of (doc_id, offset)), which makes exact resume
cheap: state_dict() is a small JSON-able dict.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from picochat.common import PicochatError, fsync, log
from picochat.data.sources import iter_documents, list_files

CACHE_VERSION = 1
SPLIT_SEED = 0x5EED  # the train/val split never depends on the training seed
DEFAULT_VAL_FRACTION = 0.01
DEFAULT_MAX_VAL_TOKENS = 10_000_000  # val is for measuring, not training: keep it bounded


def default_cache_dir() -> Path:
    root = os.environ.get("PICOCHAT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "picochat")
    return Path(root) / "tokens"


def cache_key(paths, tok, txt_split: str) -> str:
    """Hash of everything the token arrays depend on: tokenizer, file identities, split mode."""
    files = []
    for p in list_files(paths):
        st = p.stat()
        files.append([str(p.resolve()), st.st_size, st.st_mtime_ns])
    blob = json.dumps({"v": CACHE_VERSION, "tok": tok.fingerprint(), "files": files, "txt_split": txt_split})
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


class TokenDataset:
    """A flat token array (uint16/uint32) and int64 document offsets; doc i = tokens[off[i]:off[i+1]]."""

    def __init__(self, tokens: np.ndarray, offsets: np.ndarray, bos_id: int, mask: np.ndarray | None = None):
        self.tokens = tokens
        self.mask = mask  # optional, parallel to tokens: 1 where the token is a training target
        self.offsets = offsets
        self.bos_id = int(bos_id)
        self.num_docs = len(offsets) - 1
        self.num_tokens = int(offsets[-1])
        self.doc_lens = np.diff(offsets)  # including each document's BOS

    def doc(self, i: int) -> np.ndarray:
        return self.tokens[self.offsets[i]:self.offsets[i + 1]]

    @classmethod
    def from_sequences(cls, sequences: list[tuple[list[int], list[int]]], bos_id: int) -> TokenDataset:
        """In memory, from (ids, mask) pairs that each start with BOS: rendered conversations."""
        if not sequences:
            raise PicochatError("no sequences to pack")
        lens = np.array([len(ids) for ids, _ in sequences], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lens)])
        tokens = np.fromiter((t for ids, _ in sequences for t in ids), dtype=np.int64, count=int(offsets[-1]))
        mask = np.fromiter((m for _, ms in sequences for m in ms), dtype=np.uint8, count=int(offsets[-1]))
        return cls(tokens, offsets, bos_id, mask)

    # ------------------------------------------------------------------ building and caching

    @classmethod
    def build(cls, paths, tok, cache_dir: str | Path | None = None, txt_split: str = "paragraphs",
              batch_docs: int = 512) -> TokenDataset:
        """Load from the cache, or tokenize `iter_documents(paths)` and write the cache."""
        cache_root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        key = cache_key(paths, tok, txt_split)
        entry = cache_root / key
        if (entry / "meta.json").exists():
            try:
                tokens = np.load(entry / "tokens.npy", mmap_mode="r")
                offsets = np.load(entry / "offsets.npy", mmap_mode="r")
            except (OSError, ValueError) as e:
                raise PicochatError(f"token cache {entry} is unreadable ({e}); delete it and retry") from None
            ds = cls(tokens, offsets, tok.bos_id)
            log(f"token cache hit {entry}: {ds.num_docs:,} documents, {ds.num_tokens:,} tokens")
            return ds
        return cls._tokenize_to_cache(paths, tok, entry, txt_split, batch_docs)

    @classmethod
    def _tokenize_to_cache(cls, paths, tok, entry: Path, txt_split: str, batch_docs: int) -> TokenDataset:
        dtype = np.uint16 if tok.vocab_size <= 1 << 16 else np.uint32
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = entry.parent / f".{entry.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        t0 = time.perf_counter()
        lengths: list[int] = []
        bos = tok.bos_id
        try:
            # tokens stream to a raw file so that a corpus larger than RAM can be tokenized
            with open(tmp / "tokens.bin", "wb") as raw:
                def flush(batch: list[str]) -> None:
                    flat: list[int] = []
                    for ids in tok.encode_batch(batch):
                        flat.append(bos)
                        flat.extend(ids)
                        lengths.append(len(ids) + 1)
                    raw.write(np.asarray(flat, dtype=dtype).tobytes())

                batch: list[str] = []
                for doc in iter_documents(paths, txt_split=txt_split):
                    batch.append(doc)
                    if len(batch) == batch_docs:
                        flush(batch)
                        batch = []
                if batch:
                    flush(batch)
            offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
            np.cumsum(lengths, out=offsets[1:])
            n = int(offsets[-1])
            # copy raw -> .npy in chunks (the .npy header needs the length, known only now)
            src = np.memmap(tmp / "tokens.bin", dtype=dtype, mode="r", shape=(n,)) if n else np.zeros(0, dtype)
            dst = np.lib.format.open_memmap(tmp / "tokens.npy", mode="w+", dtype=dtype, shape=(n,))
            step = 1 << 25
            for i in range(0, n, step):
                dst[i:i + step] = src[i:i + step]
            dst.flush()
            del src, dst
            (tmp / "tokens.bin").unlink()
            np.save(tmp / "offsets.npy", offsets)
            meta = {"version": CACHE_VERSION, "tokenizer": tok.fingerprint(), "num_docs": len(lengths),
                    "num_tokens": n, "dtype": np.dtype(dtype).name, "txt_split": txt_split,
                    "files": [str(p) for p in list_files(paths)]}
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
            for f in tmp.iterdir():
                fsync(f)
            try:
                os.replace(tmp, entry)  # atomic: readers see a complete entry or none
            except OSError:
                if not (entry / "meta.json").exists():  # lost a race to another process: fine
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        dt = time.perf_counter() - t0
        log(f"tokenized {len(lengths):,} documents, {n:,} tokens in {dt:.1f}s "
            f"({n / max(dt, 1e-9) / 1e6:.2f}M tok/s) -> {entry}")
        return cls(np.load(entry / "tokens.npy", mmap_mode="r"), np.load(entry / "offsets.npy", mmap_mode="r"),
                   tok.bos_id)

    # ------------------------------------------------------------------ train/val split

    def split_ids(self, split: str, val_fraction: float = DEFAULT_VAL_FRACTION,
                  max_val_tokens: int = DEFAULT_MAX_VAL_TOKENS) -> np.ndarray:
        """Document ids of `split`, sorted.

        A fixed-seed permutation of all doc ids (independent of the training seed); val takes
        its first max(1, round(val_fraction * num_docs)) documents, then stops early once it has
        max_val_tokens tokens (always at least one document, and at least one left for train);
        train is everything else."""
        if split == "all":  # every document trains (chat mixtures keep their own held-out splits)
            return np.arange(self.num_docs)
        if split not in ("train", "val"):
            raise PicochatError(f"unknown split {split!r} (choose train, val or all)")
        if self.num_docs < 2:
            raise PicochatError(f"only {self.num_docs} document(s): need at least 2 to have both a "
                                "train and a val split (add more text; a .txt file is split into documents at "
                                "its blank lines, so one long line is one document)")
        perm = np.random.default_rng(SPLIT_SEED).permutation(self.num_docs)
        n_val = min(max(1, round(val_fraction * self.num_docs)), self.num_docs - 1)
        cum = np.cumsum(self.doc_lens[perm[:n_val]])
        n_val = max(1, min(n_val, int(np.searchsorted(cum, max_val_tokens, side="right"))))
        ids = perm[:n_val] if split == "val" else perm[n_val:]
        return np.sort(ids)


class PackingLoader:
    """Yields (x, y) int64 tensors of shape (batch_size, seq_len); see the module docstring.

    Every call packs the global batch of batch_size * world_size rows and returns rank `rank`'s
    contiguous slice, so the rows do not depend on how many processes share them. (Only this
    rank's rows are materialised; planning all rows is cheap.)"""

    def __init__(self, dataset: TokenDataset, split: str, batch_size: int, seq_len: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1, buffer_size: int = 256,
                 val_fraction: float = DEFAULT_VAL_FRACTION, max_val_tokens: int = DEFAULT_MAX_VAL_TOKENS):
        if batch_size < 1 or seq_len < 1 or buffer_size < 1:
            raise PicochatError(f"batch_size, seq_len and buffer_size must be positive "
                                f"(got {batch_size}, {seq_len}, {buffer_size})")
        if not 0 <= rank < world_size:
            raise PicochatError(f"rank {rank} out of range for world_size {world_size}")
        self.ds = dataset
        self.split = split
        self.ids = dataset.split_ids(split, val_fraction, max_val_tokens)
        self.batch_size, self.seq_len = batch_size, seq_len
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.buffer_size = buffer_size
        self.shuffle = split != "val"
        self.reset()

    # ------------------------------------------------------------------ state

    def reset(self) -> None:
        """Back to the very start (epoch 0, empty buffer)."""
        self.epoch = 0
        self.cursor = 0  # position in this epoch's document order
        self._order = self._epoch_order(0)
        # The buffer is kept sorted by (size, seq): best fit is a bisect, not a scan. `seq` is an
        # insertion counter that breaks ties deterministically; only the order matters for resume.
        self._keys: list[tuple[int, int]] = []
        self._items: list[tuple[int, int]] = []  # (doc_id, offset) parallel to _keys
        self._seq = 0

    def state_dict(self) -> dict:
        return {"split": self.split, "seed": self.seed, "epoch": self.epoch, "cursor": self.cursor,
                "buffer": [[int(d), int(o)] for d, o in self._items]}

    def load_state_dict(self, state: dict) -> None:
        if state.get("split") != self.split:
            raise PicochatError(f"loader state is for split {state.get('split')!r}, not {self.split!r}")
        self.seed = int(state["seed"])
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
        self._order = self._epoch_order(self.epoch)
        self._keys, self._items, self._seq = [], [], 0
        for d, o in state["buffer"]:  # saved in sorted order: re-inserting keeps tie order
            if not (0 <= d < self.ds.num_docs and 0 <= o < self.ds.doc_lens[d]):
                raise PicochatError(f"loader state refers to document {d} offset {o}, which this dataset "
                                    f"({self.ds.num_docs} documents) does not have: was the data changed?")
            self._push(int(d), int(o))

    # ------------------------------------------------------------------ packing

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return self.ids
        return np.random.default_rng([self.seed, epoch]).permutation(self.ids)

    def _size(self, doc_id: int, offset: int) -> int:
        # tokens this item would occupy in a row: its BOS plus the rest of the body, at most T+1
        body_left = int(self.ds.doc_lens[doc_id]) - 1 - offset
        return min(1 + body_left, self.seq_len + 1)

    def _push(self, doc_id: int, offset: int) -> None:
        key = (self._size(doc_id, offset), self._seq)
        self._seq += 1
        i = bisect.bisect_left(self._keys, key)
        self._keys.insert(i, key)
        self._items.insert(i, (doc_id, offset))

    def _refill(self) -> None:
        while len(self._items) < self.buffer_size:
            if self.cursor == len(self._order):
                self.epoch += 1
                self.cursor = 0
                self._order = self._epoch_order(self.epoch)
            self._push(int(self._order[self.cursor]), 0)
            self.cursor += 1

    def _take(self, i: int, n: int) -> tuple[int, int, int]:
        """Remove item i, use n of its tokens (BOS + n-1 body tokens), put back any remainder."""
        del self._keys[i]
        doc_id, offset = self._items.pop(i)
        body_left = int(self.ds.doc_lens[doc_id]) - 1 - offset
        if n - 1 < body_left:
            self._push(doc_id, offset + n - 1)
        return doc_id, offset, n - 1

    def _plan_row(self) -> list[tuple[int, int, int]]:
        """Segments (doc_id, body_offset, body_len) that exactly fill one row of T+1 tokens."""
        segments = []
        space = self.seq_len + 1
        while space > 0:
            self._refill()
            # the largest item with size <= space: the last key below (space+1, -inf)
            i = bisect.bisect_left(self._keys, (space + 1, -1)) - 1
            if i >= 0:
                n = self._keys[i][0]
            else:
                i, n = 0, space  # nothing fits: crop the smallest item to fill the row exactly
            segments.append(self._take(i, n))
            space -= n
        return segments

    def _fill_row(self, row: np.ndarray, segments, mask_row: np.ndarray | None = None) -> None:
        toks, offs, bos, mask = self.ds.tokens, self.ds.offsets, self.ds.bos_id, self.ds.mask
        pos = 0
        for doc_id, offset, body in segments:
            row[pos] = bos
            start = int(offs[doc_id]) + 1 + offset  # +1 skips the document's own BOS
            row[pos + 1:pos + 1 + body] = toks[start:start + body]
            if mask_row is not None:
                mask_row[pos] = 0  # a BOS is never a target
                mask_row[pos + 1:pos + 1 + body] = mask[start:start + body]
            pos += 1 + body

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        plans = [self._plan_row() for _ in range(self.batch_size * self.world_size)]
        mine = plans[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
        rows = np.empty((self.batch_size, self.seq_len + 1), dtype=np.int64)
        masks = np.empty_like(rows, dtype=np.uint8) if self.ds.mask is not None else [None] * len(rows)
        for row, mask_row, segments in zip(rows, masks, mine):
            self._fill_row(row, segments, mask_row)
        t = torch.from_numpy(rows)
        x, y = t[:, :-1].contiguous(), t[:, 1:].contiguous()
        if self.ds.mask is not None:  # tokens that are not targets (user turns, tool outputs) -> -1
            y[torch.from_numpy(masks[:, 1:]) == 0] = -1
        return x, y

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.next_batch()
