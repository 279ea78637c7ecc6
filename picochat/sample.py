"""`picochat sample`: continue a prompt with a model from a run dir."""

from __future__ import annotations

from .checkpoint import load_run
from .common import choose_device, set_threads
from .engine import generate


def sample(load: str, prompt: str, max_tokens: int = 128, temperature: float = 0.8, top_k: int | None = 50,
           num_samples: int = 1, seed: int = 0, device: str = "auto", top_p: float | None = None,
           int8: bool = False) -> list[str]:
    set_threads()
    run = load_run(load, choose_device(device), int8=int8)
    tok = run.tokenizer
    ids = [tok.bos_id] + tok.encode(prompt)
    return [prompt + tok.decode(generate(run.model, ids, max_tokens, temperature, top_k, seed=seed + i,
                                         stop=(tok.bos_id,), top_p=top_p))
            for i in range(num_samples)]
