"""Generation with a KV cache: prefill the prompt once, then decode one token at a time."""

from __future__ import annotations

import torch

from .model import GPT, KVCache


@torch.no_grad()
def generate(model: GPT, ids: list[int], max_tokens: int, temperature: float = 1.0, top_k: int | None = None,
             seed: int | None = None, stop: tuple[int, ...] = ()) -> list[int]:
    """Sample up to max_tokens new ids after `ids`; greedy at temperature 0. Stops at a stop id
    (not returned) or at the model's context length."""
    device = next(model.parameters()).device
    room = model.config.sequence_len - len(ids)
    max_tokens = min(max_tokens, room)
    if max_tokens <= 0:
        return []
    gen = torch.Generator(device=device)
    if seed is not None:
        gen.manual_seed(seed)
    cache = KVCache(model.config, 1, len(ids) + max_tokens)
    logits = model(torch.tensor([ids], device=device), kv_cache=cache)[:, -1]
    out: list[int] = []
    for _ in range(max_tokens):
        if temperature <= 0:
            nxt = int(logits.argmax(-1))
        else:
            logits = logits / temperature
            if top_k:
                kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            nxt = int(torch.multinomial(torch.softmax(logits, -1), 1, generator=gen))
        if nxt in stop:
            break
        out.append(nxt)
        if len(out) == max_tokens:
            break
        logits = model(torch.tensor([[nxt]], device=device), kv_cache=cache)[:, -1]
    return out
