"""Model configuration and the depth presets: `--depth d` is the one knob that sizes a model."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

from .common import PicochatError

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


@dataclass
class ModelConfig:
    vocab_size: int = 32768
    n_layer: int = 4
    n_embd: int = 384
    n_head: int = 6
    n_kv_head: int = 2
    sequence_len: int = 1024
    # One letter per layer, repeated to cover the depth: S = sliding window, L = full context.
    # The last layer is always full so the final representation sees the whole context.
    window_pattern: str = "SSSL"
    window: int = 0  # sliding window length in tokens; 0 means sequence_len // 4
    softcap: float = 15.0
    rope_base: float = 10000.0

    def __post_init__(self):
        self.validate()

    @classmethod
    def from_depth(cls, depth: int, **overrides) -> "ModelConfig":
        if depth not in DEPTH_PRESETS:
            raise PicochatError(f"no preset for depth {depth} (choose from {sorted(DEPTH_PRESETS)})")
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
        if self.sequence_len < 1 or self.n_layer < 1 or self.vocab_size < 1:
            raise PicochatError("sequence_len, n_layer and vocab_size must be positive")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def mlp_hidden(self) -> int:
        """The MLP's inner width: 4 x the model's, as in GPT-2 and nanochat."""
        return 4 * self.n_embd

    @property
    def window_len(self) -> int:
        return self.window or max(1, self.sequence_len // 4)

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
        kinds = {"int": (int, "an integer"), "float": ((int, float), "a number"), "str": (str, "a string")}
        for key, value in d.items():
            want, what = kinds[types[key]]
            if isinstance(value, bool) or not isinstance(value, want):
                raise PicochatError(f"model config key {key!r} must be {what}, not {json.dumps(value)}")
        return cls(**d)
