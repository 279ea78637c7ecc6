"""Model configuration and the depth presets: `--depth d` is the one knob that sizes a model.

ModelFeatures are the choices of the network's recipe that do not size it: rotary base, query/key
scale, value embeddings, smear, backout, the initialisation, vocabulary padding and the sliding
window's rule. Their defaults are picochat's network as it was before nanochat's 2026 changes, so
that a run dir recorded without them loads as it was trained; NANOCHAT_FEATURES is nanochat's
network at HEAD (92d63d4). Each is a pretraining flag (train/pretrain.py nests them).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

from .common import PicochatError
from .settings import setting

# depth -> (model dim, query heads, kv heads). Head dim is 64 up to depth 8 (small models want
# more heads per width), then 128 with dim = 64 * depth as nanochat sizes its models.
#   depth 4  ~ the Rust picochat's 28M model, depth 8 ~ its 90M model (GQA, 64-wide heads)
#   depth 16 = 16 x 1024 with full attention: 335M at vocab 65,536, the MPS fork's model
#   depth 20..26 = nanochat's d20..d26
DEPTH_PRESETS: dict[int, tuple[int, int, int]] = {
    2: (128, 2, 1),
    4: (384, 6, 2),
    6: (512, 8, 4),
    8: (768, 12, 4),
    12: (768, 6, 6),
    16: (1024, 8, 8),
    20: (1280, 10, 10),
    24: (1536, 12, 12),
    26: (1664, 13, 13),
    32: (2048, 16, 16),
}


WINDOW_RULES = ("quarter", "nanochat")
SIZINGS = ("table", "nanochat")
SCALAR_INITS = ("flat", "ramp")
VE_GATE_CHANNELS = 12  # a value embedding's gate reads this many channels of the block's input
SMEAR_CHANNELS = 24  # and smear's gate this many of the token's embedding


@dataclass
class ModelFeatures:
    rope_base: float = setting(10000.0, "rotary embedding base (nanochat: 100,000)", low=1)
    qk_scale: float = setting(1.0, "queries and keys are scaled by this after QK-norm (nanochat: 1.2)", low=0)
    value_embeds: bool = setting(False, "value embeddings (ResFormer): a per-token embedding added to the values "
                                        "of alternating layers, the last included, through a gate per kv head")
    smear: bool = setting(False, "mix the previous token's embedding into each token's, through a learned gate")
    backout: bool = setting(False, "subtract a learned multiple (0.2 at init) of the residual stream at the middle "
                                   "layer before the head")
    scalar_init: str = setting("flat", "per-layer residual scalars at init: flat (1 and 0) or ramp (nanochat: "
                                       "1.15 -> 1.05 and 0.20 -> 0.05 over depth)", choices=SCALAR_INITS)
    embed_std: float = setting(1.0, "std of the token embedding at init (nanochat: 0.8)", low=0)
    fc_init: float = setting(1.0, "the MLP's input projection's init bound, times this (nanochat: 0.4)", low=0)
    vocab_multiple: int = setting(1, "pad the embedding and head rows to a multiple of this (nanochat: 64)", low=1)
    window_rule: str = setting("quarter", "the sliding window when --window is not given: quarter (seq-len / 4 "
                                          "keys, the query's own included) or nanochat (seq-len / 4 rounded up to "
                                          "128 keys before the query's own)", choices=WINDOW_RULES)


# The pretraining command's network: the changes of nanochat's that won at depth 4 on CPU beyond the
# seed spread (bench/bench_recipe.py; the table is in DESIGN.md). ModelFeatures() stays the network
# as it was before each field existed, which is how a run dir without the field loads.
PICOCHAT_FEATURES = ModelFeatures(value_embeds=True, smear=True, embed_std=0.8, fc_init=0.4)
# nanochat's network at HEAD 92d63d4 (nanochat/gpt.py)
NANOCHAT_FEATURES = ModelFeatures(rope_base=100_000.0, qk_scale=1.2, value_embeds=True, smear=True, backout=True,
                                  scalar_init="ramp", embed_std=0.8, fc_init=0.4, vocab_multiple=64,
                                  window_rule="nanochat")


@dataclass
class ModelConfig(ModelFeatures):
    vocab_size: int = 32768
    n_layer: int = 4
    n_embd: int = 384
    n_head: int = 6
    n_kv_head: int = 2
    sequence_len: int = 1024
    # One letter per layer, repeated to cover the depth: S = sliding window, L = full context.
    # The last layer is always full so the final representation sees the whole context.
    window_pattern: str = "SSSL"
    window: int = 0  # sliding window length in tokens, the query's own included; 0: window_rule's
    softcap: float = 15.0

    def __post_init__(self):
        self.validate()

    @classmethod
    def from_depth(cls, depth: int, sizing: str = "table", **overrides) -> "ModelConfig":
        """The model of `depth` layers, sized by picochat's table (DEPTH_PRESETS) or by nanochat's
        rule: width 64 x depth rounded up to 128-wide heads, as many kv heads as heads (the two
        agree from depth 12 on)."""
        if sizing == "nanochat":
            dim = -(-64 * depth // 128) * 128
            return cls(n_layer=depth, n_embd=dim, n_head=dim // 128, n_kv_head=dim // 128, **overrides)
        if depth not in DEPTH_PRESETS:
            raise PicochatError(f"no preset for depth {depth} (choose from {sorted(DEPTH_PRESETS)}, or size it by "
                               "nanochat's rule: --sizing nanochat)")
        dim, heads, kv = DEPTH_PRESETS[depth]
        return cls(n_layer=depth, n_embd=dim, n_head=heads, n_kv_head=kv, **overrides)

    def validate(self) -> None:
        if self.n_embd % self.n_head:
            raise PicochatError(f"n_embd {self.n_embd} is not divisible by n_head {self.n_head}")
        if self.n_kv_head < 1 or self.n_head % self.n_kv_head:
            raise PicochatError(f"n_kv_head {self.n_kv_head} must divide n_head {self.n_head}")
        if (self.n_embd // self.n_head) % 2:
            raise PicochatError("head dim must be even for rotary embeddings")
        if not self.window_pattern or set(self.window_pattern) - {"S", "L"}:
            raise PicochatError(f"window pattern {self.window_pattern!r} must be letters S and L")
        if self.sequence_len < 1 or self.n_layer < 1 or self.vocab_size < 1 or self.vocab_multiple < 1:
            raise PicochatError("sequence_len, n_layer, vocab_size and vocab_multiple must be positive")
        if self.window_rule not in WINDOW_RULES or self.scalar_init not in SCALAR_INITS:
            raise PicochatError(f"window_rule must be one of {WINDOW_RULES} and scalar_init one of {SCALAR_INITS}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def mlp_hidden(self) -> int:
        """The MLP's inner width: 4 x the model's, as in GPT-2 and nanochat."""
        return 4 * self.n_embd

    @property
    def padded_vocab(self) -> int:
        """Rows of the embedding and the head: the vocabulary, padded (the logits are cut back)."""
        return -(-self.vocab_size // self.vocab_multiple) * self.vocab_multiple

    @property
    def window_len(self) -> int:
        """A sliding-window layer's keys, the query's own included."""
        if self.window:
            return self.window
        if self.window_rule == "nanochat":  # a 128-token tile of keys before the query, and the query
            return -(-self.sequence_len // 4 // 128) * 128 + 1
        return max(1, self.sequence_len // 4)

    def has_value_embed(self, layer: int) -> bool:
        """Value embeddings on alternating layers, the last one included."""
        return self.value_embeds and layer % 2 == (self.n_layer - 1) % 2

    @property
    def backout_layer(self) -> int | None:
        """The layer whose output backout subtracts before the head."""
        return self.n_layer // 2 if self.backout else None

    def layer_windows(self) -> list[int]:
        """Per layer: the attention window in tokens, or 0 for full causal attention."""
        pattern = (self.window_pattern * self.n_layer)[: self.n_layer]
        wins = [self.window_len if c == "S" else 0 for c in pattern]
        wins[-1] = 0
        return wins

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        """From config.json's "model" object; a key of the wrong type is named, with the type it needs."""
        types = {f.name: f.type for f in dataclasses.fields(cls)}
        unknown = set(d) - set(types)
        if unknown:
            raise PicochatError(f"unknown model config keys: {sorted(unknown)}")
        kinds = {"int": (int, "an integer"), "float": ((int, float), "a number"), "str": (str, "a string"),
                 "bool": (bool, "true or false")}
        for key, value in d.items():
            want, what = kinds[types[key]]
            if isinstance(value, bool) != (want is bool) or not isinstance(value, want):
                raise PicochatError(f"model config key {key!r} must be {what}, not {json.dumps(value)}")
        return cls(**d)
