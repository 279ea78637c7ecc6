"""Shard download against a loopback HTTP server that supports Range and injects failures."""

from __future__ import annotations

import io
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from picochat.common import PicochatError
from picochat.data.urls import download_shards
from picochat.data.sources import iter_documents


def _parquet_bytes(i: int) -> bytes:
    buf = io.BytesIO()
    texts = [f"shard {i} document {j} " + "lorem ipsum dolor sit amet " * (j % 7 + 1) for j in range(300)]
    pq.write_table(pa.table({"text": texts}), buf, compression="none")
    return buf.getvalue()


class FakeHub:
    """Serves /shard_XXXXX.parquet from memory and records every request."""

    def __init__(self, files: dict[str, bytes]):
        self.files = files
        self.requests: list[tuple[str, str | None]] = []  # (path, Range header)
        self.drop_first: set[str] = set()  # paths whose first response dies mid-body
        self.fail_500_once: set[str] = set()
        self.lock = threading.Lock()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def do_GET(self):
                with hub.lock:
                    hub.requests.append((self.path, self.headers.get("Range")))
                    drop = self.path in hub.drop_first
                    hub.drop_first.discard(self.path)
                    fail = self.path in hub.fail_500_once
                    hub.fail_500_once.discard(self.path)
                data = hub.files.get(self.path)
                if data is None:
                    self.send_error(404, "Not Found")
                    return
                if fail:
                    self.send_error(500, "Internal Server Error")
                    return
                start, status = 0, 200
                rng = self.headers.get("Range")
                if rng:
                    start = int(rng.removeprefix("bytes=").split("-")[0])
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    status = 206
                body = data[start:]
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.end_headers()
                if drop:
                    # promise the whole body, send a third, then hang up
                    self.wfile.write(body[: len(body) // 3])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/shard_{{index:05d}}.parquet"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)

    def ranges(self, path: str) -> list[str | None]:
        return [r for p, r in self.requests if p == path]


@pytest.fixture
def hub():
    files = {f"/shard_{i:05d}.parquet": _parquet_bytes(i) for i in range(3)}
    h = FakeHub(files)
    h.thread.start()
    yield h
    h.server.shutdown()
    h.server.server_close()


def test_download_resume_retry_and_skip(tmp_path, hub):
    hub.drop_first.add("/shard_00000.parquet")  # connection drops mid-body: resume with Range
    hub.fail_500_once.add("/shard_00001.parquet")  # server error: retried
    paths = download_shards(tmp_path, 3, base_url=hub.url, backoff=0.01, timeout=5)
    assert [p.name for p in paths] == ["shard_00000.parquet", "shard_00001.parquet", "shard_00002.parquet"]
    for p in paths:
        assert p.read_bytes() == hub.files["/" + p.name]
    assert not list(tmp_path.glob("*.part"))

    r0 = hub.ranges("/shard_00000.parquet")
    third = len(hub.files["/shard_00000.parquet"]) // 3
    assert r0 == [None, f"bytes={third}-"]  # the second request resumed where the first died
    assert hub.ranges("/shard_00001.parquet") == [None, None]  # 500, then a fresh full request
    assert hub.ranges("/shard_00002.parquet") == [None]

    # complete shards are skipped: no new requests
    n = len(hub.requests)
    download_shards(tmp_path, 3, base_url=hub.url, backoff=0.01)
    assert len(hub.requests) == n
    docs = list(iter_documents(paths))
    assert len(docs) == 900 and docs[0].startswith("shard 0 document 0")


def test_partial_part_file_is_resumed(tmp_path, hub):
    data = hub.files["/shard_00001.parquet"]
    (tmp_path / "shard_00001.parquet.part").write_bytes(data[:1000])
    paths = download_shards(tmp_path, 1, base_url=hub.url, start=1, backoff=0.01)
    assert paths[0].read_bytes() == data
    assert hub.ranges("/shard_00001.parquet") == ["bytes=1000-"]


def test_complete_part_file_is_finished(tmp_path, hub):
    # crash after the last byte but before the rename: the server answers 416 for the range
    data = hub.files["/shard_00002.parquet"]
    (tmp_path / "shard_00002.parquet.part").write_bytes(data)
    paths = download_shards(tmp_path, 1, base_url=hub.url, start=2, backoff=0.01)
    assert paths[0].read_bytes() == data


def test_404_is_an_error_naming_the_url(tmp_path, hub):
    with pytest.raises(PicochatError, match=r"404.*shard_00007\.parquet"):
        download_shards(tmp_path, 1, base_url=hub.url, start=7, backoff=0.01)
    assert len(hub.ranges("/shard_00007.parquet")) == 1  # not retried
    assert not (tmp_path / "shard_00007.parquet").exists()


def test_persistent_failure_gives_up(tmp_path, hub):
    hub.fail_500_once.add("/shard_00000.parquet")
    # retries=0: one attempt only, and it fails
    with pytest.raises(PicochatError, match="after 1 attempts"):
        download_shards(tmp_path, 1, base_url=hub.url, retries=0, backoff=0.01)


# ----------------------------------------------------------------------------- `picochat data download`, against a Hub

import os  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

from .conftest import REPO  # noqa: E402
from .hub_server import PARQUET, fill, hub_env  # noqa: E402
from .hub_server import FakeHub as LoopbackHub  # noqa: E402


@pytest.fixture
def fake_hub():
    with LoopbackHub() as h:
        fill(h)
        yield h


def _download(hub, data_dir, *names, timeout=120):
    """`picochat data download`, patient for one second of silence, three retries."""
    return subprocess.run([sys.executable, "-m", "picochat", "data", "download", *names, "--data-dir", str(data_dir),
                           "--timeout", "1", "--retries", "3"],
                          capture_output=True, text=True, env=hub_env(hub), timeout=timeout)


def test_every_chat_and_eval_set_lands_where_the_tasks_find_it(fake_hub, tmp_path):
    from picochat.evals.core import load_tasks, resolve_bundle
    from picochat.tasks import build_task
    r = _download(fake_hub, tmp_path, "chat")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "download: done" in r.stdout and "Next: picochat speedrun" in r.stdout
    assert len(build_task("smoltalk", tmp_path / "smoltalk")) == 24  # two parquet parts
    assert len(build_task("smoltalk", tmp_path / "smoltalk", split="test")) == 6
    assert len(build_task("gsm8k", tmp_path / "gsm8k")) == 40 and len(build_task("gsm8k", tmp_path / "gsm8k",
                                                                                  split="test")) == 20
    assert len(build_task("arc-easy", tmp_path / "arc", split="test")) == 12
    assert len(build_task("mmlu", tmp_path / "mmlu")) == 30  # train: auxiliary_train
    assert len(build_task("mmlu", tmp_path / "mmlu", split="test")) == 8
    assert len(build_task("humaneval", tmp_path / "humaneval")) == 10
    assert len(build_task("spelling", tmp_path / "words" / "words_alpha.txt", size=10)) == 10
    assert [t["label"] for t in load_tasks(resolve_bundle(str(tmp_path)), ["copa"])] == ["copa"]
    # a rerun fetches nothing again
    n = len(fake_hub.requests)
    r = _download(fake_hub, tmp_path, "gsm8k", "arc")
    assert r.returncode == 0 and "8 of 8 files already in place" in r.stdout
    assert not [p for m, p, _ in fake_hub.requests[n:] if m == "GET" and "/resolve/" in p]


def _big_shards(hub, n: int) -> None:
    """8 MB shards of incompressible text, so that a response cut halfway leaves megabytes on disk."""
    import base64
    import random

    from .hub_server import parquet
    for i in range(n):
        rng = random.Random(i)
        docs = [{"text": base64.b64encode(rng.randbytes(6000)).decode()} for _ in range(1000)]
        hub.add("karpathy/fineweb-edu-100b-shuffle", f"shard_{i:05d}.parquet", parquet(docs, compression="none"))
    hub.part = 0.5


def test_pretraining_shards_and_a_cut_or_stalled_connection(fake_hub, tmp_path):
    _big_shards(fake_hub, 2)
    fake_hub.cut_first.add("/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main/shard_00000.parquet")
    fake_hub.stall_first["/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main/shard_00001.parquet"] = 3.0
    t0 = time.monotonic()
    r = _download(fake_hub, tmp_path, "fineweb-edu", "--num-shards", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    assert time.monotonic() - t0 < 60
    for i in range(2):
        assert (tmp_path / "fineweb-edu" / f"shard_{i:05d}.parquet").read_bytes() == \
            fake_hub.repos["karpathy/fineweb-edu-100b-shuffle", "main"][f"shard_{i:05d}.parquet"]
    # each resumed where its first response stopped: the second GET asked for the rest
    for i in range(2):
        ranges = fake_hub.gets(f"shard_{i:05d}.parquet")
        assert ranges[0] is None and ranges[-1] is not None and ranges[-1].startswith("bytes="), ranges
    assert not list(tmp_path.rglob("*.part"))


def test_a_corrupt_file_is_refused_and_fetched_again_by_a_rerun(fake_hub, tmp_path):
    bad = f"/datasets/openai/gsm8k/resolve/{PARQUET}/main/test/0000.parquet"
    fake_hub.corrupt.add(bad)
    r = _download(fake_hub, tmp_path, "gsm8k")
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error: download of ")
    assert "sha256" in r.stderr and not (tmp_path / "gsm8k" / "test-00000-of-00001.parquet").exists()
    fake_hub.corrupt.clear()
    r = _download(fake_hub, tmp_path, "gsm8k")
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "gsm8k" / "test-00000-of-00001.parquet").is_file()


def test_missing_and_unreachable(fake_hub, tmp_path):
    del fake_hub.repos["openai/gsm8k", PARQUET]
    r = _download(fake_hub, tmp_path, "gsm8k")
    assert r.returncode == 2 and "not found on the Hub" in r.stderr and "openai/gsm8k" in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    with socket_closed() as url:  # no server there: as good as no network
        env = dict(os.environ, PYTHONPATH=str(REPO), HF_ENDPOINT=url)
        r = subprocess.run([sys.executable, "-m", "picochat", "data", "download", "arc", "--data-dir", str(tmp_path)],
                           capture_output=True, text=True, env=env, timeout=120)
    line = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 2 and line.startswith("error: cannot download ") and url in line
    assert "Retrying" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert "HF_ENDPOINT" in line and "--data-dir" in line
    r = _download(fake_hub, tmp_path, "nosuch")
    assert r.returncode == 2 and "unknown dataset 'nosuch'" in r.stderr


def test_an_interrupted_download_continues_where_it_stopped(fake_hub, tmp_path):
    _big_shards(fake_hub, 1)
    path = "/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main/shard_00000.parquet"
    release = threading.Event()
    fake_hub.stall_first[path] = release  # half arrives, then nothing until the test lets it go
    proc = subprocess.Popen([sys.executable, "-m", "picochat", "data", "download", "fineweb-edu", "--num-shards", "1",
                             "--data-dir", str(tmp_path)], env=hub_env(fake_hub), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    part = tmp_path / "fineweb-edu" / "shard_00000.parquet.part"
    try:
        deadline = time.monotonic() + 600  # a safety net; the half arrives in well under a second
        while not (part.exists() and part.stat().st_size >= 3_000_000):  # half the shard is on disk
            assert proc.poll() is None, proc.communicate()[1][-2000:]
            assert time.monotonic() < deadline
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=600)  # (a safety net) the stalled response never ends by itself: only Ctrl-C can
    finally:
        release.set()
    assert proc.returncode == 130 and not (tmp_path / "fineweb-edu" / "shard_00000.parquet").exists()
    r = _download(fake_hub, tmp_path, "fineweb-edu", "--num-shards", "1")
    assert r.returncode == 0, r.stderr[-2000:]
    assert fake_hub.gets("shard_00000.parquet")[-1].startswith("bytes=")  # the rerun asked for the rest only
    data = fake_hub.repos["karpathy/fineweb-edu-100b-shuffle", "main"]["shard_00000.parquet"]
    assert (tmp_path / "fineweb-edu" / "shard_00000.parquet").read_bytes() == data


class socket_closed:
    """A loopback URL where nothing listens."""

    def __enter__(self):
        import socket
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        self.port = s.getsockname()[1]
        s.close()
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc):
        pass
