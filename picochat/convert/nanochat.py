"""A nanochat checkpoint dir, read into picochat's model, without running any code it carries.

nanochat writes model_NNNNNN.pt (the state dict, torch.save), meta_NNNNNN.json (its model_config
and step) and, in its tokenizer dir, tokenizer.pkl (a pickled tiktoken Encoding) and token_bytes.pt.
The weights load with torch.load(weights_only=True); the tokenizer through an unpickler that
knows one class, tiktoken's Encoding, and rebuilds only its state (name, split pattern, ranks,
special tokens) without importing tiktoken's code: anything else in the pickle is refused.

A checkpoint does not say which nanochat wrote it, and nanochat's constants (rotary base,
query/key scale, short window) changed in its code, not its files. The weights tell the eras
apart, and each era's network is one picochat computes (ModelFeatures), found by name:
- October 2025 - January 10, 2026: no scalars, full context; rotary base 10,000.
- January 11 - 15: the residual and x0 scalars and the window pattern, whose short window,
  sequence_len // 2 keys before the query, is picochat's window of sequence_len // 2 + 1 keys
  counting the query's own.
- March 9 - 13: value embeddings on alternating layers with 12-channel gates, rotary base 100,000,
  queries and keys x 1.15, a short window of sequence_len / 3 rounded up to 128.
- March 14 on (HEAD 92d63d4): smear and backout besides, queries and keys x 1.2, a short window of
  sequence_len / 4 rounded up to 128: NANOCHAT_FEATURES.
Between January 16 and March 8 the value embeddings' gates read 32 channels and scaled by 2, and
engram came and went: those checkpoints are refused, naming what they have.
"""

from __future__ import annotations

import dataclasses
import json
import pickle
import re
from pathlib import Path

import torch

from ..common import PicochatError, first_line, log
from ..config import NANOCHAT_FEATURES, VE_GATE_CHANNELS, ModelConfig, ModelFeatures
from ..model import GPT, vocab_rows
from ..tokenizer import SPECIAL_TOKENS, SPLIT_PATTERN, Tokenizer
from .hf import fit_vocab

# what some nanochat models between January 16 and March 8, 2026 have, and picochat's network not
REFUSED = {"engram": "engram", "v0_lambdas": "value-embedding mixing scalars (v0_lambdas)"}


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
    config, weights = from_nanochat(state, mc, str(src))
    tok, specials = read_tokenizer(find_tokenizer(src, tokenizer))
    weights = fit_vocab(weights, weights["wte.weight"].size(0), tok, specials, str(src))
    config = dataclasses.replace(config, vocab_size=tok.vocab_size)
    if specials < len(SPECIAL_TOKENS):
        log(f"import: nanochat has {specials} special tokens; picochat's other {len(SPECIAL_TOKENS) - specials} "
            "(reserved, never trained) get zero rows")
    return config, weights, tok, {"step": step, "nanochat_meta": {k: v for k, v in meta.items() if k != "model_config"}}


def from_nanochat(state: dict[str, torch.Tensor], mc: dict, where: str) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """picochat's config and weights (fp32, the vocab's padding rows cut) for a nanochat state dict
    and its model_config, the network's era read off its weights (the module's docstring)."""
    have = sorted({label for key in state for part, label in REFUSED.items() if part in key})
    gates = [w for key, w in state.items() if key.endswith("attn.ve_gate.weight")]
    if gates and gates[0].size(1) != VE_GATE_CHANNELS:
        have.append(f"value-embedding gates over {gates[0].size(1)} channels (nanochat before March 9, 2026)")
    if have:
        raise PicochatError(f"{where}: this nanochat model has {' and '.join(have)}, which picochat's network does not "
                            "compute: it cannot be imported exactly")
    n_layer, seq, vocab = mc["n_layer"], mc["sequence_len"], mc["vocab_size"]
    smear, backout = "smear_gate.weight" in state, "backout_lambda" in state
    ve = sorted(int(k.split(".")[1]) for k in state if k.startswith("value_embeds."))
    if smear or backout:  # HEAD's network
        era = dataclasses.replace(NANOCHAT_FEATURES, smear=smear, backout=backout, value_embeds=bool(ve),
                                  vocab_multiple=1)
        window = 0
    elif ve:  # March 9 - 13
        era = dataclasses.replace(NANOCHAT_FEATURES, smear=False, backout=False, qk_scale=1.15, vocab_multiple=1)
        window = -(-seq // 3 // 128) * 128 + 1
    else:  # before January 16
        era, window = ModelFeatures(), seq // 2 + 1
    config = ModelConfig(vocab_size=vocab, n_layer=n_layer, n_embd=mc["n_embd"], n_head=mc["n_head"],
                         n_kv_head=mc.get("n_kv_head", mc["n_head"]), sequence_len=seq,
                         window_pattern=mc.get("window_pattern", "L").upper(), window=window, **dataclasses.asdict(era))
    if ve and ve != [i for i in range(n_layer) if config.has_value_embed(i)]:
        raise PicochatError(f"{where}: value embeddings on layers {ve}: picochat's are on alternating layers, the last "
                            "included")
    weights = {}
    for key, w in state.items():  # nanochat's names are picochat's, the blocks under transformer.h
        name = key.removeprefix("transformer.")
        weights["blocks." + name[2:] if name.startswith("h.") else name] = w.float()
    weights.setdefault("resid_lambdas", torch.ones(n_layer))
    weights.setdefault("x0_lambdas", torch.zeros(n_layer))
    expected = {k: tuple(v.shape) for k, v in _meta_state(config).items()}
    weights = {k: w[:vocab] if vocab_rows(k) else w for k, w in weights.items()}
    unknown = sorted(set(weights) - set(expected))
    if unknown:
        raise PicochatError(f"{where}: weight {unknown[0]!r} is not one picochat's network has: it cannot be imported "
                            "exactly")
    wrong = [k for k in expected if k not in weights or tuple(weights[k].shape) != expected[k]]
    if wrong:
        raise PicochatError(f"{where}: weight {wrong[0]!r} is missing or of another shape than its model_config says")
    return config, weights


def _meta_state(config: ModelConfig) -> dict:
    with torch.device("meta"):
        return GPT(config).state_dict()
