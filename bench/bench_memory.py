"""The peak-memory estimate (picochat/memory.py) against the peak RSS of real CPU training steps.

    python bench/bench_memory.py                 # depth 4 and 8, with and without --grad-checkpoint
    python bench/bench_memory.py --configs 8:32768:512:8

Each config runs in a fresh process: two training steps (forward, backward, Muon + AdamW) of
`rows` x `seq` tokens in fp32, then its peak resident set size is read. The estimate is what
`picochat pretrain` logs and refuses on; it should sit at or a little above the measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")

CHILD = """
import json, resource, sys, torch
sys.path.insert(0, sys.argv[1])
from picochat.config import ModelConfig
from picochat.memory import estimate_training_memory
from picochat.model import GPT, num_params
from picochat.optim import OptimConfig, build_optimizer
depth, vocab, seq, rows, ckpt = (int(a) for a in sys.argv[2:7])
config = ModelConfig.from_depth(depth, vocab_size=vocab, sequence_len=seq)
model = GPT(config)
model.grad_checkpoint = bool(ckpt)
opt = build_optimizer(model, OptimConfig())
x = torch.randint(0, vocab, (rows, seq))
for _ in range(2):
    model(x, x).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
est = estimate_training_memory(config, rows, seq, torch.float32, bool(ckpt))
print(json.dumps({"peak": peak, "estimate": est.total, "params": num_params(config)}))
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=["4:4096:256:16", "8:32768:512:8"],
                   help="depth:vocab:seq:rows")
    a = p.parse_args()
    print("| depth | vocab | seq x rows | grad checkpoint | params | peak RSS (GiB) | estimate (GiB) "
          "| estimate / RSS |")
    print("|---|---|---|---|---|---|---|---|")
    for spec in a.configs:
        depth, vocab, seq, rows = (int(v) for v in spec.split(":"))
        for ckpt in (0, 1):
            out = subprocess.run([sys.executable, "-c", CHILD, REPO, str(depth), str(vocab), str(seq), str(rows),
                                  str(ckpt)], capture_output=True, text=True, check=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            print(f"| {depth} | {vocab:,} | {seq} x {rows} | {'yes' if ckpt else 'no'} | {r['params'] / 1e6:.1f}M "
                  f"| {r['peak'] / 2**30:.2f} | {r['estimate'] / 2**30:.2f} | {r['estimate'] / r['peak']:.2f} |",
                  flush=True)


if __name__ == "__main__":
    main()
