"""Serving under load: many concurrent streaming chat clients against `picochat serve` on loopback.

    python bench/bench_serve.py                                  # random-weights depth-4 model
    python bench/bench_serve.py --load runs/speedrun/sft --clients 32 --duration 60

The server runs as its own process (`python -m picochat serve --port 0`), as a user would start
it, so the clients never share its interpreter. Each client loops for --duration seconds: one
streaming /v1/chat/completions request at a time (a few different prompts, so the rows of a batch
differ in length), timing the first content chunk (time to first token) and the whole answer.
Prints requests done, completion tokens/s, requests/s, p50/p99 time to first token, p50 total
latency, errors (should be 0), the server's mean rows per decode step, and whether /health still
answers afterwards. Random weights rarely emit a stop token, so answers run to --max-tokens.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PROMPTS = ["What is 12 times 7?", "Tell me a short story about a fox.",
           "Explain, in a few words, why the sky is blue and why sunsets are red.", "Hi!",
           "List three prime numbers and say what makes a number prime, please, in one sentence."]


def random_run(depth: int, vocab: int, seq_len: int, path: Path) -> Path:
    """A run dir with random weights and a tokenizer trained on this repository's own text."""
    import torch

    from picochat.config import ModelConfig
    from picochat.model import GPT
    from picochat.run_dir import save_run
    from picochat.tokenizer import Tokenizer
    files = [p for d in ("picochat", "tests", "bench") for p in sorted((REPO / d).glob("**/*.py"))]
    texts = [p.read_text(errors="replace") for p in files + sorted(REPO.glob("*.md"))]
    tok = Tokenizer.train(texts, vocab)
    torch.manual_seed(0)
    model = GPT(ModelConfig.from_depth(depth, vocab_size=tok.vocab_size, sequence_len=seq_len))
    return save_run(path, model, tok, stage="sft")


def start_server(run: Path, args) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "picochat", "serve", "--load", str(run), "--port", "0", "--device", args.device,
           "--max-concurrent", str(args.max_concurrent), "--max-queue", str(max(64, args.clients))]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
    line = proc.stdout.readline()
    if not line.startswith("picochat serve: "):
        proc.kill()
        sys.exit(f"the server did not start: {line!r}")
    print(line.strip())
    return proc, line.split()[2].rstrip("/")


async def client(http: httpx.AsyncClient, i: int, deadline: float, args, results: list, errors: list) -> None:
    k = i
    while time.monotonic() < deadline:
        body = {"model": "bench", "messages": [{"role": "user", "content": PROMPTS[k % len(PROMPTS)]}],
                "max_tokens": args.max_tokens, "temperature": 0.8, "stream": True,
                "stream_options": {"include_usage": True}}
        k += 1
        t0 = time.monotonic()
        ttft, tokens = None, 0
        try:
            async with http.stream("POST", "/v1/chat/completions", json=body) as resp:
                if resp.status_code != 200:
                    errors.append(f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}")
                    continue
                done = False
                async for line in resp.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    if line == "data: [DONE]":
                        done = True
                        break
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        errors.append(str(chunk["error"]))
                        break
                    if chunk.get("usage"):
                        tokens = chunk["usage"]["completion_tokens"]
                    elif ttft is None and chunk["choices"][0]["delta"].get("content"):
                        ttft = time.monotonic() - t0
                if not done:
                    errors.append("stream ended without [DONE]")
                    continue
        except httpx.HTTPError as e:
            errors.append(repr(e))
            continue
        results.append((ttft if ttft is not None else time.monotonic() - t0, time.monotonic() - t0, tokens))


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


async def drive(url: str, args) -> tuple[list, list, float]:
    results, errors = [], []
    limits = httpx.Limits(max_connections=args.clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as http:
        t0 = time.monotonic()
        deadline = t0 + args.duration
        await asyncio.gather(*(client(http, i, deadline, args, results, errors) for i in range(args.clients)))
        return results, errors, time.monotonic() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--load", help="run dir to serve (default: a random-weights model of --depth)")
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--clients", type=int, default=16, help="concurrent streaming clients")
    ap.add_argument("--duration", type=float, default=30.0, help="seconds of load")
    ap.add_argument("--max-tokens", type=int, default=64, help="per answer")
    ap.add_argument("--max-concurrent", type=int, default=16, help="the server's --max-concurrent")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        run = Path(args.load) if args.load else random_run(args.depth, args.vocab_size, args.seq_len,
                                                           Path(tmp) / f"random-d{args.depth}")
        proc, url = start_server(run, args)
        try:
            results, errors, wall = asyncio.run(drive(url, args))
            health = httpx.get(url + "/health", timeout=10).json()
            m = httpx.get(url + "/metrics", timeout=10).json()
        finally:
            proc.terminate()
            proc.wait(timeout=30)

    ttft = [r[0] for r in results]
    total = [r[1] for r in results]
    tokens = sum(r[2] for r in results)
    rows = [
        ("clients x duration", (f"{args.clients} x {args.duration:.0f} s (max_tokens {args.max_tokens}, "
                                f"server max-concurrent {args.max_concurrent})")),
        ("requests done", f"{len(results)}"),
        ("throughput", f"{tokens / wall:,.1f} completion tok/s, {len(results) / wall:.2f} req/s"),
        ("time to first token", f"p50 {pct(ttft, 0.5) * 1000:,.0f} ms, p99 {pct(ttft, 0.99) * 1000:,.0f} ms"),
        ("total latency", f"p50 {pct(total, 0.5) * 1000:,.0f} ms, p99 {pct(total, 0.99) * 1000:,.0f} ms"),
        ("errors", f"{len(errors)}" + (f" (first: {errors[0]})" if errors else "")),
        ("rows per decode step", (f"mean {m['batch_rows_mean']}, max {m['batch_rows_max']} "
                                  f"({m['engine_steps']} steps, {m['prefills']} prefills)")),
        ("/health afterwards", json.dumps(health)),
    ]
    width = max(len(k) for k, _ in rows)
    print()
    for k, v in rows:
        print(f"| {k:<{width}} | {v}")
    if errors or health != {"status": "ok"}:
        sys.exit(1)


if __name__ == "__main__":
    main()
