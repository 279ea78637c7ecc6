"""Drive `picochat chat` as a user would: in a pseudo-terminal, typing and reading."""

import os
import sys

import pexpect
import pytest

from .conftest import REPO


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


def test_ctrl_c_stops_the_answer_not_the_program(tiny_base):
    # a fixed seed makes the answer deterministic: it runs to the context limit, long enough to interrupt
    child = _spawn("--load", str(tiny_base), "--device", "cpu", "--max-tokens", "100000", "--temperature", "1.0",
                   "--seed", "3")
    child.expect("you> ")
    child.sendline("Tell me a very long story.")
    child.expect("picochat> ")
    child.expect(r"\S")  # the first streamed characters
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
