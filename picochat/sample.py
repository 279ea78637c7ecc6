"""`picochat sample`: continue a prompt with a model from a run dir."""

from __future__ import annotations

from dataclasses import dataclass

from .common import autocast
from .decode_batch import GenRequest
from .engine import Engine
from .inference import LoadOptions, open_for_inference
from .settings import setting


@dataclass
class SamplingOptions:
    """How to sample a reply: nested in sample's and chat's configs, each with its own defaults."""
    temperature: float = setting(0.8, "0 = greedy", low=0)
    top_k: int = setting(50, "sample from the k most likely tokens (0: from all)", low=0)
    top_p: float | None = setting(None, "nucleus sampling: the smallest set of tokens with this much probability "
                                        "(default: off)", low=0, high=1)
    max_tokens: int = setting(128, "tokens to generate at most", low=1)
    seed: int | None = setting(0, "random seed (same seed, same text)")


@dataclass
class SampleConfig:
    model: LoadOptions = setting(help="the model to use")
    prompt: str = setting("", "the text to continue (default: none, from <|bos|> alone)")
    num_samples: int = setting(1, "how many continuations", low=1)
    sampling: SamplingOptions = setting(factory=SamplingOptions)


def sample(cfg: SampleConfig) -> list[str]:
    return continuations(open_for_inference(cfg.model), cfg.prompt, cfg.sampling, cfg.num_samples)


def continuations(run, prompt: str, s: SamplingOptions, n: int = 1) -> list[str]:
    """`n` continuations of `prompt` by an opened run dir (inference.open_for_inference)."""
    tok = run.tokenizer
    ids = [tok.bos_id] + tok.encode(prompt)
    seed = s.seed if s.seed is not None else 0
    engine = Engine(run.model, stops=(tok.bos_id,))  # a base model's text: no turns, no calculator
    with autocast(run.device, run.decode_dtype):
        return [prompt + tok.decode(completion.tokens) for i in range(n)
                for _, (completion,) in engine.complete([GenRequest(ids, 1, s.max_tokens, s.temperature, s.top_k or None,
                                                                    s.top_p, seed + i)])]
