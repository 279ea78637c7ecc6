import os
import subprocess
import sys
from pathlib import Path

import pytest

from picochat.common import CPU_BF16_ENV

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

# `auto` precision on CPU follows the hardware (bf16 where the CPU has AVX512-BF16 or AMX), so a
# test would take another path on another machine. Unless the caller chose one for the whole run
# (PICOCHAT_CPU_BF16=0 or 1), every test takes the fp32 path, and the tests whose numbers depend
# on the path take both, through the `cpu_path` fixture: every machine runs the same tests down
# the same paths, whatever its CPU.
os.environ.setdefault(CPU_BF16_ENV, "0")


@pytest.fixture(params=["fp32", "bf16"], ids=["cpu-fp32", "cpu-bf16"])
def cpu_path(request, monkeypatch) -> str:
    """Run the test down each CPU precision path: `auto` dtypes (compute, Newton-Schulz) resolve to
    fp32, then to bf16 (slow on a CPU without bf16 hardware: keep such tests tiny). Subprocesses
    the test starts inherit the choice."""
    monkeypatch.setenv(CPU_BF16_ENV, "1" if request.param == "bf16" else "0")
    return request.param


def relative_error(got, want) -> float:
    """||got - want|| / ||want||, in fp32."""
    got, want = got.detach().float(), want.detach().float()
    return float((got - want).norm() / want.norm())


def newton_schulz_tolerance(dtype) -> float:
    """How far Newton-Schulz in `dtype` may land from exact fp32 arithmetic, relatively: a few
    roundings to the working precision per iteration, plus fp32 accumulation (measured: 2.5e-6 in
    fp32, 1.5e-2 in bf16 on 16 to 64-wide matrices)."""
    import torch
    return 4 * torch.finfo(dtype).eps + 32 * torch.finfo(torch.float32).eps


def shared_data(*parts: str) -> Path:
    """A path under ../shared/data, for the checks that need a whole dataset; the test skips,
    saying why, where it is absent (tests/data has excerpts of the same files for everything else)."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"needs the whole dataset, and ../shared/data is not at {SHARED_DATA}")
    return path


def _unpacked_excerpts() -> Path:
    """tests/data as a data dir: a copy with its gzipped texts unpacked, made once per session
    (per pytest-xdist worker) in a temporary directory."""
    import atexit
    import gzip
    import shutil
    import tempfile
    root = Path(tempfile.mkdtemp(prefix="picochat-test-data-")) / "data"
    atexit.register(shutil.rmtree, root.parent, ignore_errors=True)
    shutil.copytree(REPO / "tests" / "data", root, ignore=shutil.ignore_patterns("*.py", "README.md"))
    for gz in root.rglob("*.txt.gz"):
        gz.with_suffix("").write_bytes(gzip.decompress(gz.read_bytes()))
        gz.unlink()
    return root


TEST_DATA = _unpacked_excerpts()  # excerpts of the real datasets, laid out like ../shared/data


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory) -> Path:
    """~150 KB of real text (Shakespeare), as a .txt file split into paragraphs."""
    text = (TEST_DATA / "tinyshakespeare" / "input.txt").read_text()[:150_000]
    path = tmp_path_factory.mktemp("corpus") / "shakespeare.txt"
    path.write_text(text)
    return path


@pytest.fixture(scope="session")
def small_tokenizer(small_corpus, tmp_path_factory) -> Path:
    from picochat.tokenizer import train_tokenizer
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_tokenizer([str(small_corpus)], 512, save=str(path))
    return path


@pytest.fixture(scope="module")
def one_thread():
    """For a module of tiny models: they gain nothing from a second thread, and on a busy machine
    OpenMP's spinning threads make every op many times slower."""
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "picochat", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=timeout)


@pytest.fixture(scope="session")
def tiny_base(small_corpus, small_tokenizer, tmp_path_factory) -> Path:
    """A depth-2 base model run dir, pretrained for a few steps (seq len 128)."""
    from picochat.train.pretrain import PretrainConfig, pretrain
    save = tmp_path_factory.mktemp("base") / "run"
    pretrain(PretrainConfig(data=[str(small_corpus)], save=str(save), tokenizer=str(small_tokenizer), depth=2,
                            seq_len=128, batch_size=4, steps=5, controls=cpu_controls(dtype="fp32", seed=1)))
    return save


def cpu_controls(**kw):
    """Controls for a test's training stage: on the CPU, and whatever else is given."""
    from picochat.train.stage import Controls
    return Controls(**{"device": "cpu", **kw})


def randomized(model, seed: int = 0, scale: float = 0.2):
    """The model with noise added to every weight (the zero-initialized projections too), so that
    every path carries signal. Returns it."""
    import torch
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))
    return model


def complete(engine, ids, num_samples: int = 1, **kw) -> list:
    """The completions of one prompt's request (Engine.complete, the engine's way in, for one)."""
    from picochat.decode_batch import GenRequest
    (_, rows), = engine.complete([GenRequest(list(ids), num_samples, **kw)])
    return rows
