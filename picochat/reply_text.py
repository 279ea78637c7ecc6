"""The text a reply reads as: token ids in, readable text out, as they arrive.

A calculator call reads as "[calc: 1+2] = 3"; every other special token (stops, turn markers)
reads as nothing. The chat CLI, the server and every Completion's `text` go through TextStream.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from .tokenizer import OUTPUT_END, OUTPUT_START, PYTHON_END, PYTHON_START

# How special tokens read in text: the tool markers become a plain-text rendering of the call
SPECIAL_TEXT = {PYTHON_START: "[calc: ", PYTHON_END: "]", OUTPUT_START: " = ", OUTPUT_END: ""}
NO_SPACE_BEFORE = tuple(".,;:!?)]}'\"\n\t ")  # after a tool's output, words get a space, these do not


@dataclass
class StreamEvent:
    token: int
    forced: bool  # fed in by the engine (tool output), not sampled
    text: str  # readable text this token completes ("" while a UTF-8 character is incomplete)
    part: str  # "text", "call" (the calculator expression and its markers) or "output"


class TextStream:
    """Token ids in, readable text out, only ever whole UTF-8 characters.

    A token can end in the middle of a multi-byte character (byte-level BPE), so the bytes go
    through an incremental UTF-8 decoder, which returns the longest complete prefix and holds
    the incomplete tail back until the next token completes it. Special tokens render through
    SPECIAL_TEXT. `part` tracks whether we are inside a tool call or its output, for UIs that
    style them differently.

    A call's text is held back until it closes and then comes out whole, "[calc: 1+2]"; one that
    never closes (the reply ended inside it) comes out at the end as the plain words it was. The
    words after a tool's output are set off by a space unless they start with one (or with
    punctuation): "= 3 ok", not "= 3ok"."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.special = {sid: SPECIAL_TEXT.get(name, "") for name, sid in tokenizer.special_tokens.items()}
        self.names = {sid: name for name, sid in tokenizer.special_tokens.items()}
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.part = "text"
        self.call: str | None = None  # the open call's text so far
        self.space = False  # the next words follow a tool's output

    def push(self, token: int) -> str:
        """The text that `token` completes."""
        if token not in self.special:
            text = self.decoder.decode(self.tokenizer.token_bytes(token))
            if self.call is not None:
                self.call += text
                return ""
            return self._spaced(text)
        text = self._drain()  # bytes pending before a special can never be completed: as U+FFFD
        if self.call is not None:
            self.call, text = self.call + text, ""
        name = self.names[token]
        if name == PYTHON_START:  # (a call still open is abandoned: its words read as words)
            text = self._unclosed() + text
            self.part, self.call = "call", self.special[token]
            return self._spaced(text)
        if name == PYTHON_END and self.call is not None:
            text, self.call = self.call + self.special[token], None
            self.part = "text"
            return text
        if name == OUTPUT_START:
            self.part = "output"
        elif name == OUTPUT_END:
            self.part, self.space = "text", True
        return self._spaced(text) + self.special[token]

    def _spaced(self, text: str) -> str:
        if self.space and text:
            self.space = False
            return text if text.startswith(NO_SPACE_BEFORE) else " " + text
        return text

    def _drain(self) -> str:
        text = self.decoder.decode(b"", final=True)
        self.decoder.reset()
        return text

    def flush(self) -> str:
        """Whatever is still pending, at the end of a stream (then in part "text")."""
        text = self._unclosed() + self._drain()
        self.part = "text"
        return self._spaced(text)

    def _unclosed(self) -> str:
        """The words of a call that never closed, without its marker ("" when none is open)."""
        words, self.call = (self.call or "").removeprefix(SPECIAL_TEXT[PYTHON_START]), None
        return words


def render_text(tokenizer, tokens: Iterable[int]) -> str:
    """Readable text for generated tokens: what stream_text yields, all at once."""
    stream = TextStream(tokenizer)
    return "".join(stream.push(t) for t in tokens) + stream.flush()


def stream_text(tokenizer, tokens: Iterable[tuple[int, bool]]) -> Iterator[StreamEvent]:
    """(token, forced) pairs of one row, as they arrive, each with the readable text it completes
    (for UIs that style tool calls); a last event carries what was still pending at the end."""
    text = TextStream(tokenizer)
    last = None
    for tok, forced in tokens:
        before = text.part
        piece = text.push(tok)
        # a start marker belongs to the part it opens, an end marker to the part it closes
        part = text.part if text.part != "text" else before
        last = StreamEvent(tok, forced, piece, part)
        yield last
    tail = text.flush()
    if tail and last is not None:  # an incomplete character, or a call that never closed
        yield StreamEvent(last.token, last.forced, tail, text.part)
