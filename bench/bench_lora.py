"""LoRA against full fine-tuning: does SFT through adapters on a frozen base teach arithmetic with
the calculator, and at what cost?

Builds a base the way the test suite does (a 512-token BPE on Shakespeare), pretrained on
Shakespeare and lines of sums (as web text has numbers) so that its head means something, then
fine-tunes it on synthetic arithmetic twice, from the same base and for the same steps: through
rank-r adapters (`--lora`), and every weight. Prints held-out greedy accuracy (questions of
another seed) before and after, the final loss, time, and the parameters that trained. CPU, fp32;
about 10 minutes on 2 cores at the defaults.

    python bench/bench_lora.py [--depth 4] [--pretrain-steps 600] [--steps 600] [--rank 32] [--lora-lr 1e-2]
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from safetensors.torch import load_file  # noqa: E402

from picochat.evals.chat_eval import SYNTHETIC_TEST_SEED, pass_at_k  # noqa: E402
from picochat.lora import LoraConfig  # noqa: E402
from picochat.run_dir import load_run  # noqa: E402
from picochat.tasks.arithmetic import Arithmetic  # noqa: E402
from picochat.tokenizer import train_tokenizer  # noqa: E402
from picochat.train.pretrain import PretrainConfig, pretrain  # noqa: E402
from picochat.train.sft import SFTConfig, chat_train  # noqa: E402
from picochat.train.stage import Controls  # noqa: E402


def accuracy(run_dir: Path, n: int) -> float:
    run = load_run(run_dir)
    task = Arithmetic(size=n, seed=SYNTHETIC_TEST_SEED + 7)
    return pass_at_k(run.model, run.tokenizer, task, list(range(n)), 1, 40, 0.0, None, 0, 64)["val_pass@1"]


def corpus(path: Path) -> Path:
    import gzip
    text = gzip.decompress((REPO / "tests/data/tinyshakespeare/input.txt.gz").read_bytes()).decode()[:150_000]
    rng = random.Random(0)
    sums = []
    for _ in range(3000):
        a, b, op = rng.randint(0, 999), rng.randint(0, 999), rng.choice("+-*")
        sums.append(f"{a} {op} {b} = {eval(f'{a}{op}{b}')}.")
    path.write_text(text + "\n\n" + "\n".join(sums))
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--pretrain-steps", type=int, default=600)
    ap.add_argument("--steps", type=int, default=600, help="fine-tuning steps, both ways")
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--lora-lr", type=float, default=1e-2)
    ap.add_argument("--questions", type=int, default=50)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        text = corpus(root / "text.txt")
        train_tokenizer([str(text)], 512, save=str(root / "tok.json"))
        controls = Controls(device="cpu", dtype="fp32", seed=1, log_every=100)
        t = time.time()
        pretrain(PretrainConfig(data=[str(text)], save=str(root / "base"), tokenizer=str(root / "tok.json"),
                                depth=args.depth, seq_len=128, batch_size=8, steps=args.pretrain_steps,
                                controls=controls))
        print(f"\npretrained depth {args.depth}, {args.pretrain_steps} steps, in {time.time() - t:.0f} s")
        before = accuracy(root / "base", args.questions)
        rows = []
        for name, adapters in (("LoRA", LoraConfig(lora=args.rank, lora_lr=args.lora_lr)), ("full", LoraConfig())):
            t = time.time()
            result = chat_train(SFTConfig(load=str(root / "base"), data="arithmetic::1", save=str(root / name),
                                          lr_scale=1.0, batch_size=16, steps=args.steps, adapters=adapters,
                                          controls=controls))
            seconds = time.time() - t
            trained = (sum(v.numel() for v in load_file(root / name / "adapter.safetensors").values())
                       if adapters.lora else load_run(root / name).model.num_params())
            rows.append((name, result["final_loss"], accuracy(root / name, args.questions), seconds, trained))
        print(f"\nheld-out arithmetic, {args.questions} questions, greedy; base: {before:.2f}")
        print("| fine-tuning | trained parameters | final loss | accuracy | seconds |")
        print("|---|---|---|---|---|")
        for name, loss, acc, seconds, trained in rows:
            label = f"LoRA rank {args.rank}" if name == "LoRA" else "every weight"
            print(f"| {label} | {trained:,} | {loss:.4f} | {acc:.2f} | {seconds:.0f} |")


if __name__ == "__main__":
    main()
