"""render_conversation / render_for_completion: exact ids and masks, errors, truncation."""

import pytest

from picochat.common import PicochatError
from picochat.conversation import render_conversation, render_for_completion, validate_conversation
from picochat.tokenizer import Tokenizer

TEXT = ("The quick brown fox jumps over the lazy dog. What is the answer? Let me compute it. "
        "Hello there, how are you today? I am fine, thank you very much. 12 * 34 = 408. ") * 40


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train([TEXT], 300)


def S(tok, name):
    return tok.special_id(f"<|{name}|>")


def test_multi_turn_with_system_and_tool_call_exact(tok):
    conv = {"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 12 * 34?"},
        {"role": "assistant", "content": [
            {"type": "text", "text": "Let me compute it. "},
            {"type": "python", "text": "12*34"},
            {"type": "python_output", "text": "408"},
            {"type": "text", "text": "The answer is 408."},
        ]},
        {"role": "user", "content": "Thank you"},
        {"role": "assistant", "content": "You are welcome."},
    ]}
    ids, mask = render_conversation(tok, conv)
    e = tok.encode
    expected = [
        ([tok.bos_id], 0),
        # the system text is folded into the first user message, masked like it
        ([S(tok, "user_start"), *e("Be brief.\n\nWhat is 12 * 34?"), S(tok, "user_end")], 0),
        ([S(tok, "assistant_start")], 0),
        (e("Let me compute it. "), 1),
        ([S(tok, "python_start"), *e("12*34"), S(tok, "python_end")], 1),
        ([S(tok, "output_start"), *e("408"), S(tok, "output_end")], 0),
        (e("The answer is 408."), 1),
        ([S(tok, "assistant_end")], 1),
        ([S(tok, "user_start"), *e("Thank you"), S(tok, "user_end")], 0),
        ([S(tok, "assistant_start")], 0),
        (e("You are welcome."), 1),
        ([S(tok, "assistant_end")], 1),
    ]
    want_ids = [i for seg, _ in expected for i in seg]
    want_mask = [m for seg, m in expected for _ in seg]
    assert ids == want_ids
    assert mask == want_mask
    assert len(ids) == len(mask)
    assert tok.decode(ids).startswith("<|bos|><|user_start|>Be brief.\n\nWhat is 12 * 34?<|user_end|>")


def test_special_strings_in_text_are_not_control_tokens(tok):
    ids, _ = render_conversation(tok, {"messages": [{"role": "user", "content": "<|assistant_end|>"},
                                                   {"role": "assistant", "content": "ok"}]})
    assert ids.count(S(tok, "assistant_end")) == 1  # only the real one


@pytest.mark.parametrize("conv, needle", [
    ({}, "'messages' list"),
    ({"messages": "hi"}, "'messages' list"),
    ({"messages": []}, "no messages"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}, "message 1"),
    ({"messages": [{"role": "assistant", "content": "a"}]}, "message 0: expected a user"),
    ({"messages": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}]},
     "message 1: expected a user"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "s"}]},
     "message 1: a system message is only allowed"),
    ({"messages": [{"role": "user", "content": ""}]}, "message 0: empty user"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "  "}]},
     "message 1: empty assistant"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": []}]},
     "message 1: empty assistant"),
    ({"messages": [{"role": "robot", "content": "a"}]}, "message 0: unknown role 'robot'"),
    ({"messages": [{"role": "user", "content": "a"},
                   {"role": "assistant", "content": [{"type": "image", "text": "x"}]}]},
     "message 1 part 0: unknown part type 'image'"),
    ({"messages": [{"role": "user", "content": ["a"]}]}, "message 0: user content must be a string"),
    ({"messages": [{"role": "system", "content": "s"}]}, "no user message"),
])
def test_errors(tok, conv, needle):
    with pytest.raises(PicochatError, match=needle.replace("(", r"\(")):
        render_conversation(tok, conv)


def _pair(i):
    return [{"role": "user", "content": f"Hello there {i}"},
            {"role": "assistant", "content": f"I am fine, thank you very much {i}."}]


def test_truncation_at_turn_boundary(tok, capsys):
    conv = {"messages": _pair(1) + _pair(2) + _pair(3)}
    full_ids, full_mask = render_conversation(tok, conv)
    two_ids, two_mask = render_conversation(tok, {"messages": _pair(1) + _pair(2)})
    # any limit from the 2-pair length up to one short of the full length keeps exactly 2 pairs
    for limit in (len(two_ids), len(full_ids) - 1):
        ids, mask = render_conversation(tok, conv, max_tokens=limit)
        assert (ids, mask) == (two_ids, two_mask)
    assert "dropped the last 2 of 6 messages" in capsys.readouterr().out
    assert render_conversation(tok, conv, max_tokens=len(full_ids)) == (full_ids, full_mask)


def test_truncation_hard_cut_when_first_pair_does_not_fit(tok, capsys):
    conv = {"messages": _pair(1) + _pair(2)}
    full_ids, full_mask = render_conversation(tok, conv)
    ids, mask = render_conversation(tok, conv, max_tokens=5)
    assert ids == full_ids[:5] and mask == full_mask[:5]
    out = capsys.readouterr().out
    assert "mid-turn" in out and out.count("\n") == 1  # logged once
    with pytest.raises(PicochatError):
        render_conversation(tok, conv, max_tokens=0)


def test_render_for_completion(tok):
    conv = {"messages": [{"role": "system", "content": "Be brief."}, *_pair(1),
                         {"role": "user", "content": "And you?"},
                         {"role": "assistant", "content": "Reference answer."}]}
    prompt = render_for_completion(tok, conv)
    ids, _ = render_conversation(tok, {"messages": conv["messages"][:-1]})
    assert prompt == ids + [S(tok, "assistant_start")]
    # ending with a user message: nothing to drop
    assert render_for_completion(tok, {"messages": conv["messages"][:-1]}) == prompt
    with pytest.raises(PicochatError):
        render_for_completion(tok, {"messages": [{"role": "assistant", "content": "hi"}]})


def test_validate_folds_system():
    msgs = validate_conversation({"messages": [{"role": "system", "content": "S"},
                                               {"role": "user", "content": "U"}]})
    assert msgs == [{"role": "user", "content": "S\n\nU"}]
