"""The code sandbox: hostile programs fail and leave the host alone; HumanEval is graded through it.

The hostile programs go around the Python guard on purpose (`import posix`, not `os`): what they
test is the kernel's enforcement. A test whose layer this platform lacks skips, naming it.
"""

import json
import os
import socket
import sys

import pytest

from picochat.common import PicochatError
from picochat.evals.sandbox import run_many, run_python, sandbox_features
from picochat.tasks.humaneval import HumanEval, canonical_completion, grade_many, program
from tests.conftest import TEST_DATA, run_cli, shared_data

FEATURES = sandbox_features()
SECRET_NAME, SECRET = "PICOCHAT_TEST_API_KEY", "sk-test-hunter2-do-not-leak"


def processes() -> list[tuple[int, int, int, int]]:
    """(pid, parent pid, process group, session) of every process, from /proc (Linux)."""
    found = []
    for name in filter(str.isdigit, os.listdir("/proc") if os.path.isdir("/proc/self") else []):
        try:
            with open(f"/proc/{name}/stat") as f:
                found.append((int(name), *(int(x) for x in f.read().rsplit(")", 1)[1].split()[1:4])))
        except (OSError, ValueError):
            continue  # it ended while we looked
    return found


def children() -> set[int]:
    return {pid for pid, ppid, _, _ in processes() if ppid == os.getpid()}


@pytest.fixture
def host(tmp_path, monkeypatch):
    """What a hostile program aims at: a secret in our environment, a file outside its temporary
    directory, and a TCP and a UDP server on our loopback. Checks after the test that all is
    untouched and that nothing of the child is left running."""
    monkeypatch.setenv(SECRET_NAME, SECRET)
    sentinel = tmp_path / "sentinel.txt"
    sentinel.write_text("precious")
    tcp = socket.create_server(("127.0.0.1", 0))
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    fields = {"sentinel": str(sentinel), "outside": str(tmp_path / "pwned.txt"), "host_pid": os.getpid(),
              "port": tcp.getsockname()[1], "udp_port": udp.getsockname()[1], "secret_name": SECRET_NAME}
    results, before = [], children()
    yield fields, results
    assert sentinel.read_text() == "precious" and not (tmp_path / "pwned.txt").exists()
    for sock in (tcp, udp):
        sock.settimeout(0.2)
        with pytest.raises(socket.timeout):  # nothing connected, nothing arrived
            sock.accept() if sock is tcp else sock.recvfrom(100)
        sock.close()
    for r in results:  # nothing left of the child: not it, its process group, or its session
        assert [p for p in processes() if r.pid in (p[0], p[2], p[3])] == []
    assert children() <= before
    assert os.environ[SECRET_NAME] == SECRET  # and this process is fine:
    assert run_python("print(6 * 7)").stdout == "42\n"


HOSTILE = {
    "infinite_loop": ("while True:\n    pass\n", {"timeout"}, ()),
    # posix.fork, not os.fork: the guard is no obstacle; children leave the process group
    "fork_bomb": (("import posix\nwhile True:\n    try:\n        if posix.fork() == 0:\n            posix.setsid()\n"
                   "    except OSError:\n        pass\n"), {"timeout"}, ("seccomp_nofork",)),
    "huge_memory": ("x = bytearray(1 << 40)\n", {"memory"}, ("rlimits",)),
    "growing_memory": ("x = []\nwhile True:\n    x.append(bytearray(1 << 20))\n", {"memory"}, ("rlimits",)),
    "write_outside": ("import posix\nposix.open({outside!r}, posix.O_WRONLY | posix.O_CREAT, 0o644)\n",
                      {"failed"}, ("landlock_fs",)),
    "overwrite_outside": ("open({sentinel!r}, 'w').write('pwned')\n", {"failed"}, ("landlock_fs",)),
    "read_outside": ("print(open({sentinel!r}).read())\n", {"failed"}, ("landlock_fs",)),
    "delete_outside": ("import posix\nposix.unlink({sentinel!r})\n", {"failed"}, ("landlock_fs",)),
    "tcp_connect": ("import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2).sendall(b'hi')\n",
                    {"failed"}, ("netns",)),
    "udp_send": (("import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
                  "s.sendto(b'hi', ('127.0.0.1', {udp_port}))\n"), {"failed"}, ("netns",)),
    "env_secret": ("import os\nprint(dict(os.environ))\nassert {secret_name!r} in os.environ\n", {"failed"}, ()),
    "host_environ": ("print(open('/proc/{host_pid}/environ', 'rb').read())\n", {"failed"}, ("landlock_fs",)),
    "signal_host": ("import posix\nposix.kill({host_pid}, 0)\n", {"failed"}, ("landlock_scope",)),
    "print_gigabytes": ("import sys\nwhile True:\n    sys.stdout.write('x' * (1 << 20))\n", {"output_limit"}, ()),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_program_fails_and_host_is_untouched(name, host):
    code, statuses, layers = HOSTILE[name]
    missing = [layer for layer in layers if not FEATURES.get(layer)]
    if missing:
        pytest.skip(f"sandbox layer(s) not available here: {missing}")
    fields, results = host
    r = run_python(code.format(**fields), timeout=1.5, memory_mb=256)
    results.append(r)
    assert not r.passed and r.status in statuses, (r.status, r.stderr[-500:])
    assert r.seconds < 5  # the fork bomb and the flood are stopped, not waited out
    assert SECRET not in r.stdout + r.stderr and "precious" not in r.stdout + r.stderr
    assert len(r.stdout) <= 65536 and len(r.stderr) <= 65536
    # the memory hogs never got past their limit: the child's own peak, not this process's other children's
    assert 0 < r.max_rss_kb <= 300 * 1024


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="peak memory is read from /proc (Linux)")
def test_peak_memory_is_the_programs_own():
    """The peak is the program's, not the address space of the (big) process it was forked from:
    the rusage max RSS of a child keeps the parent's, which made this depend on the suite's order."""
    ballast = bytearray(600 << 20)  # this process: 600 MB more resident than any program below
    ballast[::4096] = b"x" * len(ballast[::4096])
    small = run_python("print(1)")
    hog = run_python("x = bytearray(150 << 20)\nx[::4096] = b'1' * len(x[::4096])\n")
    killed = run_python("x = bytearray(150 << 20)\nx[::4096] = b'1' * len(x[::4096])\nwhile True:\n    pass\n",
                        timeout=1.5)
    assert small.passed and hog.passed and killed.status == "timeout"
    assert 0 < small.max_rss_kb < 100 << 10
    for r in (hog, killed):  # its 150 MB, and no more than the interpreter's few tens of MB on top
        assert 150 << 10 < r.max_rss_kb < 250 << 10, r.max_rss_kb
    del ballast


def test_features_and_guard():
    assert {"rlimits", "userns", "netns", "landlock_fs", "seccomp_nofork", "python_guard"} <= set(FEATURES)
    if sys.platform == "linux":
        assert FEATURES["rlimits"]
    # best effort, on every platform: the obvious ways out are gone
    r = run_python("import os, shutil, subprocess\nassert os.system is None and shutil.rmtree is None "
                   "and subprocess.Popen is None\n")
    assert r.passed, r.stderr


def test_ordinary_programs():
    r = run_python("import os, sys, threading\nt = threading.Thread(target=print, args=('thread',))\n"
                   "t.start(); t.join()\nopen('scratch.txt', 'w').write('ok')\nprint(os.getcwd())\n"
                   "print('err', file=sys.stderr)\n")
    assert r.passed and r.status == "passed" and r.returncode == 0, r.stderr
    assert r.stdout.startswith("thread\n") and r.stderr == "err\n"
    workdir = r.stdout.split()[1]
    assert workdir != os.getcwd() and not os.path.exists(workdir)  # a fresh directory, removed after
    for code, status in (("raise SystemExit(3)", "failed"), ("1 / 0", "failed"), ("def f(:", "failed")):
        r = run_python(code)
        assert not r.passed and r.status == status and r.returncode != 0
    r = run_python("print('x' * 100)", max_output=10)
    assert r.status == "output_limit" and r.stdout == "x" * 10
    with pytest.raises(PicochatError):
        run_python("pass", timeout=0)
    results = run_many([f"print({i})" for i in range(6)], workers=2)
    assert [r.stdout for r in results] == [f"{i}\n" for i in range(6)]


@pytest.fixture(scope="module")
def humaneval():
    return HumanEval(TEST_DATA / "humaneval" / "HumanEval.jsonl.gz")


@pytest.mark.parametrize("whole", [False, True], ids=["excerpt", "all-164"])
def test_humaneval_canonical_solutions_pass_through_the_cli(whole):
    """`picochat eval humaneval --canonical`: every reference solution passes in the sandbox (the
    excerpt's 40, and all 164 where the whole dataset is at hand)."""
    data = shared_data("humaneval") if whole else TEST_DATA / "humaneval"
    r = run_cli("eval", "humaneval", "--canonical", "--data", str(data))
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.splitlines()[-1])
    assert out["passed"] == out["of"] == (164 if whole else 40) and out["failed"] == {}, out
    assert {"rlimits", "new_session", "scrubbed_env"} <= set(out["sandbox"])


def test_humaneval_wrong_and_whole_function_completions(humaneval):
    ex = {e["task_id"]: e for e in humaneval}
    # wrong answers fail, and so does exiting 0 before the tests have run
    wrong = [(humaneval[i], "    return None\n") for i in range(8)]
    wrong += [(humaneval[0], "    import sys\n    sys.exit(0)\n"), (humaneval[0], "    exit(0)\n")]
    assert [r.passed for r in grade_many(wrong)] == [False] * len(wrong)
    # a whole function in a fenced block: the prompt's def is not repeated, its helpers are kept
    whole = [(e, f"Here you go:\n```python\n{e['prompt']}{canonical_completion(e)}```\nDone.")
             for e in (ex["HumanEval/0"], ex["HumanEval/10"], ex["HumanEval/32"])]
    decode = ex["HumanEval/38"]  # relies on the prompt's helper encode_cyclic
    whole.append((decode, "```python\ndef decode_cyclic(s: str):\n    return encode_cyclic(encode_cyclic(s))\n```"))
    assert program(decode, whole[-1][1]).count("def decode_cyclic(") == 1
    assert "def encode_cyclic(" in program(decode, whole[-1][1])
    assert [r.passed for r in grade_many(whole)] == [True] * len(whole)
    assert humaneval.reward(decode, whole[-1][1]) == 1.0
    assert humaneval.reward(decode, "```python\ndef decode_cyclic(s: str):\n    return s\n```") == 0.0
