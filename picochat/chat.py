"""`picochat chat`: talk to a chat model in the terminal, with streaming and visible tool calls.

The history is kept as token ids, exactly as the model saw and wrote them (tool calls and their
forced outputs included), so the next turn continues the same conversation the model knows.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from .common import autocast, choose_compile
from .decode_batch import GenRequest
from .engine import Engine
from .inference import LoadOptions, open_for_inference
from .reply_text import stream_text
from .sample import SamplingOptions
from .settings import setting
from .tokenizer import ASSISTANT_END, ASSISTANT_START, USER_END, USER_START

HELP = "commands: /clear starts a new conversation, /quit leaves (or Ctrl-D); Ctrl-C stops an answer"
STYLE = {"call": "\033[36m", "output": "\033[2m"}  # tool calls cyan, their outputs dim
RESET = "\033[0m"


@dataclass
class ChatConfig:
    model: LoadOptions = setting(help="the model to use")
    prompt: str | None = setting(None, "answer this one message and exit (default: talk until /quit)")
    compile: bool | None = setting(None, "torch.compile the decode step: faster tokens once the first reply has "
                                         "compiled it (15-30 s) (default: on CUDA, off elsewhere)")
    sampling: SamplingOptions = setting(factory=lambda: SamplingOptions(temperature=0.6, max_tokens=512, seed=None))


class ChatSession:
    def __init__(self, engine: Engine, temperature: float = 0.6, top_k: int | None = 50, top_p: float | None = None,
                 max_tokens: int = 512, seed: int | None = None, color: bool = False):
        self.engine, self.tok = engine, engine.tokenizer
        self.sample_kw = dict(temperature=temperature, top_k=top_k, top_p=top_p, max_tokens=max_tokens, seed=seed)
        self.color = color
        self.clear()

    def clear(self) -> None:
        self.history = [self.tok.bos_id]

    def answer(self, text: str, out=sys.stdout) -> str:
        """Stream the assistant's reply to `text` into `out`; return its readable text. Ctrl-C stops
        this answer (what was said so far stays in the history) and not the program."""
        sid = self.tok.special_id
        ids = self.history + [sid(USER_START)] + self.tok.encode(text) + [sid(USER_END), sid(ASSISTANT_START)]
        ids = self.engine.fit_prompt(ids, self.sample_kw["max_tokens"])
        steps = self.engine.generate([GenRequest(ids, **self.sample_kw)])
        tokens, pieces = [], []
        try:
            for ev in stream_text(self.tok, ((e.token, e.forced) for events in steps for e in events)):
                tokens.append(ev.token)
                pieces.append(ev.text)
                style = STYLE.get(ev.part) if self.color else None
                out.write(f"{style}{ev.text}{RESET}" if style and ev.text else ev.text)
                out.flush()
        except KeyboardInterrupt:
            out.write(" [stopped]")
        out.write("\n")
        end = sid(ASSISTANT_END)
        if not tokens or tokens[-1] != end:
            tokens.append(end)  # close the turn whatever ended it
        self.history = ids + tokens
        return "".join(pieces)


def chat(cfg: ChatConfig) -> None:
    run = open_for_inference(cfg.model)
    engine = Engine(run.model, run.tokenizer, compile=choose_compile(cfg.compile, run.device))
    s = cfg.sampling
    session = ChatSession(engine, s.temperature, s.top_k or None, s.top_p, s.max_tokens, s.seed,
                          color=sys.stdout.isatty())
    with autocast(run.device, run.decode_dtype):
        if cfg.prompt is not None:  # one-shot
            session.answer(cfg.prompt)
            return
        _talk(session, run)


def _talk(session: ChatSession, run) -> None:
    print(f"picochat — {run.path} ({run.meta.get('stage', '?')}, {run.model.num_params() / 1e6:.1f}M params)")
    print(HELP)
    while True:
        try:
            text = input("\nyou> ").strip()
        except EOFError:
            print()
            return
        except KeyboardInterrupt:
            print("\n(" + HELP + ")")
            continue
        if text in ("/quit", "/exit"):
            return
        if text == "/clear":
            session.clear()
            print("(new conversation)")
            continue
        if not text:
            continue
        sys.stdout.write("picochat> ")
        session.answer(text)
