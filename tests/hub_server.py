"""A loopback stand-in for the Hugging Face Hub, for the download tests and the preset runs.

It answers what the Hub's own client asks (huggingface_hub): the tree API of a dataset repo and
revision (`/api/datasets/<repo>/tree/<revision>/<path>`, with each file's size and sha256), and
`/datasets/<repo>/resolve/<revision>/<path>` (HEAD and GET, with Range), plus plain files at
`/files/<name>` (the CORE zip, the word list), and the three calls of an upload to a model repo
(create, preupload, commit). Model repos answer what a download asks: `/api/models/<repo>/revision/
<revision>` (the commit and its files), their tree, and `/<repo>/resolve/<revision>/<path>`; a
revision is a branch name or its commit, and a private repo answers 401 RepoNotFound (as the Hub
does) without its token. Every file is made by the test, in memory. It
records each request and can be told, per path, to cut its first response short, to stall it, to
serve corrupt bytes, or to answer 404.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import threading
import time
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

import pyarrow as pa
import pyarrow.parquet as pq

PARQUET = "refs/convert/parquet"


def parquet(rows: list[dict], compression: str = "snappy") -> bytes:
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf, compression=compression)
    return buf.getvalue()


def zipped(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
    return buf.getvalue()


class FakeHub:
    def __init__(self):
        self.repos: dict[tuple[str, str], dict[str, bytes]] = {}  # (repo, revision) -> path -> bytes
        self.plain: dict[str, bytes] = {}  # /files/<name>
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Range)
        self.cut_first: set[str] = set()  # paths whose first GET sends part of the body and hangs up
        # paths whose first GET sends part, then goes quiet for this many seconds, or until this event is set
        self.stall_first: dict[str, float | threading.Event] = {}
        self.part = 1 / 3  # how much of the body those get
        self.corrupt: set[str] = set()  # paths served with one byte changed (the sha256 no longer matches)
        self.models: dict[str, dict[str, bytes]] = {}  # model repos written through the Hub's commit API
        self.token: str | None = None  # the token that writes need ("Authorization: Bearer <token>")
        self.model_repos: dict[tuple[str, str], dict[str, bytes]] = {}  # (repo, branch) -> path -> bytes
        self.private: set[str] = set()  # model repos that only `token` reads
        self.lock = threading.Lock()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_HEAD(self):
                hub._serve(self, head=True)

            def do_GET(self):
                hub._serve(self, head=False)

            def do_POST(self):
                hub._write(self)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    # ------------------------------------------------------------------ content

    def add(self, repo: str, path: str, data: bytes, revision: str = "main") -> None:
        self.repos.setdefault((repo, revision), {})[path] = data

    def add_parquet_export(self, repo: str, config: str, split: str, rows: list[dict], files: int = 1) -> None:
        """A split of a dataset's parquet export, in `files` parts (big splits go to partial-<split>)."""
        step = -(-len(rows) // files)
        folder = f"{config}/{split}" if files == 1 else f"{config}/partial-{split}"
        for k in range(files):
            self.add(repo, f"{folder}/{k:04d}.parquet", parquet(rows[k * step:(k + 1) * step]), PARQUET)

    def add_model(self, repo: str, files: dict[str, bytes], revision: str = "main") -> str:
        """A model repo's branch; returns its commit."""
        self.model_repos[(repo, revision)] = files
        return self.commit(repo, revision)

    @staticmethod
    def commit(repo: str, revision: str) -> str:
        return hashlib.sha1(f"{repo}@{revision}".encode()).hexdigest()

    def _model(self, repo: str, revision: str) -> tuple[str, dict[str, bytes]] | None:
        for (r, branch), files in self.model_repos.items():
            if r == repo and revision in (branch, self.commit(r, branch)):
                return self.commit(r, branch), files
        return None

    def gets(self, path_suffix: str) -> list[str | None]:
        """The Range header of every GET of a path ending so."""
        return [r for m, p, r in self.requests if m == "GET" and p.endswith(path_suffix)]

    # ------------------------------------------------------------------ serving

    def _serve(self, h: BaseHTTPRequestHandler, head: bool) -> None:
        path = unquote(urlsplit(h.path).path)
        with self.lock:
            self.requests.append(("HEAD" if head else "GET", path, h.headers.get("Range")))
        if path.startswith("/api/datasets/"):
            return self._tree(h, path)
        if path.startswith("/api/models/") or ("/resolve/" in path and not path.startswith(("/datasets/", "/files/"))):
            return self._model_api(h, path, head)
        data = self._file(path)
        if data is None:
            return self._send(h, 404, b'{"error": "not found"}', {"Content-Type": "application/json"}, head)
        sha = hashlib.sha256(data).hexdigest()
        with self.lock:
            cut = not head and path in self.cut_first
            stall = 0.0 if head else self.stall_first.pop(path, 0.0)
            self.cut_first.discard(path) if cut else None
        if path in self.corrupt:
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        self._send_file(h, data, sha, "0" * 40, head, cut, stall)

    def _send_file(self, h, data: bytes, sha: str, commit: str, head: bool, cut: bool = False, stall=0.0) -> None:
        headers = {"ETag": f'"{sha}"', "X-Repo-Commit": commit, "Accept-Ranges": "bytes",
                   "Content-Type": "application/octet-stream"}
        start, status = 0, 200
        rng = h.headers.get("Range")
        if rng and not head:
            start = int(rng.removeprefix("bytes=").split("-")[0])
            if start >= len(data):
                return self._send(h, 416, b"", {"Content-Range": f"bytes */{len(data)}"}, head)
            status = 206
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        body = data[start:]
        h.send_response(status)
        for k, v in headers.items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if head:
            return
        if cut or stall:  # promise the whole body, send part of it, then hang up (or go quiet)
            h.wfile.write(body[: int(len(body) * self.part)])
            h.wfile.flush()
            if isinstance(stall, threading.Event):
                stall.wait(600)  # (a safety net: the test sets it)
            else:
                time.sleep(stall)
            h.close_connection = True
            return
        h.wfile.write(body)

    def _model_api(self, h: BaseHTTPRequestHandler, path: str, head: bool) -> None:
        """A model repo: its revision's info, its tree, or one of its files."""
        api = path.startswith("/api/models/")
        json_type = {"Content-Type": "application/json"}
        parts = path.removeprefix("/api/models/" if api else "/").split("/", 3)
        if len(parts) < 4:
            return self._send(h, 404, b'{"error": "not found"}', json_type, head)
        owner, name, kind, rest = parts
        repo = f"{owner}/{name}"
        known = any(r == repo for r, _ in self.model_repos)
        if not known or (repo in self.private and h.headers.get("Authorization") != f"Bearer {self.token}"):
            return self._send(h, 401, b'{"error": "Repository not found"}',
                              {**json_type, "X-Error-Code": "RepoNotFound"}, head)
        revision, _, inner = rest.partition("/")
        found = self._model(repo, revision)
        if found is None:
            return self._send(h, 404, b'{"error": "Invalid rev id"}', {**json_type, "X-Error-Code": "RevisionNotFound"},
                              head)
        commit, files = found
        if kind == "revision":
            info = {"id": repo, "modelId": repo, "sha": commit, "private": repo in self.private,
                    "siblings": [{"rfilename": p, "size": len(d)} for p, d in sorted(files.items())]}
            return self._send(h, 200, json.dumps(info).encode(), json_type, head)
        if kind == "tree":
            entries = [{"type": "file", "path": p, "size": len(d), "oid": hashlib.sha1(d).hexdigest(),
                        "lfs": {"oid": hashlib.sha256(d).hexdigest(), "size": len(d), "pointerSize": 130}}
                       for p, d in sorted(files.items()) if not inner or p.startswith(inner + "/")]
            return self._send(h, 200, json.dumps(entries).encode(), json_type, head)
        if kind == "resolve" and inner in files:
            return self._send_file(h, files[inner], hashlib.sha256(files[inner]).hexdigest(), commit, head)
        self._send(h, 404, b'{"error": "Entry not found"}', {**json_type, "X-Error-Code": "EntryNotFound"}, head)

    def _write(self, h: BaseHTTPRequestHandler) -> None:
        """What the Hub's client sends to upload a folder: create the repo, ask each file's upload
        mode ("regular" here: the content comes base64 in the commit), then the commit as NDJSON."""
        path = unquote(urlsplit(h.path).path)
        body = h.rfile.read(int(h.headers.get("Content-Length") or 0))
        with self.lock:
            self.requests.append(("POST", path, None))
        reply = lambda status, obj: self._send(h, status, json.dumps(obj).encode(),  # noqa: E731
                                               {"Content-Type": "application/json"}, False)
        if self.token is None or h.headers.get("Authorization") != f"Bearer {self.token}":
            return reply(401, {"error": "Invalid credentials in Authorization header"})
        if path == "/api/repos/create":
            ask = json.loads(body)
            repo = f"{ask['organization']}/{ask['name']}" if ask.get("organization") else ask["name"]
            if repo in self.models:
                return reply(409, {"error": "You already created this model repo", "url": f"{self.url}/{repo}"})
            self.models[repo] = {}
            return reply(200, {"url": f"{self.url}/{repo}"})
        repo, _, action = path.removeprefix("/api/models/").rpartition("/")[0].rpartition("/")
        if repo not in self.models:
            return reply(404, {"error": "Repository not found"})
        if action == "preupload":
            files = json.loads(body)["files"]
            return reply(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                         for f in files]})
        if action == "commit":
            for line in body.splitlines():
                item = json.loads(line)
                if item["key"] == "file":
                    self.models[repo][item["value"]["path"]] = base64.b64decode(item["value"]["content"])
            oid = hashlib.sha1(body).hexdigest()
            return reply(200, {"commitUrl": f"{self.url}/{repo}/commit/{oid}", "commitOid": oid,
                               "pullRequestUrl": None})
        reply(404, {"error": "not found"})

    def _file(self, path: str) -> bytes | None:
        if path.startswith("/files/"):
            return self.plain.get(path.removeprefix("/files/"))
        if not path.startswith("/datasets/") or "/resolve/" not in path:
            return None
        repo, rest = path.removeprefix("/datasets/").split("/resolve/", 1)
        for (r, revision), files in self.repos.items():
            if r == repo and rest.startswith(revision + "/"):
                return files.get(rest.removeprefix(revision + "/"))
        return None

    def _tree(self, h: BaseHTTPRequestHandler, path: str) -> None:
        repo_and_rest = path.removeprefix("/api/datasets/")
        repo, rest = repo_and_rest.split("/tree/", 1)
        for (r, revision), files in self.repos.items():
            if r == repo and (rest == revision or rest.startswith(revision + "/")):
                under = rest.removeprefix(revision).strip("/")
                entries = [{"type": "file", "path": p, "size": len(d), "oid": hashlib.sha1(d).hexdigest(),
                            "lfs": {"oid": hashlib.sha256(d).hexdigest(), "size": len(d), "pointerSize": 130}}
                           for p, d in sorted(files.items()) if not under or p.startswith(under + "/")]
                return self._send(h, 200, json.dumps(entries).encode(), {"Content-Type": "application/json"}, False)
        self._send(h, 404, b'{"error": "Repository not found"}', {"Content-Type": "application/json"}, False)

    @staticmethod
    def _send(h, status: int, body: bytes, headers: dict, head: bool) -> None:
        h.send_response(status)
        for k, v in headers.items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if not head:
            h.wfile.write(body)


def hub_env(hub: FakeHub, **more: str) -> dict:
    """The environment of a picochat subprocess that downloads from `hub`."""
    from .conftest import REPO
    return dict(os.environ, PYTHONPATH=str(REPO), HF_ENDPOINT=hub.url, PICOCHAT_FILES_URL=hub.url + "/files",
                HF_HUB_DISABLE_TELEMETRY="1", **more)

# ----------------------------------------------------------------------------- every dataset, small


def fill(hub: FakeHub, shards: int = 2, docs_per_shard: int = 200) -> None:
    """Every dataset `picochat data download` knows, in its real schema and layout, small: rows
    cut from the excerpts in tests/data (so that the tasks read real questions)."""
    import gzip
    from pathlib import Path
    data = Path(__file__).parent / "data"

    def jsonl(path: Path) -> list[dict]:
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]

    text = gzip.decompress((data / "tinyshakespeare/input.txt.gz").read_bytes()).decode()
    paragraphs = [p for p in text.split("\n\n") if p.strip()]
    for repo in ("karpathy/fineweb-edu-100b-shuffle", "karpathy/climbmix-400b-shuffle"):
        for i in range(shards):
            docs = [{"text": paragraphs[(i * docs_per_shard + j) % len(paragraphs)]} for j in range(docs_per_shard)]
            hub.add(repo, f"shard_{i:05d}.parquet", parquet(docs))
    convs = json.loads((data / "chat/fastchat/dummy_conversation.json").read_text())
    roles = {"human": "user", "gpt": "assistant"}
    smol = [{"messages": [{"role": roles[t["from"]], "content": t["value"]} for t in c["conversations"]]}
            for c in convs]
    hub.add_parquet_export("HuggingFaceTB/smol-smoltalk", "default", "train", smol[:24], files=2)
    hub.add_parquet_export("HuggingFaceTB/smol-smoltalk", "default", "test", smol[24:])
    gsm = jsonl(data / "gsm8k/train.jsonl")
    hub.add_parquet_export("openai/gsm8k", "main", "train", gsm[:40])
    hub.add_parquet_export("openai/gsm8k", "main", "test", jsonl(data / "gsm8k/test.jsonl"))
    for sub in ("Easy", "Challenge"):
        for split in ("train", "validation", "test"):
            hub.add_parquet_export("allenai/ai2_arc", f"ARC-{sub}", split, jsonl(data / f"arc/ARC-{sub}-{split}.jsonl"))
    mmlu = []
    for subject in ("anatomy", "astronomy"):
        with pa.OSFile(str(data / "mmlu/hf_arrow_mmlu_no_train" / subject / "test/data-00000-of-00001.arrow"), "rb") as f:
            mmlu += pa.ipc.open_stream(f).read_all().to_pylist()
    for split, rows in (("auxiliary_train", mmlu[:30]), ("dev", mmlu[30:35]), ("validation", mmlu[35:42]),
                        ("test", mmlu[42:])):
        hub.add_parquet_export("cais/mmlu", "all", split, rows)
    with gzip.open(data / "humaneval/HumanEval.jsonl.gz", "rt") as f:
        hub.add_parquet_export("openai/openai_humaneval", "openai_humaneval", "test", [json.loads(x) for x in f][:10])
    hub.plain["words_alpha.txt"] = (data / "words/words_alpha.txt").read_bytes()
    bundle = {f"eval_bundle/{p.relative_to(data / 'core_eval_bundle')}": p.read_bytes()
              for p in (data / "core_eval_bundle").rglob("*") if p.is_file()}
    hub.plain["eval_bundle.zip"] = zipped(bundle)
