"""Chat conversations as token ids plus a loss mask: the format SFT trains on and the engine speaks.

A conversation is {"messages": [{"role": ..., "content": ...}, ...]}. Roles are "system" (first
message only), "user" and "assistant", alternating and starting with "user". Content is a
string; an assistant's may also be a list of parts:
  {"type": "text", "text": ...}            words
  {"type": "python", "text": expr}         a calculator call: <|python_start|>expr<|python_end|>
  {"type": "python_output", "text": res}   its result: <|output_start|>res<|output_end|>

There are no system tokens (the vocabulary's layout is fixed, see SPECIAL_TOKENS), so a system
message is folded into the first user message, separated by a blank line. It is masked like the
user's text: the model reads it but is never trained to produce it.
"""

from __future__ import annotations

from collections import Counter

from .common import PicochatError, log
from .tokenizer import (ASSISTANT_END, ASSISTANT_START, OUTPUT_END, OUTPUT_START, PYTHON_END, PYTHON_START, USER_END,
                        USER_START, Tokenizer)

ROLES = ("system", "user", "assistant")
PART_TYPES = ("text", "python", "python_output")


def validate_conversation(conversation) -> list[dict]:
    """Check a conversation's structure and return its messages as alternating user/assistant
    dicts, the system message (if any) folded into the first user message.

    Separate from rendering so that task loaders can drop malformed records without a tokenizer."""
    if not isinstance(conversation, dict) or not isinstance(conversation.get("messages"), list):
        raise PicochatError("a conversation must be a dict with a 'messages' list")
    messages = conversation["messages"]
    if not messages:
        raise PicochatError("the conversation has no messages")
    out: list[dict] = []
    system = None
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise PicochatError(f"message {i}: expected a dict with 'role' and 'content', got {type(msg).__name__}")
        role, content = msg.get("role"), msg.get("content")
        if role not in ROLES:
            raise PicochatError(f"message {i}: unknown role {role!r} (expected one of {', '.join(ROLES)})")
        if role == "system" and i != 0:
            raise PicochatError(f"message {i}: a system message is only allowed as the first message")
        expected = "user" if len(out) % 2 == 0 else "assistant"
        if role != "system" and role != expected:
            raise PicochatError(f"message {i}: expected a {expected} message but got {role} "
                                "(roles must alternate user/assistant, starting with user)")
        if role == "assistant" and isinstance(content, list):
            if not content:
                raise PicochatError(f"message {i}: empty assistant message (no parts)")
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") not in PART_TYPES:
                    kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                    raise PicochatError(f"message {i} part {j}: unknown part type {kind!r} "
                                        f"(expected one of {', '.join(PART_TYPES)})")
                if not isinstance(part.get("text"), str):
                    raise PicochatError(f"message {i} part {j}: 'text' must be a string")
        elif not isinstance(content, str):
            raise PicochatError(f"message {i}: {role} content must be a string"
                                + (" or a list of parts" if role == "assistant" else ""))
        elif not content.strip():
            raise PicochatError(f"message {i}: empty {role} message")
        if role == "system":
            system = content
        else:
            out.append({"role": role, "content": content})
    if not out:
        raise PicochatError("the conversation has no user message")
    if system is not None:
        out[0] = {"role": "user", "content": system + "\n\n" + out[0]["content"]}
    return out


def _render_message(tok: Tokenizer, msg: dict) -> tuple[list[int], list[int]]:
    """One message's ids and mask (1 = the model is trained to predict this token)."""
    sid = tok.special_id
    if msg["role"] == "user":
        ids = [sid(USER_START), *tok.encode(msg["content"]), sid(USER_END)]
        return ids, [0] * len(ids)
    ids, mask = [sid(ASSISTANT_START)], [0]  # the start is forced by the engine, not predicted

    def add(new: list[int], m: int) -> None:
        ids.extend(new)
        mask.extend([m] * len(new))

    content = msg["content"]
    parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
    for part in parts:
        if part["type"] == "text":
            add(tok.encode(part["text"]), 1)
        elif part["type"] == "python":  # the model decides to call the tool: trained on
            add([sid(PYTHON_START), *tok.encode(part["text"]), sid(PYTHON_END)], 1)
        else:  # the engine forces the tool's output at inference: never a target
            add([sid(OUTPUT_START), *tok.encode(part["text"]), sid(OUTPUT_END)], 0)
    add([sid(ASSISTANT_END)], 1)  # the model must learn when to stop
    return ids, mask


def render_conversation(tok: Tokenizer, conversation: dict, max_tokens: int | None = None,
                        cuts: Counter | None = None) -> tuple[list[int], list[int]]:
    """A conversation -> (ids, mask), same length. mask[t] == 1 where ids[t] is a training target
    (so SFT's targets are ids[1:] where mask[1:] == 1): the assistant's words, its tool calls and
    <|assistant_end|>. The bos, the user's turns, <|assistant_start|> and tool outputs are 0.

    Over max_tokens, whole trailing messages are dropped so that the result ends after a complete
    user -> assistant exchange; if even the first exchange does not fit, ids are cut at max_tokens.
    Each cut is logged, or, given a Counter `cuts`, counted there ("messages", "mid-turn") for the
    caller to report once (a training mixture may cut thousands)."""
    if max_tokens is not None and max_tokens < 1:
        raise PicochatError(f"max_tokens must be at least 1, got {max_tokens}")
    messages = validate_conversation(conversation)
    ids, mask = [tok.bos_id], [0]
    ends = []  # token count after each message
    for msg in messages:
        m_ids, m_mask = _render_message(tok, msg)
        ids += m_ids
        mask += m_mask
        ends.append(len(ids))
    if max_tokens is None or len(ids) <= max_tokens:
        return ids, mask
    # Cut points that keep complete exchanges: right after an assistant message (odd index).
    fits = [(k + 1, end) for k, end in enumerate(ends) if k % 2 == 1 and end <= max_tokens]
    if fits:
        kept_msgs, kept = fits[-1]
        if cuts is not None:
            cuts["messages"] += 1
        else:
            log(f"render_conversation: {len(ids)} tokens > max_tokens {max_tokens}: dropped the last "
                f"{len(messages) - kept_msgs} of {len(messages)} messages ({len(ids) - kept} tokens)")
    else:
        kept = max_tokens
        if cuts is not None:
            cuts["mid-turn"] += 1
        else:
            log(f"render_conversation: {len(ids)} tokens > max_tokens {max_tokens} and the first exchange "
                f"does not fit: cut {len(ids) - kept} tokens mid-turn")
    return ids[:kept], mask[:kept]


def describe_cuts(cuts: Counter, of: int, max_tokens: int) -> str | None:
    """One line for what render_conversation counted, or None when nothing was cut."""
    if not cuts:
        return None
    parts = [f"{cuts['messages']:,} lost their last messages"] if cuts["messages"] else []
    parts += [f"{cuts['mid-turn']:,} were cut mid-turn (the first exchange alone is longer)"] if cuts["mid-turn"] else []
    return f"{sum(cuts.values()):,} of {of:,} conversations are longer than {max_tokens} tokens: {' and '.join(parts)}"


def render_example(tok: Tokenizer, example: dict, max_tokens: int | None = None,
                   cuts: Counter | None = None) -> tuple[list[int], list[int]]:
    """A training example -> (ids, mask): a conversation (render_conversation), or plain text
    ({"text": ...}, from tasks.text), every token of which is a target, as in pretraining."""
    if "text" in example and "messages" not in example:
        ids = [tok.bos_id, *tok.encode(example["text"])]
        if max_tokens is not None and len(ids) > max_tokens:
            ids = ids[:max_tokens]  # a document is cut, as pretraining rows cut documents
        return ids, [0] + [1] * (len(ids) - 1)
    return render_conversation(tok, example, max_tokens, cuts)


def render_for_completion(tok: Tokenizer, conversation: dict) -> list[int]:
    """The prompt for sampling an assistant reply: the conversation without its last assistant
    message (if it ends with one, e.g. a task's reference answer), then <|assistant_start|>."""
    if not isinstance(conversation, dict) or not isinstance(conversation.get("messages"), list):
        validate_conversation(conversation)  # raises, explaining what is wrong
    messages = conversation["messages"]
    if messages and isinstance(messages[-1], dict) and messages[-1].get("role") == "assistant":
        messages = messages[:-1]
    # Roles alternate from a user message, so what remains ends with a user message (validated).
    ids, _ = render_conversation(tok, {"messages": messages})
    return ids + [tok.special_id(ASSISTANT_START)]
