"""Byte-level BPE tokenizer: train with rustbpe, encode with tiktoken, save as HF tokenizer.json.

Three libraries, one job each:
- rustbpe trains (fast, parallel, GPT-4 style regex splitting),
- tiktoken encodes (the fastest encoder; built from the trained merges),
- the Hugging Face `tokenizers` JSON format is what goes on disk, so that a run dir's
  tokenizer.json is readable by that library alone and encodes exactly as we do.

Special tokens are never learned: they take the last ids, in SPECIAL_TOKENS order, so that every
tokenizer has the same layout and later stages never change it.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import lru_cache

import tiktoken

from picochat.common import PicochatError, log, write_atomic
from picochat.data.sources import TEXT_FILES, iter_documents
from picochat.settings import check, setting

# The one place special tokens are defined: their names, and their order at the end of every
# vocabulary. nanochat's nine, plus a pair for reasoning traces (as the Rust picochat has),
# reserved from the first tokenizer on. Other modules name them by these constants.
BOS = "<|bos|>"  # every document starts with this
USER_START, USER_END = "<|user_start|>", "<|user_end|>"
ASSISTANT_START, ASSISTANT_END = "<|assistant_start|>", "<|assistant_end|>"
PYTHON_START, PYTHON_END = "<|python_start|>", "<|python_end|>"  # the assistant calls the calculator tool
OUTPUT_START, OUTPUT_END = "<|output_start|>", "<|output_end|>"  # the tool's output, fed back in
THINK_START, THINK_END = "<|think_start|>", "<|think_end|>"  # reasoning traces
SPECIAL_TOKENS = [BOS, USER_START, USER_END, ASSISTANT_START, ASSISTANT_END, PYTHON_START, PYTHON_END,
                  OUTPUT_START, OUTPUT_END, THINK_START, THINK_END]
CHAT_TOKENS = SPECIAL_TOKENS[1:9]  # what a chat model's tokenizer must have (all but the reasoning pair)

# GPT-4 (cl100k) split pattern with numbers split into runs of at most 2 digits instead of 3.
# Why {1,2}: our vocabularies are small (8k-65k) and 1-2 digit chunks cost only 110 tokens, while
# {1,3} spends up to 1,110 slots on number chunks; nanochat measured {1,2} to be the better
# trade at these sizes. The possessive quantifiers (?+, ++) are understood by all three regex
# engines involved (fancy-regex in rustbpe and tiktoken, Oniguruma in HF tokenizers).
SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*"""
    r"""|\s*[\r\n]|\s+(?!\S)|\s+"""
)

MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)  # every byte, every special; merges are optional


@lru_cache(maxsize=1)
def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode char map, used by HF's ByteLevel.

    Printable latin-1 bytes map to themselves; the other 68 bytes (control chars, space, ...)
    are shifted to 256+ so that every token is a string of visible characters."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, shift = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + shift)
            shift += 1
    return table


def _to_unicode(token: bytes) -> str:
    table = _byte_to_unicode()
    return "".join(table[b] for b in token)


@lru_cache(maxsize=1)
def _unicode_to_byte() -> dict[str, int]:
    return {c: b for b, c in _byte_to_unicode().items()}


def _from_unicode(token: str) -> bytes:
    inverse = _unicode_to_byte()
    return bytes(inverse[c] for c in token)  # KeyError on a non-byte-level char: caller wraps it


def _bpe_split(token: bytes, ranks: dict[bytes, int], max_rank: int) -> list[bytes]:
    """Split `token` with tiktoken's rule (merge the lowest-ranked adjacent pair) using only ranks
    below max_rank. For a token made by merge number r, this ends in exactly the two parts that
    merge joined: that is how the HF merges list is recovered from tiktoken-style ranks."""
    parts = [bytes([b]) for b in token]
    while True:
        best, best_rank = None, None
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and rank < max_rank and (best_rank is None or rank < best_rank):
                best, best_rank = i, rank
        if best is None:
            return parts
        parts[best:best + 2] = [parts[best] + parts[best + 1]]


class Tokenizer:
    """Byte-level BPE: ids 0..255 are bytes (in rank order), then merges, then SPECIAL_TOKENS."""

    def __init__(self, mergeable_ranks: dict[bytes, int]):
        n = len(mergeable_ranks)
        if sorted(mergeable_ranks.values()) != list(range(n)) or n < 256:
            raise PicochatError("mergeable ranks must be the ids 0..n-1 and include all 256 bytes")
        self.mergeable_ranks = mergeable_ranks
        self.special_tokens = {name: n + i for i, name in enumerate(SPECIAL_TOKENS)}
        self.enc = tiktoken.Encoding(
            name="picochat",
            pat_str=SPLIT_PATTERN,
            mergeable_ranks=mergeable_ranks,
            special_tokens=self.special_tokens,
        )
        # id -> bytes, for token_bytes() and token_byte_lengths() without going through tiktoken
        self._id_to_bytes = [b""] * n
        for token, rank in mergeable_ranks.items():
            self._id_to_bytes[rank] = token
        self._merges: list[tuple[bytes, bytes]] | None = None  # computed on first save

    # ------------------------------------------------------------------------- training

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> Tokenizer:
        if vocab_size < MIN_VOCAB_SIZE:
            raise PicochatError(
                f"vocab size {vocab_size} is too small: the minimum is {MIN_VOCAB_SIZE} "
                f"(256 bytes + {len(SPECIAL_TOKENS)} special tokens)"
            )
        import rustbpe  # imported here: only training needs it

        trainer = rustbpe.Tokenizer()
        # rustbpe's vocab_size counts bytes + merges; the specials are appended afterwards.
        trainer.train_from_iterator(iter(texts), vocab_size - len(SPECIAL_TOKENS), pattern=SPLIT_PATTERN)
        ranks = dict(trainer.get_mergeable_ranks())
        tok = cls(ranks)
        if tok.vocab_size < vocab_size:
            # rustbpe stops early when no pair occurs twice: too little text for this vocab.
            log(f"tokenizer: the text only supports {tok.vocab_size} of the {vocab_size} tokens asked for")
        return tok

    # ------------------------------------------------------------------------- encode / decode

    def encode(self, text: str) -> list[int]:
        """Ordinary text: special-token strings inside it are encoded as plain text, so that a
        document (or a user) can never inject control tokens."""
        return self.enc.encode_ordinary(text)

    def encode_batch(self, texts: list[str], num_threads: int = 0) -> list[list[int]]:
        """Parallel over documents (tiktoken releases the GIL). 0 threads = every core."""
        if num_threads <= 0:
            num_threads = _num_cores()
        return self.enc.encode_ordinary_batch(texts, num_threads=num_threads)

    def decode(self, ids: Iterable[int]) -> str:
        # A slice of ids can cut a multi-byte character; replace rather than raise.
        return self.enc.decode(list(ids), errors="replace")

    def token_bytes(self, id: int) -> bytes:
        if 0 <= id < len(self._id_to_bytes):
            return self._id_to_bytes[id]
        for name, sid in self.special_tokens.items():
            if sid == id:
                return name.encode("utf-8")
        raise PicochatError(f"token id {id} is out of range (vocab size {self.vocab_size})")

    def special_id(self, name: str) -> int:
        try:
            return self.special_tokens[name]
        except KeyError:
            raise PicochatError(f"unknown special token {name!r} (known: {', '.join(SPECIAL_TOKENS)})") from None

    @property
    def bos_id(self) -> int:
        return self.special_tokens[BOS]

    @property
    def vocab_size(self) -> int:
        return len(self._id_to_bytes) + len(SPECIAL_TOKENS)

    def token_byte_lengths(self) -> list[int]:
        """UTF-8 bytes each id stands for; 0 for specials, so bits-per-byte does not count them."""
        return [len(b) for b in self._id_to_bytes] + [0] * len(SPECIAL_TOKENS)

    def fingerprint(self) -> str:
        """sha256 over the merges (tokens in rank order) and the specials: two tokenizers with the
        same fingerprint encode identically. Checkpoints store it to catch a mismatched tokenizer."""
        h = hashlib.sha256()
        h.update(SPLIT_PATTERN.encode("utf-8") + b"\0")
        for token in self._id_to_bytes:
            h.update(len(token).to_bytes(4, "little") + token)  # length-prefixed: no ambiguity
        for name in SPECIAL_TOKENS:
            h.update(b"\0" + name.encode("utf-8"))
        return h.hexdigest()

    # ------------------------------------------------------------------------- save / load

    def merges(self) -> list[tuple[bytes, bytes]]:
        """The merge list in order (merge i made token 256 + i), recovered from the ranks.
        Cached: it takes about a second at vocab 32k and every checkpoint save needs it."""
        if self._merges is not None:
            return self._merges
        out = []
        for rank in range(256, len(self._id_to_bytes)):
            token = self._id_to_bytes[rank]
            parts = _bpe_split(token, self.mergeable_ranks, rank)
            if len(parts) != 2:
                raise PicochatError(f"token {rank} ({token!r}) is not the merge of two earlier tokens")
            out.append((parts[0], parts[1]))
        self._merges = out
        return out

    def to_hf_json(self) -> dict:
        """A standard HF byte-level BPE tokenizer.json (the layout GPT-2/Llama 3 conversions use)."""
        vocab = {_to_unicode(token): rank for rank, token in enumerate(self._id_to_bytes)}
        # "a b" strings rather than [a, b] pairs: every tokenizers version reads them, and a
        # byte-level token never contains a space (the space byte is mapped to "Ġ").
        merges = [f"{_to_unicode(a)} {_to_unicode(b)}" for a, b in self.merges()]
        added = [
            {"id": sid, "content": name, "single_word": False, "lstrip": False, "rstrip": False,
             "normalized": False, "special": True}
            for name, sid in self.special_tokens.items()
        ]
        bos = {"SpecialToken": {"id": BOS, "type_id": 0}}
        return {
            "version": "1.0",
            "truncation": None,
            "padding": None,
            "added_tokens": added,
            "normalizer": None,
            "pre_tokenizer": {
                "type": "Sequence",
                "pretokenizers": [
                    {"type": "Split", "pattern": {"Regex": SPLIT_PATTERN}, "behavior": "Isolated", "invert": False},
                    # use_regex false: the Split above already did GPT-4 style splitting
                    {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
                ],
            },
            # <|bos|> in front when special tokens are asked for (transformers' default), as picochat
            # scores text: a harness that tokenizes through transformers sees the model's own input
            "post_processor": {
                "type": "TemplateProcessing",
                "single": [bos, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [bos, {"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {BOS: {"id": BOS, "ids": [self.bos_id], "tokens": [BOS]}},
            },
            "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
            "model": {
                "type": "BPE",
                "dropout": None,
                "unk_token": None,
                "continuing_subword_prefix": None,
                "end_of_word_suffix": None,
                "fuse_unk": False,
                "byte_fallback": False,
                # false: a word that happens to be a whole vocab entry still goes through the
                # merges, which is what tiktoken does too.
                "ignore_merges": False,
                "vocab": vocab,
                "merges": merges,
            },
        }

    def save(self, path: str | os.PathLike) -> None:
        """Write tokenizer.json atomically: a crash leaves the old file or the new one, never half."""
        write_atomic(path, json.dumps(self.to_hf_json(), ensure_ascii=False, indent=None))

    @classmethod
    def load(cls, path: str | os.PathLike) -> Tokenizer:
        path = os.fspath(path)
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except FileNotFoundError:
            raise PicochatError(f"tokenizer file not found: {path}") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise PicochatError(f"cannot read tokenizer file {path}: {e}") from None
        try:
            return cls._from_hf_json(data)
        except PicochatError as e:
            raise PicochatError(f"{path} is not a picochat tokenizer.json: {e}") from None
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise PicochatError(f"{path} is not a picochat tokenizer.json (bad field: {e!r})") from None

    @classmethod
    def _from_hf_json(cls, data: dict) -> Tokenizer:
        model = data["model"]
        if model.get("type") != "BPE":
            raise PicochatError(f"model type is {model.get('type')!r}, expected 'BPE'")
        pre = data.get("pre_tokenizer") or {}
        splits = [p for p in pre.get("pretokenizers", []) if p.get("type") == "Split"]
        patterns = [p.get("pattern", {}).get("Regex") for p in splits]
        if patterns != [SPLIT_PATTERN]:
            raise PicochatError("its split regex is not picochat's SPLIT_PATTERN")
        # The vocab alone gives the ranks (id = rank); the merges are checked against it, so a
        # file edited by hand into something we would encode differently is refused.
        ranks = {}
        for text, rank in model["vocab"].items():
            ranks[_from_unicode(text)] = int(rank)
        if len(ranks) != len(model["vocab"]):
            raise PicochatError("duplicate tokens in vocab")
        tok = cls(ranks)
        if any(tok._id_to_bytes[i] != bytes([i]) for i in range(256)):
            raise PicochatError("ids 0..255 must be the 256 single bytes in order")
        merges = [m.split(" ") if isinstance(m, str) else m for m in model["merges"]]
        if len(merges) != len(ranks) - 256:
            raise PicochatError(f"{len(merges)} merges for {len(ranks)} tokens (expected {len(ranks) - 256})")
        for i, (a, b) in enumerate(merges):
            if _from_unicode(a) + _from_unicode(b) != tok._id_to_bytes[256 + i]:
                raise PicochatError(f"merge {i} ({a!r}, {b!r}) does not make token {256 + i}")
        added = sorted((t["id"], t["content"]) for t in data.get("added_tokens", []))
        if added != [(sid, name) for name, sid in tok.special_tokens.items()]:
            raise PicochatError(f"its special tokens are not {SPECIAL_TOKENS} at the last ids")
        return tok


def _num_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


# ----------------------------------------------------------------------------- stage functions

def _take_chars(docs: Iterable[str], max_chars: int) -> Iterator[str]:
    """Stream documents until max_chars characters, cutting the last one, and count them."""
    seen = 0
    for doc in docs:
        if seen >= max_chars:
            return
        doc = doc[: max_chars - seen]
        seen += len(doc)
        yield doc


def train_tokenizer(data: list[str], vocab_size: int, save: str | None = None,
                    max_chars: int = 2_000_000_000) -> Tokenizer:
    """`picochat tokenizer train`: train on the documents under `data` paths, save tokenizer.json.

    max_chars caps the training text (nanochat's default of 2B chars; BPE merges stop changing
    long before that, and the cap bounds the time on a big corpus)."""
    counter = {"chars": 0, "docs": 0}

    def counted() -> Iterator[str]:
        for doc in _take_chars(iter_documents(data), max_chars):
            counter["chars"] += len(doc)
            counter["docs"] += 1
            yield doc

    log(f"tokenizer: training vocab {vocab_size:,} on {', '.join(map(str, data))}")
    t0 = time.perf_counter()
    tok = Tokenizer.train(counted(), vocab_size)
    dt = time.perf_counter() - t0
    if counter["chars"] == 0:
        raise PicochatError(f"no text found in {', '.join(map(str, data))}")
    log(f"tokenizer: {counter['docs']:,} docs, {counter['chars']:,} chars in {dt:.1f}s "
        f"({counter['chars'] / max(dt, 1e-9) / 1e6:.2f}M chars/s)")
    if save:
        tok.save(save)
        log(f"tokenizer: saved {save} (vocab {tok.vocab_size:,}, fingerprint {tok.fingerprint()[:12]})")
    return tok


# Short built-in samples of each kind of text, so that `picochat tokenizer eval` works anywhere.
EVAL_SAMPLES = {
    "english": (
        "The old lighthouse keeper climbed the spiral stairs every evening, long after the ships "
        "had stopped needing him. He said the habit kept his knees honest. In the village below, "
        "children argued about whether the lamp still worked, and nobody could agree on who had "
        "last seen it lit. When the storm finally came in November, the light swept the harbor "
        "once, twice, and then steadily until dawn."
    ),
    "code": (
        "def merge_sorted(a: list[int], b: list[int]) -> list[int]:\n"
        "    \"\"\"Merge two sorted lists in O(len(a) + len(b)).\"\"\"\n"
        "    out, i, j = [], 0, 0\n"
        "    while i < len(a) and j < len(b):\n"
        "        if a[i] <= b[j]:\n"
        "            out.append(a[i]); i += 1\n"
        "        else:\n"
        "            out.append(b[j]); j += 1\n"
        "    return out + a[i:] + b[j:]\n\n"
        "for x in range(10):\n    print(f\"{x:>3} {x ** 2:>5}\")  # squares\n"
    ),
    "math": (
        "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips "
        "in May. 48 / 2 = 24, so 48 + 24 = 72 clips in total. Solve 3x^2 - 12x + 9 = 0: "
        "x = (12 ± sqrt(144 - 108)) / 6 = (12 ± 6) / 6, so x = 3 or x = 1. "
        "1234567 * 89 = 109876463; 3.14159 * 2.71828 ≈ 8.5397; 2^10 = 1024; 10% of 250 is 25."
    ),
    "multilingual": (
        "Le renard brun saute par-dessus le chien paresseux. Der schnelle braune Fuchs springt über "
        "den faulen Hund. Быстрая коричневая лиса прыгает через ленивую собаку. "
        "敏捷的棕色狐狸跳过了懒狗。素早い茶色の狐がのろまな犬を飛び越える。 "
        "빠른 갈색 여우가 게으른 개를 뛰어넘는다. الثعلب البني السريع يقفز فوق الكلب الكسول. "
        "🦊💨🐕 ¡Qué rápido! Ελληνικά: η γρήγορη καφέ αλεπού."
    ),
    "chat": (
        "<|bos|><|user_start|>What is the capital of France, and how many people live there?"
        "<|user_end|><|assistant_start|>The capital of France is Paris. About 2.1 million people "
        "live in the city proper and roughly 12 million in the metropolitan area.<|assistant_end|>"
        "<|user_start|>What is 17 * 23?<|user_end|><|assistant_start|>Let me compute it: "
        "<|python_start|>17 * 23<|python_end|><|output_start|>391<|output_end|>17 * 23 = 391."
        "<|assistant_end|>"
    ),
}


def _encode_with_specials(tok: Tokenizer, text: str) -> list[int]:
    # Chat text is eval'd as the model sees it: each special string is one special token.
    return tok.enc.encode(text, allowed_special=set(SPECIAL_TOKENS))


def eval_tokenizer(tokenizer: Tokenizer, samples: dict[str, str] | None = None) -> list[dict]:
    """`picochat tokenizer eval`: compression (UTF-8 bytes per token) on several kinds of text.

    Special tokens count as tokens of 0 bytes (as in bits-per-byte), so chat text measures how
    well the words between the markers compress plus the markers' token cost."""
    samples = EVAL_SAMPLES if samples is None else samples
    lengths = tokenizer.token_byte_lengths()
    rows = []
    for kind, text in samples.items():
        ids = _encode_with_specials(tokenizer, text)
        nbytes = sum(lengths[i] for i in ids)
        rows.append({"kind": kind, "bytes": nbytes, "tokens": len(ids),
                     "bytes_per_token": nbytes / max(len(ids), 1)})
    return rows


def format_eval_table(rows: list[dict]) -> str:
    """The eval rows as a markdown table."""
    lines = ["| kind | bytes | tokens | bytes/token |", "|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['kind']} | {r['bytes']:,} | {r['tokens']:,} | {r['bytes_per_token']:.2f} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the commands

@dataclass
class TokenizerTrainConfig:
    data: list[str] = setting(help=f"the text to train on: {TEXT_FILES}")
    save: str = setting(help="tokenizer.json to write")
    vocab_size: int = setting(32768, "tokens in the vocabulary, the special tokens included", low=MIN_VOCAB_SIZE)
    max_chars: int = setting(2_000_000_000, "stop reading text after this many characters", low=1)


def tokenizer_train(cfg: TokenizerTrainConfig) -> Tokenizer:
    """`picochat tokenizer train`."""
    check(cfg)
    return train_tokenizer(cfg.data, cfg.vocab_size, save=cfg.save, max_chars=cfg.max_chars)


@dataclass
class TokenizerEvalConfig:
    tokenizer: str = setting(help="tokenizer.json, or a run dir")


def tokenizer_eval(cfg: TokenizerEvalConfig) -> list[dict]:
    """`picochat tokenizer eval`: bytes per token on several kinds of text."""
    path = os.path.join(cfg.tokenizer, "tokenizer.json") if os.path.isdir(cfg.tokenizer) else cfg.tokenizer
    return eval_tokenizer(Tokenizer.load(path))
