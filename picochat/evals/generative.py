"""Generative task accuracy: sample answers with the Engine (tools on) and grade them with the task."""

from __future__ import annotations

from ..common import Progress
from ..conversation import render_for_completion
from ..engine import Engine


def generative_accuracy(engine: Engine, task, limit: int | None = None, max_tokens: int = 128,
                        num_samples: int = 1, temperature: float = 0.0, seed: int = 0) -> dict:
    """pass@num_samples over the first `limit` examples: an example counts when any sample is right."""
    n = min(len(task), limit or len(task))
    progress = Progress(n, desc=f"eval {task.name}", every=max(1, n // 10))
    correct, rows = 0, []
    for i in range(n):
        conv = task[i]
        ids = render_for_completion(engine.tokenizer, conv)
        completions = engine.generate_batch(ids, num_samples=num_samples, max_tokens=max_tokens,
                                            temperature=temperature, seed=seed + i)
        rewards = [task.reward(conv, c.text) for c in completions]
        correct += max(rewards) > 0
        rows.append({"index": i, "completions": [c.text for c in completions], "rewards": rewards})
        progress.update(i + 1, f"| accuracy {correct / (i + 1):.3f}")
    progress.close()
    return {"task": task.name, "n": n, "accuracy": correct / max(n, 1), "results": rows}
