"""picochat's model under transformers' names, and back: the weight names, the config, and which
of the two architectures holds a given model exactly.

transformers' NanoChat ("nanochat", no remote code) is picochat's network without its sliding
windows and its two scalars per layer. The residual scales fold into the output projections:
RMSNorm ignores a positive scale, so with C_i the product of the first i+1 residual scales, the
stream C_i * z flows exactly as z does once each layer's o_proj and fc2 are divided by C_i. A
model whose windows reach inside its context, whose x0 mixing was trained, or whose residual
scale is not positive needs the remote-code architecture (remote/modeling_picochat.py), which has
them all under the same names.
"""

from __future__ import annotations

import torch

from ..common import PicochatError, log
from ..config import ModelConfig
from ..model import vocab_rows

# RMSNorm's epsilon in picochat: F.rms_norm's default, the dtype's machine epsilon (fp32)
RMS_EPS = torch.finfo(torch.float32).eps
NATIVE, REMOTE = "nanochat", "picochat"

# picochat name -> transformers name. Inside a layer the attention is self_attn and the known
# projections take transformers' names; a module or parameter of the model's that is not named here
# (a feature's gate, its scalars, its embeddings) keeps its own name, under model. (or the layer's
# self_attn / mlp), so a new feature exports and imports with no change here.
_TOP = {"wte.weight": "model.embed_tokens.weight", "lm_head.weight": "lm_head.weight"}
_PART = {"attn": "self_attn", "mlp": "mlp"}
_CHILD = {"c_q": "q_proj", "c_k": "k_proj", "c_v": "v_proj", "c_proj": "o_proj"}  # attention's
_MLP = {"c_fc": "fc1", "c_proj": "fc2"}


def hf_name(name: str) -> str:
    if name in _TOP:
        return _TOP[name]
    if not name.startswith("blocks."):
        return f"model.{name}"
    _, i, part, rest = name.split(".", 3)  # blocks.{i}.attn.c_q.weight
    child, param = rest.split(".", 1)
    child = (_MLP if part == "mlp" else _CHILD).get(child, child)
    return f"model.layers.{i}.{_PART[part]}.{child}.{param}"


def picochat_name(name: str) -> str:
    for ours, theirs in _TOP.items():
        if name == theirs:
            return ours
    if not name.startswith("model."):
        raise PicochatError(f"unexpected weight {name!r}")
    if not name.startswith("model.layers."):
        return name.removeprefix("model.")
    _, _, i, part, rest = name.split(".", 4)
    back = {v: k for k, v in _PART.items()}
    if part not in back or "." not in rest:
        raise PicochatError(f"unexpected weight {name!r}")
    child, param = rest.split(".", 1)
    child = {v: k for k, v in (_MLP if part == "mlp" else _CHILD).items()}.get(child, child)
    return f"blocks.{i}.{back[part]}.{child}.{param}"


def why_remote(config: ModelConfig, weights: dict[str, torch.Tensor]) -> list[str]:
    """What of this model transformers' NanoChat cannot compute (nothing: it can)."""
    features = {"value embeddings": config.value_embeds, "smear": config.smear, "backout": config.backout,
                f"queries and keys scaled by {config.qk_scale:g}": config.qk_scale != 1.0}
    reasons = [name for name, on in features.items() if on]
    active = sorted({w for w in config.layer_windows() if w and w < config.sequence_len})
    if active:
        reasons.append(f"sliding windows of {', '.join(map(str, active))} tokens within its context of "
                       f"{config.sequence_len}")
    if weights["x0_lambdas"].abs().max() > 0:
        reasons.append("trained x0 mixing (x0_lambdas)")
    if (weights["resid_lambdas"] <= 0).any():
        reasons.append("a residual scale that is not positive (it cannot be folded)")
    return reasons


def to_hf(config: ModelConfig, weights: dict[str, torch.Tensor], architecture: str) -> tuple[dict, dict]:
    """(config.json's model fields, weights) under transformers' names, for `architecture`
    (NATIVE: residual scales folded, the scalars gone; REMOTE: as they are), the vocabulary's
    padding rows cut."""
    weights = {k: w[:config.vocab_size] if vocab_rows(k) else w for k, w in weights.items()}
    common = {"vocab_size": config.vocab_size, "hidden_size": config.n_embd,
              "num_hidden_layers": config.n_layer, "num_attention_heads": config.n_head,
              "num_key_value_heads": config.n_kv_head, "max_position_embeddings": config.sequence_len,
              "intermediate_size": config.mlp_hidden, "final_logit_softcapping": config.softcap,
              "rms_norm_eps": RMS_EPS, "tie_word_embeddings": False}
    out = {}
    if architecture == NATIVE:
        scale = torch.cumprod(weights["resid_lambdas"].double(), 0)
        for name, w in weights.items():
            if name in ("resid_lambdas", "x0_lambdas"):
                continue
            if name.endswith(("attn.c_proj.weight", "mlp.c_proj.weight")):
                w = (w.double() / scale[int(name.split(".")[1])]).to(w.dtype)
            out[hf_name(name)] = w
        hf = {"model_type": NATIVE, "architectures": ["NanoChatForCausalLM"], **common,
              "hidden_act": "relu2", "attention_bias": False,
              "attention_dropout": 0.0, "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_base}}
        return hf, out
    out = {hf_name(name): w for name, w in weights.items()}
    windows = config.layer_windows()
    hf = {"model_type": REMOTE, "architectures": ["PicochatForCausalLM"], **common,
          "layer_types": ["sliding_attention" if w else "full_attention" for w in windows],
          "sliding_window": max(windows) or None, "rope_theta": config.rope_base, "qk_scale": config.qk_scale,
          "value_embed_layers": [i for i in range(config.n_layer) if config.has_value_embed(i)],
          "smear": config.smear, "backout_layer": config.backout_layer,
          "auto_map": {"AutoConfig": "configuration_picochat.PicochatConfig",
                       "AutoModel": "modeling_picochat.PicochatModel",
                       "AutoModelForCausalLM": "modeling_picochat.PicochatForCausalLM"}}
    return hf, out


def layer_windows(hf: dict) -> list[int]:
    """Per layer, the keys a query sees counting its own, or 0 (all): from transformers'
    layer_types and sliding_window, or from the `windows` list picochat exported before them."""
    if "layer_types" in hf:
        return [(hf.get("sliding_window") or 0) if t == "sliding_attention" else 0 for t in hf["layer_types"]]
    return hf.get("windows") or [0] * hf["num_hidden_layers"]


def windows_to_pattern(windows: list[int], n_layer: int) -> tuple[str, int]:
    """picochat's (window_pattern, window) for per-layer windows (0: full)."""
    sliding = sorted({w for w in windows if w})
    if len(sliding) > 1:
        raise PicochatError(f"layers with different sliding windows ({', '.join(map(str, sliding))}): picochat "
                            "has one window size")
    if len(windows) != n_layer or (windows and windows[-1]):
        raise PicochatError("the last layer has a sliding window: picochat's last layer always sees the whole context")
    return "".join("S" if w else "L" for w in windows), (sliding[0] if sliding else 0)


def from_hf(hf: dict, weights: dict[str, torch.Tensor]) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """A transformers config (NanoChat or picochat's remote code) and its weights -> picochat's,
    refusing, by name, what picochat's model would compute differently."""
    kind = hf.get("model_type")
    if kind not in (NATIVE, REMOTE):
        raise PicochatError(f"model_type {kind!r}: picochat imports {NATIVE!r} (transformers' NanoChat) and "
                            f"{REMOTE!r} (its own export)")
    d, heads = hf["hidden_size"], hf["num_attention_heads"]
    n_layer = hf["num_hidden_layers"]
    if hf.get("hidden_act", "relu2") != "relu2":
        raise PicochatError(f"hidden_act {hf['hidden_act']!r}: picochat's MLP is relu2")
    if hf.get("attention_bias") or hf.get("head_dim", d // heads) != d // heads:
        raise PicochatError("attention with biases or another head_dim: picochat's attention has neither")
    rope = hf.get("rope_parameters") or {"rope_theta": hf.get("rope_theta", 10000.0)}  # transformers 5, and before
    if rope.get("rope_type", "default") != "default":
        raise PicochatError(f"rope_type {rope['rope_type']!r}: picochat's rotary embedding is the default one")
    pattern, window = ("L", 0) if kind == NATIVE else windows_to_pattern(layer_windows(hf), n_layer)
    config = ModelConfig(vocab_size=hf["vocab_size"], n_layer=n_layer, n_embd=d, n_head=heads,
                         n_kv_head=hf.get("num_key_value_heads") or heads, sequence_len=hf["max_position_embeddings"],
                         window_pattern=pattern, window=window,
                         softcap=float(hf.get("final_logit_softcapping") or 0.0),
                         rope_base=float(rope.get("rope_theta", 10000.0)), qk_scale=float(hf.get("qk_scale", 1.0)),
                         value_embeds=bool(hf.get("value_embed_layers")), smear=bool(hf.get("smear")),
                         backout=hf.get("backout_layer") is not None)
    if (hf.get("value_embed_layers") or []) != [i for i in range(n_layer) if config.has_value_embed(i)] or \
            hf.get("backout_layer", config.backout_layer) != config.backout_layer:
        raise PicochatError(f"value embeddings on layers {hf.get('value_embed_layers')} or backout at layer "
                            f"{hf.get('backout_layer')}: picochat's are on alternating layers (the last included) "
                            f"and at layer {n_layer // 2}")
    if hf.get("intermediate_size", config.mlp_hidden) != config.mlp_hidden:
        raise PicochatError(f"intermediate_size {hf['intermediate_size']}: picochat's MLP is 4 x hidden_size "
                            f"({config.mlp_hidden})")
    if not config.softcap:
        raise PicochatError("no final_logit_softcapping: picochat's logits are always soft-capped")
    eps = hf.get("rms_norm_eps", RMS_EPS)
    if abs(eps - RMS_EPS) > 1e-12:  # transformers' NanoChat config says 1e-6 where nanochat itself used this
        log(f"import: rms_norm_eps {eps:g} in config.json; picochat's RMSNorm uses fp32's machine epsilon "
            f"({RMS_EPS:.3g}), as nanochat's own model does")
    state = {}
    for name, w in weights.items():
        if (name == "lm_head.weight" and hf.get("tie_word_embeddings")) or name.endswith("rotary_emb.inv_freq"):
            continue  # the head is the embedding; the rotary frequencies are computed, not loaded
        state[picochat_name(name)] = w
    if hf.get("tie_word_embeddings"):
        state["lm_head.weight"] = weights["model.embed_tokens.weight"].clone()
    state.setdefault("resid_lambdas", torch.ones(n_layer))
    state.setdefault("x0_lambdas", torch.zeros(n_layer))
    return config, state
