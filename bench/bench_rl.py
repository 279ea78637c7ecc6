"""RL (GRPO) on synthetic arithmetic with the calculator: does it beat its SFT starting point?

Builds the test suite's tiny setup (a 512-token BPE on Shakespeare, a depth-2 base model
pretrained 5 steps), fine-tunes it on arithmetic for a few steps, so that it calls the calculator
but often garbles the operands, then runs `picochat rl` on arithmetic and prints the reward curve
and held-out accuracy (questions of another seed) before and after: greedy, and pass@1 / pass@k of
sampled replies. CPU, fp32; a few minutes on 2 cores.

    python bench/bench_rl.py [--sft-steps 170] [--steps 40] [--lr-scale 0.05] [--group-size 16] ...
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from picochat.evals.chat_eval import SYNTHETIC_TEST_SEED, pass_at_k  # noqa: E402
from picochat.run_dir import load_run  # noqa: E402
from picochat.tasks.arithmetic import Arithmetic  # noqa: E402
from picochat.train.pretrain import PretrainConfig, pretrain  # noqa: E402
from picochat.train.rl import RLConfig, rl_train  # noqa: E402
from picochat.train.sft import SFTConfig, chat_train  # noqa: E402
from picochat.train.stage import Controls  # noqa: E402


def held_out(run_dir: Path, n: int, k: int, max_tokens: int) -> dict:
    run = load_run(run_dir)
    task = Arithmetic(size=n, seed=SYNTHETIC_TEST_SEED + 7)  # neither the training seed nor rl's own eval set
    greedy = pass_at_k(run.model, run.tokenizer, task, list(range(n)), 1, max_tokens, 0.0, None, 0, 64)
    sampled = pass_at_k(run.model, run.tokenizer, task, list(range(n)), k, max_tokens, 1.0, 50, 0, 64)
    return {"greedy": greedy["val_pass@1"], "pass@1": sampled["val_pass@1"], f"pass@{k}": sampled[f"val_pass@{k}"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", help="directory for the run dirs (default: a temporary one)")
    p.add_argument("--sft-steps", type=int, default=170)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--group-size", type=int, default=16)
    p.add_argument("--prompts-per-step", type=int, default=8)
    p.add_argument("--lr-scale", type=float, default=0.05)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--kl", type=float, default=0.0)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--no-std", action="store_true")
    p.add_argument("--max-tokens", type=int, default=40)
    p.add_argument("--eval-examples", type=int, default=200)
    p.add_argument("--eval-k", type=int, default=4)
    a = p.parse_args()
    work = Path(a.work or tempfile.mkdtemp(prefix="bench_rl_"))
    work.mkdir(parents=True, exist_ok=True)

    text = (REPO.parent / "shared" / "data" / "tinyshakespeare" / "input.txt").read_text()[:150_000]
    corpus = work / "shakespeare.txt"
    corpus.write_text(text)
    if not (work / "base").exists():
        from picochat.tokenizer import train_tokenizer
        train_tokenizer([str(corpus)], 512, save=str(work / "tokenizer.json"))
        pretrain(PretrainConfig(data=[str(corpus)], save=str(work / "base"), tokenizer=str(work / "tokenizer.json"),
                                depth=2, seq_len=128, batch_size=4, steps=5,
                                controls=Controls(device="cpu", dtype="fp32", seed=1)))
    sft = work / f"sft{a.sft_steps}"
    if not sft.exists():
        t0 = time.perf_counter()
        chat_train(SFTConfig(load=str(work / "base"), data="arithmetic::1", save=str(sft), lr_scale=1.0,
                             batch_size=16, steps=a.sft_steps, controls=Controls(device="cpu", dtype="fp32", log_every=50)))
        print(f"sft: {a.sft_steps} steps in {time.perf_counter() - t0:.0f} s")
    before = held_out(sft, a.eval_examples, a.eval_k, a.max_tokens)

    t0 = time.perf_counter()
    result = rl_train(RLConfig(load=str(sft), task="arithmetic::1", save=str(work / "rl"), steps=a.steps,
                               group_size=a.group_size, prompts_per_step=a.prompts_per_step, max_tokens=a.max_tokens,
                               temperature=a.temperature, epochs=a.epochs, kl=a.kl, std=not a.no_std,
                               batch_size=a.group_size * a.prompts_per_step,
                               rollout_rows=a.group_size * a.prompts_per_step, lr_scale=a.lr_scale,
                               eval_examples=0, controls=Controls(device="cpu", dtype="fp32", overwrite=True, log_every=5)))
    seconds = time.perf_counter() - t0
    after = held_out(work / "rl", a.eval_examples, a.eval_k, a.max_tokens)

    metrics = result["metrics"]
    print(f"\nRL: {a.steps} steps of {a.prompts_per_step} prompts x {a.group_size} samples, lr scale {a.lr_scale}, "
          f"epochs {a.epochs}, kl {a.kl}: {seconds:.0f} s ({seconds / a.steps:.1f} s/step)\n")
    print("| steps | mean reward (training samples) | all-equal groups | mean reply tokens |")
    print("|---|---|---|---|")
    chunk = max(1, len(metrics) // 8)
    for i in range(0, len(metrics), chunk):
        part = metrics[i:i + chunk]
        print(f"| {part[0]['step']}-{part[-1]['step']} | {sum(m['reward'] for m in part) / len(part):.3f} | "
              f"{sum(m['all_equal'] for m in part) / len(part):.2f} | "
              f"{sum(m['response_len'] for m in part) / len(part):.1f} |")
    print(f"\nheld-out arithmetic ({a.eval_examples} questions, another seed):\n")
    print("| model | greedy accuracy | pass@1 (T=1) | " + f"pass@{a.eval_k} (T=1) |")
    print("|---|---|---|---|")
    for name, r in (("SFT (start)", before), ("RL", after)):
        print(f"| {name} | {r['greedy']:.3f} | {r['pass@1']:.3f} | {r[f'pass@{a.eval_k}']:.3f} |")


if __name__ == "__main__":
    main()
