"""The OpenAI wire format: request validation, errors, and per-choice text with stop strings.

Validation is by hand (no schema library): each field is checked for type and range, and any
problem becomes an ApiError that app.py answers as OpenAI does,
    {"error": {"message", "type": "invalid_request_error", "param", "code"}}
with a 4xx status. Nothing here touches the model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..common import PicochatError
from ..conversation import render_for_completion, validate_conversation
from ..reply_text import TextStream

MAX_STOPS = 4  # as OpenAI
MAX_STOP_CHARS = 256
ROLES = ("system", "developer", "user", "assistant")  # OpenAI's "developer" is a system message


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class Params:
    """A validated generation request."""
    prompt: list[int]
    max_tokens: int
    temperature: float
    top_k: int | None
    top_p: float | None
    seed: int | None
    n: int
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    tools: bool = True


# ----------------------------------------------------------------------------- field checks

def _type_name(v) -> str:
    return "null" if v is None else type(v).__name__


def _number(body: dict, name: str, default, lo: float, hi: float, lo_open: bool = False):
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ApiError(400, f"'{name}' must be a number, not {_type_name(v)}", name)
    if v < lo or v > hi or (lo_open and v == lo):
        raise ApiError(400, f"'{name}' must be {'>' if lo_open else '>='} {lo} and <= {hi}, got {v}", name)
    return float(v)


def _integer(body: dict, name: str, default, lo: int, hi: int):
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        raise ApiError(400, f"'{name}' must be an integer, not {_type_name(v)}", name)
    if not lo <= v <= hi:
        raise ApiError(400, f"'{name}' must be between {lo} and {hi}, got {v}", name)
    return v


def _boolean(body: dict, name: str, default: bool) -> bool:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise ApiError(400, f"'{name}' must be a boolean, not {_type_name(v)}", name)
    return v


def _stops(body: dict) -> list[str]:
    v = body.get("stop")
    if v is None:
        return []
    stops = [v] if isinstance(v, str) else v
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise ApiError(400, "'stop' must be a string or a list of strings", "stop")
    if len(stops) > MAX_STOPS:
        raise ApiError(400, f"'stop' takes at most {MAX_STOPS} strings, got {len(stops)}", "stop")
    if any(not s or len(s) > MAX_STOP_CHARS for s in stops):
        raise ApiError(400, f"stop strings must be 1 to {MAX_STOP_CHARS} characters", "stop")
    return stops


def _sampling(body: dict, prompt: list[int], context: int, max_n: int, default_max: int | None,
              tools: bool) -> Params:
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise ApiError(400, "'model' must be a string", "model")
    if len(prompt) >= context:
        raise ApiError(400, f"the prompt is {len(prompt)} tokens; this model's context is {context} tokens "
                            "and must leave room for at least one new token", "messages",
                       "context_length_exceeded")
    room = context - len(prompt)
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _integer(body, name, None, 1, 1 << 30)
    if max_tokens is None:
        max_tokens = room if default_max is None else min(default_max, room)
    elif max_tokens >= context:  # could never be honoured, whatever the prompt
        raise ApiError(400, f"{name} {max_tokens} is beyond this model's context of {context} tokens",
                       name, "context_length_exceeded")
    else:  # a reply may use the room the prompt leaves; it then ends with finish_reason "length"
        max_tokens = min(max_tokens, room)
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise ApiError(400, "'stream_options' must be an object", "stream_options")
    stream = _boolean(body, "stream", False)
    return Params(
        prompt=prompt, max_tokens=max_tokens,
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_k=_integer(body, "top_k", None, 1, 1 << 30),  # not OpenAI's; vLLM and others accept it
        top_p=_number(body, "top_p", None, 0.0, 1.0, lo_open=True),
        seed=_integer(body, "seed", None, 0, (1 << 63) - 1),
        n=_integer(body, "n", 1, 1, max_n),
        stop=_stops(body), stream=stream,
        include_usage=stream and _boolean(options or {}, "include_usage", False),
        tools=tools)


# ----------------------------------------------------------------------------- the two endpoints

def _message_content(i: int, msg: dict):
    """OpenAI content -> what picochat.conversation takes: a string, or (assistant) its parts."""
    content = msg.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        types = [p.get("type") if isinstance(p, dict) else None for p in content]
        if msg.get("role") == "assistant" and any(t in ("python", "python_output") for t in types):
            return content  # picochat's own parts (a tool call and its output): conversation checks them
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ApiError(400, f"messages[{i}].content[{j}]: only text parts are supported",
                               f"messages[{i}].content")
            texts.append(part["text"])
        return "".join(texts)
    raise ApiError(400, f"messages[{i}].content must be a string or a list of text parts, "
                        f"not {_type_name(content)}", f"messages[{i}].content")


def parse_chat(body: dict, tok, context: int, max_n: int) -> Params:
    messages = body.get("messages")
    if messages is None:
        raise ApiError(400, "'messages' is required", "messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list", "messages")
    conv = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise ApiError(400, f"messages[{i}] must be an object with 'role' and 'content'", f"messages[{i}]")
        role = msg.get("role")
        if role not in ROLES:
            raise ApiError(400, f"messages[{i}].role {role!r} is not supported (use one of {', '.join(ROLES)})",
                           f"messages[{i}].role")
        conv.append({"role": "system" if role == "developer" else role, "content": _message_content(i, msg)})
    if conv[-1]["role"] != "user":
        raise ApiError(400, "the last message must be a user message", "messages")
    try:
        validate_conversation({"messages": conv})  # alternation, one leading system message, no empty text
        prompt = render_for_completion(tok, {"messages": conv})
    except PicochatError as e:
        raise ApiError(400, str(e), "messages") from None
    return _sampling(body, prompt, context, max_n, None, tools=True)


def parse_completion(body: dict, tok, context: int, max_n: int) -> Params:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, str):
        ids = [tok.bos_id] + tok.encode(prompt)
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        if not all(0 <= t < tok.vocab_size for t in prompt):
            raise ApiError(400, f"token ids must be in [0, {tok.vocab_size})", "prompt")
        ids = list(prompt)  # token ids are taken as they are: the caller chose whether to start with <|bos|>
    elif prompt is None:
        raise ApiError(400, "'prompt' is required", "prompt")
    else:
        raise ApiError(400, "'prompt' must be a string, a list of one string, or a list of token ids", "prompt")
    for name in ("echo", "suffix", "logprobs", "best_of"):
        if body.get(name) not in (None, False, 1 if name == "best_of" else None):
            raise ApiError(400, f"'{name}' is not supported", name)
    # OpenAI's legacy completions default to 16 tokens; tools are a chat feature
    return _sampling(body, ids, context, max_n, 16, tools=False)


# ----------------------------------------------------------------------------- one choice's text

class ChoiceText:
    """Tokens of one choice in, pieces of text out: (part, text) with part "text", "call" or
    "output" (reply_text.TextStream), only whole characters, and cut at the first stop string.

    A piece that might be the beginning of a stop string is held back until the next tokens
    settle it, so a streamed stop string never leaks out partly."""

    def __init__(self, tok, stops: list[str]):
        self.text = TextStream(tok)
        self.stops = stops
        self.held: list[list[str]] = []  # [part, text] pieces not yet released
        self.tokens = 0  # completion tokens (the stop token not counted)
        self.finish: str | None = None
        self.pieces: list[tuple[str, str]] = []  # everything released, for non-streaming answers

    def push(self, token: int, finish: str | None) -> list[tuple[str, str]]:
        if finish == "stop":  # the stop token itself: no text, not counted (engine.Completion)
            return self.close("stop")
        self.tokens += 1
        before = self.text.part
        piece = self.text.push(token)
        part = self.text.part if self.text.part != "text" else before  # markers belong to their part
        out = self._release(part, piece)
        if finish is not None and self.finish is None:
            out += self.close(finish)
        return out

    def close(self, finish: str) -> list[tuple[str, str]]:
        """The end: flush what is held (no stop string can complete any more)."""
        if self.finish is not None:
            return []
        tail = self.text.flush()
        out = self._release(self.held[-1][0] if self.held else "text", tail, final=True) if tail or self.held else []
        if self.finish is None:
            self.finish = finish
        return out

    def _release(self, part: str, piece: str, final: bool = False) -> list[tuple[str, str]]:
        if piece:
            if self.held and self.held[-1][0] == part:
                self.held[-1][1] += piece
            else:
                self.held.append([part, piece])
        buf = "".join(t for _, t in self.held)
        if not self.stops:
            return self._take(len(buf))
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            out = self._take(min(hits))
            self.held = []
            self.finish = "stop"
            return out
        if final:
            return self._take(len(buf))
        # hold back the longest tail that could still grow into a stop string
        keep = max((k for s in self.stops for k in range(min(len(s) - 1, len(buf)), 0, -1)
                    if buf.endswith(s[:k])), default=0)
        return self._take(len(buf) - keep)

    def _take(self, n: int) -> list[tuple[str, str]]:
        out = []
        while n > 0 and self.held:
            part, text = self.held[0]
            if len(text) <= n:
                out.append((part, text))
                self.held.pop(0)
                n -= len(text)
            else:
                out.append((part, text[:n]))
                self.held[0][1] = text[n:]
                n = 0
        self.pieces += out
        return out

    @property
    def content(self) -> str:
        return "".join(t for _, t in self.pieces)
