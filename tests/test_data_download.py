"""Shard download against a loopback HTTP server that supports Range and injects failures."""

from __future__ import annotations

import io
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from picochat.common import PicochatError
from picochat.data.download import download_shards
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
