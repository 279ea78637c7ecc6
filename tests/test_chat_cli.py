"""Drive `picochat chat` as a user would: in a pseudo-terminal, typing and reading."""

import os
import sys

import pexpect
import pytest
import torch

from .conftest import REPO


@pytest.fixture(scope="module")
def endless(small_tokenizer, tmp_path_factory):
    """A chat model whose every answer is "aaaa..." until its 65,536-token context is full, which
    takes minutes: an answer that cannot end before the test interrupts it. Its blocks are the
    identity (a fresh model's output projections are zero), so the hidden state at a token is its
    embedding, normed; the head scores "a" alone, with "a"'s own embedding, and
    <|assistant_start|> is given the same embedding: greedy decoding says "a" forever."""
    from picochat.config import ModelConfig
    from picochat.model import GPT
    from picochat.run_dir import save_run
    from picochat.tokenizer import ASSISTANT_START, Tokenizer
    tok = Tokenizer.load(small_tokenizer)
    a, start = tok.encode("a")[0], tok.special_id(ASSISTANT_START)
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, n_layer=1, n_embd=64, n_head=1, n_kv_head=1,
                            sequence_len=1 << 16))
    with torch.no_grad():
        model.wte.weight[start] = model.wte.weight[a]
        model.lm_head.weight.zero_()
        model.lm_head.weight[a] = model.wte.weight[a]
    return save_run(tmp_path_factory.mktemp("endless") / "run", model, tok, stage="sft")


def _spawn(*args):
    env = dict(os.environ, PYTHONPATH=str(REPO), TERM="dumb")
    return pexpect.spawn(sys.executable, ["-m", "picochat", "chat", *args], env=env, encoding="utf-8",
                         timeout=120, dimensions=(40, 200))


def test_interactive_chat_answers_clears_and_quits(tiny_base):
    child = _spawn("--load", str(tiny_base), "--device", "cpu", "--max-tokens", "12", "--seed", "1")
    child.expect("commands: /clear")
    child.expect("you> ")
    child.sendline("Hello, who are you?")
    child.expect("picochat> ")
    child.expect("you> ")  # the answer streamed, and the prompt came back
    answer = child.before.strip()
    assert "Traceback" not in answer
    child.sendline("/clear")
    child.expect(r"\(new conversation\)")
    child.expect("you> ")
    child.sendline("/quit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_ctrl_c_stops_the_answer_not_the_program(endless):
    child = _spawn("--load", str(endless), "--device", "cpu", "--max-tokens", "100000", "--temperature", "0")
    child.expect("you> ")
    child.sendline("Tell me a very long story.")
    child.expect("picochat> ")
    child.expect("aaa")  # the answer is streaming, and it cannot end by itself
    child.sendintr()
    child.expect(r"\[stopped\]")
    child.expect("you> ")  # still running, ready for the next message
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_one_shot_prompt(tiny_base):
    child = _spawn("--load", str(tiny_base), "--device", "cpu", "--prompt", "Hi", "--max-tokens", "5",
                   "--temperature", "0")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_bad_run_dir_is_one_error_line(tmp_path):
    child = _spawn("--load", str(tmp_path / "missing"), "--device", "cpu")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 2
    assert child.before.strip().startswith("error: run dir")
    if "Traceback" in child.before:
        pytest.fail(child.before)
