"""`picochat serve`: an OpenAI-compatible HTTP API and the web chat page, on Starlette + uvicorn.

    POST /v1/chat/completions   chat (streaming = server-sent events), the calculator tool on
    POST /v1/completions        raw text continuation (<|bos|> + prompt), no chat template
    GET  /v1/models             the one model: the run dir's name
    GET  /health                {"status": "ok"}, never behind the API key
    GET  /metrics               counters as JSON
    GET  /  and  /static/...    the web UI (picochat/serve/static)

The event loop only parses, validates and formats; the model runs in the scheduler's worker
thread (scheduler.py), which batches all running requests into one decode step. Every bad input
is a 4xx in OpenAI's error shape (protocol.ApiError); nothing a client sends can crash the
server or leave a connection hanging.

Beyond OpenAI's fields, chat answers carry `picochat` objects so a UI can style tool calls:
a streamed delta {"content": "...", "picochat": {"part": "text" | "call" | "output"}}, and a
whole message {"picochat": {"parts": [{"part": ..., "text": ...}, ...]}}.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch
import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from ..common import PicochatError, log
from ..decode_batch import GenRequest
from ..engine import Engine
from ..inference import LoadOptions, open_for_inference
from ..settings import check, setting
from .protocol import ApiError, ChoiceText, Params, parse_chat, parse_completion
from .scheduler import QueueFull, Scheduler

MAX_BODY = 1 << 20  # bytes: a request body over this is answered 413
DRAIN_LIMIT = 16 << 20  # read (and drop) an oversize body up to here, so the client sees the 413
MAX_N = 16
STATIC = Path(__file__).parent / "static"


class ClientGone(Exception):
    """The client of a non-streaming request disconnected: nobody to answer."""


@dataclass
class ServerLimits:
    """What one connection may hold: a client that is slow, idle or one of too many gets let go."""
    body_timeout: float = setting(30.0, "seconds a request's body may take to arrive (then 408)", low=0.01)
    idle_timeout: float = setting(5.0, "seconds an idle keep-alive connection stays open", low=0.01)
    max_connections: int = setting(256, "connections at once; beyond it new requests get 503", low=1)


@dataclass
class ServeConfig:
    model: LoadOptions = setting(help="the model to use")
    host: str = setting("127.0.0.1", "address to bind (0.0.0.0 exposes the server)")
    port: int = setting(8000, "port to listen on (0 picks a free one)", low=0, high=65535)
    max_concurrent: int = setting(8, "rows decoded together in one batch", low=1)
    max_queue: int = setting(64, "requests that may wait; beyond it: 503", low=0)
    api_key: str | None = setting(None, "require 'Authorization: Bearer KEY' (default: $PICOCHAT_API_KEY, or "
                                        "none; /health stays open)")
    limits: ServerLimits = setting(factory=ServerLimits)


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")  # Python's json accepts NaN and Infinity


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


def _merge(pieces: list[tuple[str, str]]) -> list[dict]:
    """Consecutive pieces of one part as one {"part", "text"}."""
    out: list[dict] = []
    for part, text in pieces:
        if out and out[-1]["part"] == part:
            out[-1]["text"] += text
        else:
            out.append({"part": part, "text": text})
    return out


class Api:
    """The routes' shared state: the scheduler, the tokenizer, the limits, the key."""

    def __init__(self, engine: Engine, model_id: str, max_concurrent: int, max_queue: int,
                 api_key: str | None, dtype: torch.dtype, body_timeout: float = 30.0):
        if engine.tokenizer is None:
            raise PicochatError("serving needs an Engine with a tokenizer")
        self.scheduler = Scheduler(engine, max_concurrent, max_queue, dtype)
        self.tok, self.context, self.model_id = engine.tokenizer, engine.context, model_id
        self.api_key = api_key
        self.max_n = min(max_concurrent, MAX_N)
        self.created = int(time.time())
        self.body_timeout = body_timeout

    # ------------------------------------------------------------- request plumbing

    def auth(self, request: Request) -> None:
        if self.api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, key = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), self.api_key.encode()):
            raise ApiError(401, "missing or incorrect API key (send 'Authorization: Bearer <key>')", None,
                           "invalid_api_key")

    async def read_json(self, request: Request) -> dict:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > DRAIN_LIMIT:
            raise ApiError(413, f"request body over {MAX_BODY} bytes", None, "request_too_large")
        body, size = bytearray(), 0
        try:
            async with asyncio.timeout(self.body_timeout):
                async for chunk in request.stream():
                    size += len(chunk)
                    if size <= MAX_BODY:
                        body += chunk
                    elif size > DRAIN_LIMIT:
                        break
        except TimeoutError:
            raise ApiError(408, f"the request body did not arrive within {self.body_timeout:g} s", None,
                           "request_timeout") from None
        except ClientDisconnect:  # the client hung up mid-body: nobody to answer, nothing to log
            self.scheduler.metrics.add(clients_gone=1)
            raise ClientGone() from None
        if size > MAX_BODY:
            raise ApiError(413, f"request body over {MAX_BODY} bytes", None, "request_too_large")
        try:
            data = json.loads(body, parse_constant=_no_constant)
        except (ValueError, UnicodeDecodeError, RecursionError) as e:
            raise ApiError(400, f"the body is not valid JSON ({e})", None, "invalid_json") from None
        if not isinstance(data, dict):
            raise ApiError(400, "the body must be a JSON object", None, "invalid_json")
        return data

    def submit(self, p: Params):
        req = GenRequest(p.prompt, n=p.n, max_tokens=p.max_tokens, temperature=p.temperature, top_k=p.top_k,
                         top_p=p.top_p, seed=p.seed, tools=p.tools)
        try:
            return self.scheduler.submit(req)
        except QueueFull as e:
            raise ApiError(503, str(e), None, "server_busy", type="server_error") from None

    async def updates(self, job, choices: list[ChoiceText]):
        """Per engine step, [(choice index, [(part, text)...], finish or None)], until every choice
        has finished. A choice cut by a stop string has its row dropped from the batch at once."""
        while any(c.finish is None for c in choices):
            item = await job.events.get()
            if isinstance(item, ClientGone):
                raise item
            if isinstance(item, BaseException):
                raise ApiError(500, f"generation failed: {item}", None, "engine_error", type="server_error")
            if item is None:  # nothing to generate
                yield [(i, c.close("length"), c.finish) for i, c in enumerate(choices)]
                return
            out = []
            for ev in item:
                c = choices[ev.index]
                if c.finish is not None:  # already cut by a stop string; its row is being dropped
                    continue
                pieces = c.push(ev.token, ev.finish)
                if c.finish is not None and ev.finish is None:
                    self.scheduler.cancel(job, ev.index)
                out.append((ev.index, pieces, c.finish))
            yield out

    def usage(self, p: Params, choices: list[ChoiceText]) -> dict:
        done = sum(c.tokens for c in choices)
        return {"prompt_tokens": len(p.prompt), "completion_tokens": done, "total_tokens": len(p.prompt) + done}

    # ------------------------------------------------------------- generation endpoints

    async def generate(self, request: Request, chat: bool) -> Response:
        self.auth(request)
        body = await self.read_json(request)
        parse = parse_chat if chat else parse_completion
        # tokenizing up to a megabyte of text takes a while: not on the event loop
        p = await asyncio.to_thread(parse, body, self.tok, self.context, self.max_n)
        job = self.submit(p)
        choices = [ChoiceText(self.tok, p.stop) for _ in range(p.n)]
        meta = {"id": ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24], "created": int(time.time()),
                "model": self.model_id}
        if p.stream:
            return StreamingResponse(self.stream(job, p, choices, meta, chat), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        await self.collect(request, job, choices)
        if chat:
            out = [{"index": i, "message": {"role": "assistant", "content": c.content,
                                            "picochat": {"parts": _merge(c.pieces)}},
                    "logprobs": None, "finish_reason": c.finish} for i, c in enumerate(choices)]
        else:
            out = [{"index": i, "text": c.content, "logprobs": None, "finish_reason": c.finish}
                   for i, c in enumerate(choices)]
        return JSONResponse({**meta, "object": "chat.completion" if chat else "text_completion", "choices": out,
                             "usage": self.usage(p, choices)})

    async def collect(self, request: Request, job, choices: list[ChoiceText]) -> None:
        """Run a non-streaming job to the end, watching for the client leaving meanwhile (a plain
        response only notices when it is finally sent)."""

        async def watch():
            while (await request.receive())["type"] != "http.disconnect":
                pass
            self.scheduler.metrics.add(clients_gone=1)
            self.scheduler.cancel(job)
            job.events.put_nowait(ClientGone())

        watcher = asyncio.create_task(watch())
        try:
            async for _ in self.updates(job, choices):
                pass
        finally:
            watcher.cancel()
            if any(c.finish is None for c in choices):
                self.scheduler.cancel(job)

    async def stream(self, job, p: Params, choices: list[ChoiceText], meta: dict, chat: bool):
        """Server-sent events in OpenAI's chunk format. Starlette cancels this generator when the
        client disconnects; `finally` then frees the job's rows at the next step."""
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(choice: dict) -> str:
            return _sse({**meta, "object": obj, "choices": [choice]})

        try:
            if chat:
                for i in range(p.n):
                    yield chunk({"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                 "finish_reason": None})
            try:
                async for step in self.updates(job, choices):
                    for i, pieces, finish in step:
                        for part, text in pieces:
                            if chat:
                                yield chunk({"index": i, "delta": {"content": text, "picochat": {"part": part}},
                                             "logprobs": None, "finish_reason": None})
                            else:
                                yield chunk({"index": i, "text": text, "logprobs": None, "finish_reason": None})
                        if finish is not None:
                            yield chunk({"index": i, "delta": {}, "logprobs": None, "finish_reason": finish} if chat
                                        else {"index": i, "text": "", "logprobs": None, "finish_reason": finish})
            except ApiError as e:  # the response has started: report in-band, then end the stream
                yield _sse(e.body())
            else:
                if p.include_usage:
                    yield _sse({**meta, "object": obj, "choices": [], "usage": self.usage(p, choices)})
            yield "data: [DONE]\n\n"
        finally:
            if any(c.finish is None for c in choices):  # the client left mid-stream
                self.scheduler.metrics.add(clients_gone=1)
                self.scheduler.cancel(job)

    # ------------------------------------------------------------- the other endpoints

    def model_card(self) -> dict:
        return {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "picochat",
                "context_length": self.context}

    async def models(self, request: Request) -> Response:
        self.auth(request)
        return JSONResponse({"object": "list", "data": [self.model_card()]})

    async def model(self, request: Request) -> Response:
        self.auth(request)
        if request.path_params["model"] != self.model_id:
            raise ApiError(404, f"the model {request.path_params['model']!r} does not exist", "model",
                           "model_not_found")
        return JSONResponse(self.model_card())

    async def metrics(self, request: Request) -> Response:
        self.auth(request)
        return JSONResponse({**self.scheduler.snapshot(), "lost_writes": _QuietLostWrites.count,
                             "model": self.model_id, "max_concurrent": self.scheduler.max_concurrent, "max_queue": self.scheduler.max_queue})


async def _health(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def _index(request: Request) -> Response:
    page = STATIC / "index.html"
    if page.is_file():
        return FileResponse(page)
    return HTMLResponse("<!doctype html><title>picochat</title><p>picochat is serving: the API is at /v1 "
                        "(the web page is not installed).</p>")


class _QuietLostWrites(logging.Filter):
    """asyncio warns "socket.send() raised exception." when a response keeps writing to a client
    that has gone: nothing is wrong, so it is counted (in /metrics, lost_writes) instead of logged.
    One filter for the process: asyncio's logger is shared by every server in it."""

    count = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if record.getMessage().startswith("socket.send() raised exception"):
            _QuietLostWrites.count += 1
            return False
        return True


_QUIET = _QuietLostWrites()


def create_app(engine: Engine, model_id: str = "picochat", max_concurrent: int = 8, max_queue: int = 64,
               api_key: str | None = None, dtype: torch.dtype = torch.float32, banner: str | None = None,
               limits: ServerLimits | None = None) -> Starlette:
    """The ASGI app. Its lifespan starts and stops the model's worker thread. `limits` bound each
    connection (the uvicorn server made by start_in_thread / serve reads them from app.state)."""
    if max_concurrent < 1 or max_queue < 0:
        raise PicochatError(f"--max-concurrent must be >= 1 and --max-queue >= 0 "
                            f"(got {max_concurrent} and {max_queue})")
    limits = limits or ServerLimits()
    api = Api(engine, model_id, max_concurrent, max_queue, api_key, dtype, limits.body_timeout)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        logging.getLogger("asyncio").addFilter(_QUIET)  # once: the same filter is only added once
        api.scheduler.start()
        if banner:
            log(banner)
        try:
            yield
        finally:
            await asyncio.to_thread(api.scheduler.stop)

    async def chat(request):
        return await api.generate(request, chat=True)

    async def completions(request):
        return await api.generate(request, chat=False)

    async def api_error(request, e: ApiError):
        if 400 <= e.status < 500:
            api.scheduler.metrics.add(requests_invalid=1)
        headers = {"Retry-After": "1"} if e.status == 503 else None
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    async def http_error(request, e: HTTPException):
        return JSONResponse(ApiError(e.status_code, e.detail or "error", None, None).body(),
                            status_code=e.status_code, headers=getattr(e, "headers", None))

    async def client_gone(request, e: ClientGone):
        return Response(status_code=499)  # never delivered: the client has gone

    async def server_error(request, e: Exception):
        log(f"serve: unhandled {e!r}")
        return JSONResponse(ApiError(500, "internal server error", None, None, type="server_error").body(),
                            status_code=500)

    routes = [
        Route("/", _index),
        Route("/health", _health),
        Route("/metrics", api.metrics),
        Route("/v1/models", api.models),
        Route("/v1/models/{model:path}", api.model),
        Route("/v1/chat/completions", chat, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Mount("/static", StaticFiles(directory=STATIC, check_dir=False), name="static"),
    ]
    handlers = {ApiError: api_error, HTTPException: http_error, ClientGone: client_gone, Exception: server_error}
    app = Starlette(routes=routes, exception_handlers=handlers, lifespan=lifespan)
    app.state.api, app.state.limits = api, limits
    return app


# ----------------------------------------------------------------------------- running it

def bind(host: str, port: int) -> socket.socket:
    """A listening socket (port 0: any free port). Bound here, before uvicorn starts, so that the
    URL we print is the real one and a busy port is a clear error."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
    except OSError as e:
        raise PicochatError(f"cannot listen on {host}:{port}: {e}") from None
    sock.setblocking(False)
    return sock


def _uvicorn(app: Starlette) -> uvicorn.Server:
    # access lines for every request would drown the log under load; errors still show
    limits = app.state.limits
    return uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=3,
                                         timeout_keep_alive=limits.idle_timeout,
                                         # uvicorn answers 503 once this many are open, counting the new one
                                         limit_concurrency=limits.max_connections + 1))


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://{f'[{host}]' if ':' in host else host}:{port}"


def start_in_thread(app: Starlette, host: str = "127.0.0.1", port: int = 0):
    """Serve in a background thread (tests, benchmarks): returns (url, stop())."""
    sock = bind(host, port)
    server = _uvicorn(app)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True, name="picochat-http")
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the server did not start")
        time.sleep(0.01)

    def stop():
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()

    return url_of(sock), stop


def serve(cfg: ServeConfig) -> None:
    """Load a run dir and serve it until interrupted."""
    check(cfg)
    run = open_for_inference(cfg.model)
    api_key = cfg.api_key or os.environ.get("PICOCHAT_API_KEY") or None
    sock = bind(cfg.host, cfg.port)
    url = url_of(sock)
    dtype = run.decode_dtype
    banner = (f"picochat serve: {url}/ (model {run.path.name}, {run.model.num_params() / 1e6:.1f}M params, "
              f"context {run.model.config.sequence_len}, {run.device.type} {str(dtype).removeprefix('torch.')}, "
              f"max {cfg.max_concurrent} concurrent rows, queue {cfg.max_queue}"
              f"{', API key required' if api_key else ''})")
    app = create_app(Engine(run.model, run.tokenizer), run.path.name, cfg.max_concurrent, cfg.max_queue,
                     api_key, dtype, banner, cfg.limits)
    try:
        _uvicorn(app).run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn has shut down gracefully and re-raised the Ctrl-C: done
        pass
