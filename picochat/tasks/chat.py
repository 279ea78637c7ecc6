"""General chat data: SmolTalk-style `messages` lists and ShareGPT `conversations` lists.

SmolTalk (and most HF chat sets) store {"messages": [{"role", "content"}, ...]}; ShareGPT dumps
(FastChat, Vicuna) store {"conversations": [{"from": "human"|"gpt"|"system", "value"}, ...]}.
Real dumps contain broken records (a turn from the wrong side, an empty reply); those are dropped
with a logged count rather than failing a training run, unless nothing usable is left.
"""

from __future__ import annotations

from pathlib import Path

from picochat.common import PicochatError, log
from picochat.tasks.base import ListTask, read_records, read_split
from picochat.conversation import validate_conversation

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "bing": "assistant", "bard": "assistant", "system": "system"}


def from_sharegpt(turns: list) -> dict:
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or turn.get("from") not in SHAREGPT_ROLES:
            who = turn.get("from") if isinstance(turn, dict) else turn
            raise PicochatError(f"turn {i}: unknown speaker {who!r}")
        messages.append({"role": SHAREGPT_ROLES[turn["from"]], "content": turn.get("value")})
    return {"messages": messages}


def to_conversation(record: dict) -> dict:
    """One record (either layout) -> a conversation; PicochatError if it is malformed."""
    if isinstance(record.get("messages"), list):
        conv = {"messages": [{"role": m.get("role"), "content": m.get("content")} if isinstance(m, dict) else m
                             for m in record["messages"]]}
    elif isinstance(record.get("conversations"), list):
        conv = from_sharegpt(record["conversations"])
    else:
        raise PicochatError("no 'messages' or 'conversations' list")
    validate_conversation(conv)
    return conv


class Chat(ListTask):
    """Conversations from a file of `messages` or `conversations` records."""

    def __init__(self, path: str | Path, name: str = "chat", split: str = "train"):
        self.name = name
        # a file, or a directory of a Hub export's <split>-*.parquet (SmolTalk as downloaded)
        records = read_split(Path(path), split, (), (), name) if Path(path).is_dir() else read_records(path, what=name)
        first = records[0]
        if not isinstance(first, dict) or not any(k in first for k in ("messages", "conversations")):
            has = ", ".join(first) if isinstance(first, dict) else f"a {type(first).__name__}"
            raise PicochatError(f"{name}: {path}: records need a 'messages' (SmolTalk) or "
                                f"'conversations' (ShareGPT) list (the first record has {has})")
        examples, bad = [], []
        for i, rec in enumerate(records):
            try:
                examples.append(to_conversation(rec if isinstance(rec, dict) else {}))
            except PicochatError as e:
                bad.append(f"record {i}: {e}")
        if bad:
            log(f"{name}: skipped {len(bad)} of {len(records)} malformed conversations in {path} "
                f"(first: {bad[0]})")
        if not examples:
            raise PicochatError(f"{name}: no valid conversation in {path} ({bad[0]})")
        super().__init__(examples)
