"""A nanochat checkpoint dir, read into picochat's model, without running any code it carries.

nanochat writes model_NNNNNN.pt (the state dict, torch.save), meta_NNNNNN.json (its model_config
and step) and, in its tokenizer dir, tokenizer.pkl (a pickled tiktoken Encoding) and token_bytes.pt.
The weights load with torch.load(weights_only=True); the tokenizer through an unpickler that
knows one class, tiktoken's Encoding, and rebuilds only its state (name, split pattern, ranks,
special tokens) without importing tiktoken's code: anything else in the pickle is refused.

nanochat's network is picochat's until January 16, 2026: the same norms, rotary embeddings
(base 10,000), QK-norm, ReLU^2 MLP, soft cap, and (from January 11) the residual and x0 scalars
and the window pattern, whose short window, sequence_len // 2 keys before the query, is
picochat's window of sequence_len // 2 + 1 keys counting the query's own. Checkpoints after that
add value embeddings, and later smear, backout, a rotary base of 100,000 and scaled queries:
they are refused, naming what they have.
"""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

import torch

from ..common import PicochatError, first_line, log
from ..config import ModelConfig
from ..tokenizer import SPECIAL_TOKENS, SPLIT_PATTERN, Tokenizer
from .hf import fit_vocab

_LAYER = re.compile(r"transformer\.h\.(\d+)\.(attn\.c_q|attn\.c_k|attn\.c_v|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight")
# what later nanochat models have and picochat's network does not
FEATURES = {"value_embed": "value embeddings", "ve_gate": "value-embedding gates", "v0_lambdas": "value embeddings",
            "smear": "smear", "backout": "backout", "engram": "engram"}


class _EncodingState:
    """Stands in for tiktoken.core.Encoding while unpickling: keeps the state, runs nothing."""

    def __setstate__(self, state):
        self.state = state


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) == ("tiktoken.core", "Encoding"):
            return _EncodingState
        raise PicochatError(f"tokenizer.pkl asks for {module}.{name}: refused (picochat reads a tiktoken Encoding's "
                            "state from it and never runs code from a checkpoint)")


def read_tokenizer(path: Path) -> tuple[Tokenizer, int]:
    """picochat's tokenizer from nanochat's tokenizer.pkl, and how many special tokens it had."""
    try:
        with open(path, "rb") as f:
            enc = _SafeUnpickler(f).load()
    except PicochatError:
        raise
    except Exception as e:  # a truncated or foreign pickle raises many kinds
        raise PicochatError(f"{path}: not a nanochat tokenizer ({type(e).__name__}: {e})") from None
    state = getattr(enc, "state", None)
    if not isinstance(state, dict) or not isinstance(state.get("mergeable_ranks"), dict):
        raise PicochatError(f"{path}: not a pickled tiktoken Encoding")
    if state.get("pat_str") != SPLIT_PATTERN:
        raise PicochatError(f"{path}: its split pattern is not nanochat's (and picochat's): it would tokenize "
                            "differently")
    specials = sorted(state.get("special_tokens", {}).items(), key=lambda kv: kv[1])
    ranks = state["mergeable_ranks"]
    names = [name for name, _ in specials]
    if names != SPECIAL_TOKENS[:len(names)] or [i for _, i in specials] != list(range(len(ranks), len(ranks) + len(names))):
        raise PicochatError(f"{path}: its special tokens {names} are not nanochat's, after the merges")
    try:
        return Tokenizer(dict(ranks)), len(names)
    except (PicochatError, ValueError, TypeError) as e:
        raise PicochatError(f"{path}: cannot rebuild the tokenizer ({e})") from None


def find_tokenizer(src: Path, given: str | None) -> Path:
    """tokenizer.pkl: given, in the checkpoint dir, or nanochat's tokenizer/ dir a few levels up
    (~/.cache/nanochat/{tokenizer, base_checkpoints/d20})."""
    if given:
        path = Path(given)
        path = path / "tokenizer.pkl" if path.is_dir() else path
        if not path.is_file():
            raise PicochatError(f"--tokenizer: {path} not found")
        return path
    for d in (src, *list(src.resolve().parents)[:3]):
        for path in (d / "tokenizer.pkl", d / "tokenizer" / "tokenizer.pkl"):
            if path.is_file():
                return path
    raise PicochatError(f"{src}: no tokenizer.pkl there or in a tokenizer/ dir above it; give it with --tokenizer")


def read_checkpoint(src: Path, step: int | None = None, tokenizer: str | None = None,
                    ) -> tuple[ModelConfig, dict[str, torch.Tensor], Tokenizer, dict]:
    """(config, picochat weights, tokenizer, meta) of the checkpoint at `step` (default: the last)."""
    steps = sorted(int(m.group(1)) for p in src.glob("model_*.pt") if (m := re.fullmatch(r"model_(\d+)\.pt", p.name)))
    if not steps:
        raise PicochatError(f"{src}: no model_NNNNNN.pt (a nanochat checkpoint dir has model_NNNNNN.pt and "
                            "meta_NNNNNN.json)")
    step = steps[-1] if step is None else step
    if step not in steps:
        raise PicochatError(f"{src}: no checkpoint at step {step} (it has {', '.join(map(str, steps))})")
    meta_path = src / f"meta_{step:06d}.json"
    try:
        meta = json.loads(meta_path.read_text())
        mc = meta["model_config"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise PicochatError(f"{meta_path}: unreadable or without model_config ({e})") from None
    try:
        state = torch.load(src / f"model_{step:06d}.pt", map_location="cpu", weights_only=True)
    except Exception as e:  # weights_only refuses anything but tensors and containers
        raise PicochatError(f"{src / f'model_{step:06d}.pt'}: cannot be read as weights ({first_line(e)})") from None
    state = {k.removeprefix("_orig_mod."): v for k, v in state.items()}
    have = sorted({label for key in state for part, label in FEATURES.items() if part in key})
    if have:
        raise PicochatError(f"{src}: this nanochat model has {' and '.join(have)}, which picochat's network does not "
                            "(nanochat after January 16, 2026): it cannot be imported exactly")
    tok, specials = read_tokenizer(find_tokenizer(src, tokenizer))
    n_layer, seq = mc["n_layer"], mc["sequence_len"]
    pattern = mc.get("window_pattern", "L").upper()
    config = ModelConfig(vocab_size=tok.vocab_size, n_layer=n_layer, n_embd=mc["n_embd"], n_head=mc["n_head"],
                         n_kv_head=mc.get("n_kv_head", mc["n_head"]), sequence_len=seq, window_pattern=pattern,
                         window=seq // 2 + 1)
    weights = {}
    for key, w in state.items():
        if m := _LAYER.fullmatch(key):
            weights[f"blocks.{m.group(1)}.{m.group(2)}.weight"] = w.float()
        elif key in ("transformer.wte.weight", "lm_head.weight"):
            weights["wte.weight" if key.startswith("transformer") else key] = w.float()
        elif key in ("resid_lambdas", "x0_lambdas"):
            weights[key] = w.float()
        else:
            raise PicochatError(f"{src}: weight {key!r} is not one picochat's network has: it cannot be imported exactly")
    weights.setdefault("resid_lambdas", torch.ones(n_layer))
    weights.setdefault("x0_lambdas", torch.zeros(n_layer))
    weights = fit_vocab(weights, weights["wte.weight"].size(0), tok, specials, str(src))
    if specials < len(SPECIAL_TOKENS):
        log(f"import: nanochat has {specials} special tokens; picochat's other {len(SPECIAL_TOKENS) - specials} "
            "(reserved, never trained) get zero rows")
    return config, weights, tok, {"step": step, "nanochat_meta": {k: v for k, v in meta.items() if k != "model_config"}}

