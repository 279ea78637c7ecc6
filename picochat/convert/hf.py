"""A transformers model directory, written from a picochat model and read back into one.

    config.json              model_type "nanochat" (transformers' own) or "picochat" (remote code)
    model.safetensors        the weights under transformers' names (layout.py)
    tokenizer.json           the run dir's, unchanged (the tokenizers library's own format; <|bos|>
                             in front when special tokens are asked for)
    tokenizer_config.json    bos, eos (<|assistant_end|>), pad, and a chat template that renders
                             a conversation to the ids conversation.py makes
    generation_config.json   the ids generation stops at
    configuration_picochat.py, modeling_picochat.py   for the remote-code architecture only

The chat template is a Jinja transcription of conversation.render_conversation: bos, a system
message folded into the first user message after a blank line, <|user_start|>...<|user_end|>,
<|assistant_start|>...<|assistant_end|> with calculator calls and outputs as their special
tokens, and <|assistant_start|> as the generation prompt. transformers tokenizes the rendered text
with the special tokens split out first, so each piece of text is encoded on its own, as picochat
encodes it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file

from ..common import PicochatError, save_safetensors
from ..config import ModelConfig
from ..model import vocab_rows
from ..tokenizer import (ASSISTANT_END, ASSISTANT_START, BOS, OUTPUT_END, OUTPUT_START, PYTHON_END, PYTHON_START,
                         SPECIAL_TOKENS, USER_END, USER_START, Tokenizer)
from .layout import REMOTE, from_hf, to_hf

REMOTE_FILES = ("configuration_picochat.py", "modeling_picochat.py")

CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- set ns = namespace(system='') -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}"
    "{%- set ns.system = message['content'] + '\\n\\n' -%}"
    "{%- elif message['role'] == 'user' -%}"
    f"{{{{- '{USER_START}' + ns.system + message['content'] + '{USER_END}' -}}}}"
    "{%- set ns.system = '' -%}"
    "{%- else -%}"
    f"{{{{- '{ASSISTANT_START}' -}}}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for part in message['content'] -%}"
    f"{{%- if part['type'] == 'python' -%}}{{{{- '{PYTHON_START}' + part['text'] + '{PYTHON_END}' -}}}}"
    f"{{%- elif part['type'] == 'python_output' -%}}{{{{- '{OUTPUT_START}' + part['text'] + '{OUTPUT_END}' -}}}}"
    "{%- else -%}{{- part['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    f"{{{{- '{ASSISTANT_END}' -}}}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    f"{{%- if add_generation_prompt -%}}{{{{- '{ASSISTANT_START}' -}}}}{{%- endif -%}}"
)
EOS, PAD = ASSISTANT_END, BOS


def write_dir(tmp: Path, config: ModelConfig, weights: dict[str, torch.Tensor], tok: Tokenizer, architecture: str,
              dtype: torch.dtype, picochat_meta: dict) -> None:
    """Every file of the directory into `tmp` (the caller renames it into place)."""
    hf, named = to_hf(config, weights, architecture)
    ids = {name: tok.special_id(name) for name in (BOS, EOS, PAD)}
    hf.update(bos_token_id=ids[BOS], eos_token_id=ids[EOS], pad_token_id=ids[PAD], dtype=_dtype_name(dtype),
              use_cache=True, transformers_version=_transformers_version(), picochat=picochat_meta)
    named = {k: v.to(dtype).contiguous() for k, v in named.items()}
    save_safetensors(named, tmp / "model.safetensors")
    (tmp / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    tok.save(tmp / "tokenizer.json")
    (tmp / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOS, "pad_token": PAD,
        "chat_template": CHAT_TEMPLATE, "model_max_length": config.sequence_len, "clean_up_tokenization_spaces": False,
        "added_tokens_decoder": {str(tok.special_id(n)): {"content": n, "special": True, "lstrip": False,
                                                          "rstrip": False, "normalized": False, "single_word": False}
                                 for n in SPECIAL_TOKENS},
    }, indent=2) + "\n")
    (tmp / "special_tokens_map.json").write_text(json.dumps({"bos_token": BOS, "eos_token": EOS, "pad_token": PAD},
                                                            indent=2) + "\n")
    (tmp / "generation_config.json").write_text(json.dumps({
        "bos_token_id": ids[BOS], "eos_token_id": [ids[EOS], ids[BOS]], "pad_token_id": ids[PAD],
        "transformers_version": _transformers_version()}, indent=2) + "\n")
    if architecture == REMOTE:
        for name in REMOTE_FILES:
            shutil.copyfile(Path(__file__).parent / "remote" / name, tmp / name)


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[dtype]


def _transformers_version() -> str:
    try:
        import transformers
        return transformers.__version__
    except ImportError:
        return "5.0.0"


def read_dir(src: Path) -> tuple[ModelConfig, dict[str, torch.Tensor], Tokenizer, dict]:
    """A transformers directory -> (picochat config, weights, tokenizer, what config.json said of
    picochat: the stage it came from, when picochat wrote it)."""
    for name in ("config.json", "tokenizer.json"):
        if not (src / name).is_file():
            raise PicochatError(f"{src}: {name} is missing (a transformers model directory has config.json, "
                                "model.safetensors and tokenizer.json)")
    files = sorted(src.glob("model*.safetensors"))
    if not files:
        found = [p.name for p in src.glob("*.bin")]
        raise PicochatError(f"{src}: no model.safetensors" + (f" (only {', '.join(found)}: pickled weights are not read; "
                                                              "convert them to safetensors)" if found else ""))
    try:
        hf = json.loads((src / "config.json").read_text())
        weights = {}
        for f in files:
            weights.update(load_file(f))
    except (OSError, ValueError, SafetensorError) as e:
        raise PicochatError(f"{src}: cannot read it ({e})") from None
    config, state = from_hf(hf, {k: v.float() for k, v in weights.items()})
    tok, specials = tokenizer_from_hf(json.loads((src / "tokenizer.json").read_text(encoding="utf-8")), src)
    state = fit_vocab(state, config.vocab_size, tok, specials, str(src))
    config = ModelConfig.from_dict({**config.to_dict(), "vocab_size": tok.vocab_size})
    said = hf.get("picochat") or {}
    if said.get("model"):  # picochat wrote it: its own config, where it is the same network, comes back as it was
        ours = ModelConfig.from_dict(said["model"])
        if ours.layer_windows() == config.layer_windows() and _function(ours) == _function(config):
            config = ours
            state = {k: F.pad(w, (0, 0, 0, config.padded_vocab - w.size(0))) if vocab_rows(k) else w
                     for k, w in state.items()}  # its vocabulary's padding rows back (zeros: never a token)
    return config, state, tok, said


def _function(config: ModelConfig) -> dict:
    """The settings that decide what the network computes (not its init, rows' padding or how its
    windows were chosen: the windows themselves are compared apart)."""
    return {k: v for k, v in config.to_dict().items()
            if k not in ("window_pattern", "window", "window_rule", "scalar_init", "embed_std", "fc_init",
                         "vocab_multiple")}


def tokenizer_from_hf(data: dict, where) -> tuple[Tokenizer, int]:
    """picochat's tokenizer from a tokenizer.json, and how many of SPECIAL_TOKENS the file has (a
    nanochat one has the first nine; picochat adds its reserved ones after them)."""
    added = sorted((t["id"], t["content"]) for t in data.get("added_tokens", []))
    n = len(added)
    if [name for _, name in added] != SPECIAL_TOKENS[:n] or n < 5:
        raise PicochatError(f"{where}: its tokenizer's special tokens are {[name for _, name in added]}, not "
                            f"picochat's ({', '.join(SPECIAL_TOKENS[:5])}, ...)")
    base = min(i for i, _ in added)
    body = dict(data, added_tokens=[{"id": base + i, "content": name, "special": True}
                                    for i, name in enumerate(SPECIAL_TOKENS)])
    try:
        tok = Tokenizer._from_hf_json(body)
    except (PicochatError, KeyError, TypeError, ValueError) as e:
        raise PicochatError(f"{where}: its tokenizer is not one picochat encodes the same way ({e})") from None
    if [i for i, _ in added] != list(range(base, base + n)):
        raise PicochatError(f"{where}: its special tokens are not at the last ids")
    return tok, n


def fit_vocab(state: dict, rows: int, tok: Tokenizer, specials: int, where: str) -> dict:
    """The per-token weights (model.vocab_rows: embeddings and head) cut or grown to the tokenizer's
    vocab: a checkpoint's padding rows (nanochat rounds the vocab up to 64 and never uses them) go;
    the special tokens picochat reserves beyond the source's get zero rows (their logit is 0)."""
    n = tok.vocab_size - len(SPECIAL_TOKENS) + specials  # the ids the source knows
    if rows not in (n, -(-n // 64) * 64):
        raise PicochatError(f"{where}: the tokenizer has {n:,} tokens but the weights {rows:,} rows: the tokenizer "
                            "does not match the weights")
    out = dict(state)
    for key in filter(vocab_rows, state):
        w = state[key][:n]
        if tok.vocab_size > n:
            w = torch.cat([w, w.new_zeros(tok.vocab_size - n, w.size(1))])
        out[key] = w
    return out

