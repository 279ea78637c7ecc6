"""torchrun with 2 gloo processes on CPU: the same training as one process, exact resume, and a
dead rank ends the job (each test launches real torchrun subprocesses)."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO, run_cli

TINY = ["--depth", "2", "--seq-len", "64", "--device", "cpu", "--dtype", "fp32"]


def torchrun(*args: str, nproc: int = 2, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "picochat", *args]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def weights(run) -> dict:
    return load_file(str(run / "model.safetensors"))


def losses(run) -> list[float]:
    return [m["loss"] for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in m]


def tensors(state, path: str = "") -> dict:
    """Every tensor of a nested state, by its path."""
    if isinstance(state, torch.Tensor):
        return {path: state}
    items = state.items() if isinstance(state, dict) else enumerate(state) if isinstance(state, list) else ()
    return {k: v for key, sub in items for k, v in tensors(sub, f"{path}/{key}").items()}


SHARES = """
import json, os, torch
from picochat import distributed
from picochat.config import ModelConfig
from picochat.model import GPT
from picochat.optim import NANOCHAT_OPTIM, build_optimizer
def numel(state):
    if isinstance(state, torch.Tensor):
        return state.numel() if state.dim() else 0
    return sum(map(numel, state.values() if isinstance(state, dict) else state if isinstance(state, list) else ()))
distributed.setup(torch.device("cpu"))
torch.manual_seed(0)
model = GPT(ModelConfig.from_depth(4, vocab_size=512, sequence_len=32))
opt = build_optimizer(model, NANOCHAT_OPTIM)  # NorMuon's second moments too
x = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(distributed.rank()))
for _ in range(2):
    model(x, x).backward()
    opt.step()
    opt.zero_grad()
kept = sum(numel(o.state[p]) for o in opt.optimizers for p in o.state)
full = opt.state_dict()  # gathered on rank 0, {} elsewhere
print(json.dumps({"rank": distributed.rank(), "kept": kept, "full": numel(full)}), flush=True)
distributed.barrier()  # neither rank leaves while the other still gathers
distributed.teardown()
# under a loaded machine this bare script's interpreter exit has aborted once in ten runs
# ("terminate called without an active exception", gloo's threads); picochat's own commands exit
# through the CLI and have not: open, see the closing note of 2026-12-07
os._exit(0)
"""


def test_each_rank_keeps_its_share_of_the_optimizer_state(tmp_path):
    script = tmp_path / "shares.py"
    script.write_text(SHARES)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(script)], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = sorted((json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")),
                   key=lambda o: o["rank"])
    full, kept = ranks[0]["full"], [o["kept"] for o in ranks]
    assert len(kept) == 2 and sum(kept) == pytest.approx(full, rel=0.01)  # the shares make the whole
    assert max(kept) < 0.6 * full  # each rank holds about half of it, not all


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def pretrain_args(small_corpus, small_tokenizer):
    def args(save, batch_size: int, *extra: str) -> list[str]:
        return ["pretrain", "--data", str(small_corpus), "--tokenizer", str(small_tokenizer), *TINY,
                "--total-batch-tokens", "512", "--steps", "4", "--eval-every", "2", "--eval-tokens", "1024",
                "--batch-size", str(batch_size), "--save", str(save), *extra]
    return args


@pytest.fixture(scope="module")
def pretrained(pretrain_args, tmp_path_factory):
    """The same 4 steps of 512 tokens three ways: 1 process x 8 rows, 1 process x 4 rows x 2
    accumulation steps, and 2 processes x 4 rows."""
    root = tmp_path_factory.mktemp("dist")
    for name, nproc, rows in (("one", 1, 8), ("accum", 1, 4), ("two", 2, 4)):
        if nproc == 1:
            r = run_cli(*pretrain_args(root / name, rows))
            assert r.returncode == 0, r.stderr
        else:
            r = torchrun(*pretrain_args(root / name, rows))
            assert r.stdout.count('"run_dir"') == 1, r.stdout  # one summary: rank 0 speaks
    return root


def test_two_ranks_train_what_one_rank_trains(pretrained):
    one, accum, two = (pretrained / n for n in ("one", "accum", "two"))
    # the gradient is summed over ranks in the same order as over accumulation steps: bitwise equal
    assert max_diff(weights(two), weights(accum)) == 0.0
    assert losses(two) == losses(accum)
    # and the same training as one big batch, up to summation order. (Not the weights element by
    # element: where Muon runs Newton-Schulz in bf16, a rounding flip moves an update, and Adam's
    # tiny eps turns a near-zero gradient's sign into a whole step for a few embedding entries.)
    assert losses(two) == pytest.approx(losses(one), abs=1e-4)
    assert len(losses(two)) == 4 and losses(two)[-1] < losses(two)[0]
    # each rank kept half of the optimizer's state; the checkpoint gathered it into one process's
    a, b = (torch.load(run / "trainer_state.pt", weights_only=False)["optimizer"] for run in (two, accum))
    assert tensors(a) and tensors(a).keys() == tensors(b).keys()
    assert all(torch.equal(t, tensors(b)[k]) for k, t in tensors(a).items())
    meta = json.loads((two / "config.json").read_text())
    assert meta["world_size"] == 2
    # validation bpb is computed over the same tokens, split between the processes
    val = [m["val_bpb"] for m in map(json.loads, (two / "metrics.jsonl").read_text().splitlines()) if "val_bpb" in m]
    val1 = [m["val_bpb"] for m in map(json.loads, (one / "metrics.jsonl").read_text().splitlines()) if "val_bpb" in m]
    assert val == pytest.approx(val1, abs=1e-4) and len(val) == 2


def test_a_two_rank_run_resumes_exactly(pretrained, pretrain_args, tmp_path):
    run = tmp_path / "resumed"
    torchrun(*pretrain_args(run, 4, "--stop-at", "2"))
    assert losses(run) == losses(pretrained / "two")[:2]
    torchrun(*pretrain_args(run, 4, "--resume"))
    assert losses(run) == losses(pretrained / "two")
    assert max_diff(weights(run), weights(pretrained / "two")) == 0.0
    # resuming with another number of processes is refused, with the way out
    r = run_cli(*pretrain_args(tmp_path / "resumed", 4, "--resume", "--steps", "6"))
    assert r.returncode == 2 and "written by 2 process(es)" in r.stderr and "--nproc_per_node 2" in r.stderr


def test_lora_sft_on_two_ranks_matches_one(tiny_base, tmp_path):
    """The adapters' AdamW is sharded like the full model's (each rank its share of the rows,
    gradients reduce-scattered): the same losses and merged weights as one process."""
    sft = ["sft", "--load", str(tiny_base), "--data", "arithmetic::1", "--steps", "3", "--device", "cpu",
           "--dtype", "fp32", "--lora", "4", "--lora-lr", "0.01"]
    r = run_cli(*sft, "--batch-size", "8", "--save", str(tmp_path / "one"))
    assert r.returncode == 0, r.stderr
    torchrun(*sft, "--batch-size", "4", "--save", str(tmp_path / "two"))
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), abs=1e-4)
    one, two = (load_file(tmp_path / n / "model.safetensors") for n in ("one", "two"))
    assert all(torch.allclose(one[k], two[k], atol=1e-5) for k in one)
    base = load_file(tiny_base / "model.safetensors")
    assert not torch.equal(one["blocks.0.mlp.c_fc.weight"], base["blocks.0.mlp.c_fc.weight"])


def test_sft_and_rl_on_two_ranks_match_one(tiny_base, tmp_path):
    sft = ["sft", "--load", str(tiny_base), "--data", "arithmetic::1", "--steps", "3", "--device", "cpu",
           "--dtype", "fp32"]
    r = run_cli(*sft, "--batch-size", "8", "--save", str(tmp_path / "sft1"))
    assert r.returncode == 0, r.stderr
    torchrun(*sft, "--batch-size", "4", "--save", str(tmp_path / "sft2"))
    assert losses(tmp_path / "sft2") == pytest.approx(losses(tmp_path / "sft1"), abs=1e-4)

    # one RL step from the same model: the samples, rewards and held-out eval must be the same
    rl = ["rl", "--load", str(tmp_path / "sft1"), "--task", "arithmetic::1", "--group-size", "4",
          "--prompts-per-step", "4", "--steps", "1", "--max-tokens", "24", "--batch-size", "16",
          "--eval-examples", "8", "--device", "cpu", "--dtype", "fp32"]
    one = run_cli(*rl, "--save", str(tmp_path / "rl1"))
    assert one.returncode == 0, one.stderr
    two = torchrun(*rl, "--save", str(tmp_path / "rl2"))
    rows = [json.loads((tmp_path / n / "metrics.jsonl").read_text().splitlines()[0]) for n in ("rl1", "rl2")]
    # each process sampled its half of the prompts with the seeds one process would have used
    for key in ("reward", "pass@1", "response_len", "all_equal"):
        assert rows[1][key] == rows[0][key], key
    assert rows[1]["loss"] == pytest.approx(rows[0]["loss"], abs=1e-5)
    # the held-out eval before training, its questions split between the processes and summed
    starts = [json.loads([line for line in r.stdout.splitlines() if line.startswith("{")][-1])["eval_start"]
              for r in (one, two)]
    assert starts[1] == starts[0] and "val_pass@1" in starts[0]
    # 3 prompts per step do not split over 2 processes: refused at start-up
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                        "picochat", *rl, "--prompts-per-step", "3", "--save", str(tmp_path / "rl3")],
                       capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=300)
    assert r.returncode != 0 and "does not split evenly over 2 processes" in r.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _children(pid: int) -> list[int]:
    """Process ids whose parent is pid (Linux /proc)."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:  # the field after the state
                out.append(int(entry))
    return sorted(out)


def _wait_for_training(procs, run, timeout=120):
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if (run.parent / (run.name + ".cache")).exists() and all(p.poll() is None for p in procs):
            time.sleep(3)  # past start-up, into the steps
            return
        time.sleep(0.2)
    raise AssertionError("the job did not start")


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds torchrun's workers through /proc")
def test_a_dead_rank_ends_the_job_under_torchrun(pretrain_args, tmp_path):
    run = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "picochat",
           *pretrain_args(run, 4), "--steps", "100000", "--log-every", "100000"]
    job = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                           start_new_session=True)
    try:
        _wait_for_training([job], run)
        workers = _children(job.pid)
        assert len(workers) == 2
        os.kill(workers[1], signal.SIGKILL)
        out, _ = job.communicate(timeout=60)  # no hang: torchrun stops the other rank and fails
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    assert job.returncode != 0
    assert "Root Cause" in out and "exitcode  : -9" in out
    assert not run.exists()  # no half-written run dir


def test_a_dead_peer_is_a_clear_error_without_torchrun(pretrain_args, tmp_path):
    """Processes started by hand (or on another node): the survivor's collective fails fast and it
    says so in one error line, instead of waiting forever."""
    run = tmp_path / "run"
    port = _free_port()
    procs = []
    for rank in (0, 1):
        env = dict(os.environ, PYTHONPATH=str(REPO), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                   LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2")
        procs.append(subprocess.Popen([sys.executable, "-m", "picochat", *pretrain_args(run, 4), "--steps", "100000",
                                       "--log-every", "100000"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True, env=env))
    try:
        _wait_for_training(procs, run)
        procs[1].kill()
        _, err = procs[0].communicate(timeout=60)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert procs[0].returncode == 1, err[-2000:]
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "rank 0: lost contact with the other processes" in lines[0], err[-2000:]


def test_threads_split_between_local_processes(monkeypatch):
    from picochat.common import set_threads
    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", str(len(os.sched_getaffinity(0))))
        set_threads()
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
