"""The recipe, ablated: picochat's against nanochat's (HEAD 92d63d4), one change at a time, at a
fixed token budget, on the Gutenberg books in ../shared/data/pretrain_text/gutenberg.

    python bench/bench_recipe.py                                 # depth 4, 500K tokens, seeds 0 and 1
    python bench/bench_recipe.py --depth 6 --tokens 1000000 --seeds 0 1 2 --rows baseline smear all

Rows: picochat's recipe before this ablation ("baseline": OptimConfig's and ModelFeatures' own
defaults), each of nanochat's changes alone on top of it, all of them (NANOCHAT_FEATURES and
NANOCHAT_OPTIM; nanochat's budget rule is left out: at a fixed token budget it only sets the batch,
and at these sizes it would make a run of a few steps), and the pretraining command's default now
(PICOCHAT_FEATURES: the changes that won beyond the seed spread). Columns: validation bits per byte
(mean over the seeds, and half their spread), training tokens per second, parameters.

The text is cut into paragraphs of at most --seq-len + 1 tokens (merged up to about 600
characters), so that no row crops a document; the tokenizer (vocab 4,096) is trained once on them,
and every run sees the same train/validation split (the token cache splits by document, with a
fixed seed) and the same number of tokens: --tokens / (--batch-size x --seq-len) steps. A row's
numbers are comparable to the other rows of the same run, on the same machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from picochat.common import set_threads  # noqa: E402
from picochat.config import NANOCHAT_FEATURES, PICOCHAT_FEATURES, ModelFeatures  # noqa: E402
from picochat.optim import NANOCHAT_OPTIM, OptimConfig  # noqa: E402
from picochat.tokenizer import train_tokenizer  # noqa: E402
from picochat.train.pretrain import PretrainConfig, pretrain  # noqa: E402
from picochat.train.stage import Controls  # noqa: E402

BOOKS = Path(__file__).resolve().parents[2] / "shared" / "data" / "pretrain_text" / "gutenberg"
N = NANOCHAT_OPTIM
# row -> (ModelFeatures changes, OptimConfig changes) on picochat's recipe
ROWS = {
    "baseline": ({}, {}),
    "value embeddings": ({"value_embeds": True}, {}),
    "smear": ({"smear": True}, {}),
    "backout": ({"backout": True}, {}),
    "q, k x 1.2": ({"qk_scale": 1.2}, {}),
    "rotary base 100K": ({"rope_base": 100_000.0}, {}),
    "ramped scalars": ({"scalar_init": "ramp"}, {}),
    "init: embedding 0.8, fc 0.4": ({"embed_std": 0.8, "fc_init": 0.4}, {}),
    "nanochat's window": ({"window_rule": "nanochat"}, {}),
    "Polar Express": ({}, {"orthogonalizer": "polar-express"}),
    "NorMuon": ({}, {"muon_beta2": N.muon_beta2}),
    "MuonEq + Muon+": ({}, {"muon_eq": True, "muon_plus": True}),
    "cautious weight decay 0.28, cosine": ({}, {"weight_decay": N.weight_decay, "cautious_wd": True,
                                                "wd_schedule": "cosine"}),
    "AdamW per group, nanochat's rates": ({}, {k: getattr(N, k) for k in (
        "embedding_lr", "head_lr", "scalar_lr", "resid_lr", "value_embed_lr", "head_adam", "embedding_adam",
        "value_embed_adam", "resid_adam", "x0_adam")}),
    "schedules": ({}, {k: getattr(N, k) for k in (
        "warmup_steps", "warmdown_frac", "final_lr_frac", "muon_momentum", "muon_momentum_warmup_steps",
        "muon_momentum_final")}),
    "all": (dataclasses.asdict(NANOCHAT_FEATURES), dataclasses.asdict(NANOCHAT_OPTIM)),
    "picochat's default now (value embeddings, smear, init)": (dataclasses.asdict(PICOCHAT_FEATURES), {}),
}


def documents(seq_len: int, out: Path) -> Path:
    """The books as paragraphs of at most seq_len + 1 tokens (checked with a tokenizer trained on
    them), in one JSONL file. Returns the tokenizer's path."""
    paragraphs = []
    for book in sorted(BOOKS.glob("*.txt")):
        text = book.read_text(encoding="utf-8", errors="replace")
        chunk = ""
        for para in (p.strip() for p in text.split("\n\n")):
            if not para:
                continue
            if chunk and len(chunk) + len(para) > 600:
                paragraphs.append(chunk)
                chunk = ""
            chunk = f"{chunk}\n\n{para}" if chunk else para
        if chunk:
            paragraphs.append(chunk)
    raw = out / "raw.jsonl"
    raw.write_text("".join(json.dumps({"text": p}) + "\n" for p in paragraphs))
    tok = train_tokenizer([str(raw)], 4096, save=str(out / "tokenizer.json"))
    kept = [p for p in paragraphs if 1 + len(tok.encode(p)) <= seq_len + 1]
    (out / "docs").mkdir()
    (out / "docs" / "docs.jsonl").write_text("".join(json.dumps({"text": p}) + "\n" for p in kept))
    raw.unlink()
    print(f"data: {len(kept):,} of {len(paragraphs):,} paragraphs of at most {seq_len + 1} tokens, from "
          f"{len(list(BOOKS.glob('*.txt')))} books", flush=True)
    return out / "tokenizer.json"


def run(row: str, seed: int, args, work: Path, tokenizer: Path) -> dict:
    features, optim = ROWS[row]
    steps = args.tokens // (args.batch_size * args.seq_len)
    cfg = PretrainConfig(data=[str(work / "docs")], save=str(work / "run"), tokenizer=str(tokenizer),
                         depth=args.depth, seq_len=args.seq_len, batch_size=args.batch_size, steps=steps,
                         features=dataclasses.replace(ModelFeatures(), **features),
                         optim=dataclasses.replace(OptimConfig(), **optim), eval_every=0, eval_tokens=args.eval_tokens,
                         cache_dir=str(work / "cache"),
                         controls=Controls(seed=seed, device="cpu", dtype=args.dtype, log_every=10 ** 9,
                                           save_every_minutes=0, overwrite=True))
    result = pretrain(cfg)
    return {"val_bpb": result["val_bpb"], "tok_s": steps * args.batch_size * args.seq_len / result["train_seconds"],
            "params": result["params"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=500_000, help="training tokens per run")
    ap.add_argument("--eval-tokens", type=int, default=131_072)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--rows", nargs="+", default=list(ROWS), help=f"of: {', '.join(ROWS)}")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--out", help="also write the results as JSON here")
    args = ap.parse_args()
    unknown = [r for r in args.rows if r not in ROWS]
    if unknown or not BOOKS.is_dir():
        sys.exit(f"error: unknown rows {unknown}" if unknown else f"error: no books at {BOOKS}")
    set_threads()
    results: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        tokenizer = documents(args.seq_len, work)
        total, t0 = len(args.rows) * len(args.seeds), time.perf_counter()
        for i, (row, seed) in enumerate(((r, s) for r in args.rows for s in args.seeds), 1):
            r = run(row, seed, args, work, tokenizer)
            results.setdefault(row, []).append(r)
            left = (time.perf_counter() - t0) / i * (total - i)
            print(f"[{i}/{total}] {row}, seed {seed}: val bpb {r['val_bpb']:.4f}, {r['tok_s']:,.0f} tok/s "
                  f"(eta {left / 60:.0f} min)", flush=True)
    base = statistics.mean(r["val_bpb"] for r in results.get("baseline", [{"val_bpb": float("nan")}]))
    print(f"\ndepth {args.depth}, {args.tokens:,} tokens ({args.tokens // (args.batch_size * args.seq_len)} steps of "
          f"{args.batch_size} x {args.seq_len}), seeds {' '.join(map(str, args.seeds))}, dtype {args.dtype}\n")
    print("| recipe | val bpb | ± | vs baseline | tok/s | params |")
    print("|---|---|---|---|---|---|")
    for row, rs in results.items():
        bpbs = [r["val_bpb"] for r in rs]
        mean = statistics.mean(bpbs)
        print(f"| {row} | {mean:.4f} | {(max(bpbs) - min(bpbs)) / 2:.4f} | {mean - base:+.4f} | "
              f"{statistics.mean(r['tok_s'] for r in rs):,.0f} | {rs[0]['params'] / 1e6:.2f}M |")
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
