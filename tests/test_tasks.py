"""Tasks on real data (the excerpts in tests/data; the whole datasets in ../shared/data for the
counts at the end): conversations, graders, layouts, mixtures."""

import gzip
import itertools
import json
from pathlib import Path

import pytest

from picochat.common import PicochatError
from picochat.tasks import Mixture, build_mixture, build_task, parse_mixture
from picochat.tasks.arc import ARC
from picochat.tasks.arithmetic import Arithmetic
from picochat.tasks.base import read_records
from picochat.tasks.chat import Chat
from picochat.tasks.gsm8k import GSM8K, solution_parts
from picochat.tasks.humaneval import HumanEval, program
from picochat.tasks.identity import DEFAULT_PAIRS, Identity
from picochat.tasks.mmlu import MMLU
from picochat.tasks.spelling import Spelling
from picochat.conversation import render_conversation
from picochat.tokenizer import Tokenizer
from picochat.tools import calculate

from .conftest import TEST_DATA as DATA
from .conftest import shared_data


def data(*parts: str) -> Path:
    return DATA.joinpath(*parts)


@pytest.fixture(scope="module")
def tok():
    text = data("tinyshakespeare", "input.txt").read_text()[:20_000]
    return Tokenizer.train([text], 400)


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


SMOLTALK = [
    {"messages": [{"role": "system", "content": "You are kind."},
                  {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]},
    {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
                  {"role": "user", "content": "Thanks"}, {"role": "assistant", "content": "Welcome."}]},
    {"messages": [{"role": "assistant", "content": "I speak first"}]},  # malformed: dropped
]


# ----------------------------------------------------------------------------- chat

def test_chat_smoltalk_jsonl(tmp_path, capsys):
    task = Chat(write_jsonl(tmp_path / "smol.jsonl", SMOLTALK))
    assert len(task) == 2
    assert task[0]["messages"][0] == {"role": "system", "content": "You are kind."}
    assert task[1]["messages"][3] == {"role": "assistant", "content": "Welcome."}
    assert "skipped 1 of 3 malformed" in capsys.readouterr().out


def test_chat_sharegpt_json():
    task = Chat(data("chat", "fastchat", "dummy_conversation.json"))
    assert len(task) == 30
    assert task[0]["messages"][:2] == [
        {"role": "user", "content": "Who are you?"},
        {"role": "assistant", "content": "I am Vicuna, a language model trained by researchers from "
                                         "Large Model Systems Organization (LMSYS)."},
    ]


def test_chat_wrong_fields(tmp_path):
    with pytest.raises(PicochatError, match="'messages'.*'conversations'"):
        Chat(write_jsonl(tmp_path / "x.jsonl", [{"text": "hi"}]))


# ----------------------------------------------------------------------------- gsm8k

def test_gsm8k_first_train_example():
    task = GSM8K(data("gsm8k"), split="train")
    assert len(task) == 50
    ex = task[0]
    assert ex["messages"][0]["content"].startswith("Natalia sold clips to 48 of her friends")
    assert ex["messages"][1]["content"] == [
        {"type": "text", "text": "Natalia sold 48/2 = "},
        {"type": "python", "text": "48/2"},
        {"type": "python_output", "text": "24"},
        {"type": "text", "text": "24 clips in May.\nNatalia sold 48+24 = "},
        {"type": "python", "text": "48+24"},
        {"type": "python_output", "text": "72"},
        {"type": "text", "text": "72 clips altogether in April and May.\n#### 72"},
    ]
    assert ex["answer"] == 72


def test_gsm8k_reward():
    path = data("gsm8k", "test.jsonl")
    task = GSM8K(path, split="test")
    assert len(task) == 20
    raw = read_records(path)
    for ex, rec in zip(task, raw):
        assert task.reward(ex, rec["answer"]) == 1.0  # the reference solution, as text
        assert task.reward(ex, rec["answer"].rsplit("####", 1)[0] + f"#### {ex['answer'] + 1}") == 0.0
    ex = {"answer": 1200.0}
    assert task.reward(ex, "so #### 1,200") == 1.0
    assert task.reward(ex, "#### $1,200.00.") == 1.0
    assert task.reward(ex, "1200") == 0.0  # no #### marker
    assert solution_parts("a <<1+1=2>>2 b") == [
        {"type": "text", "text": "a "}, {"type": "python", "text": "1+1"},
        {"type": "python_output", "text": "2"}, {"type": "text", "text": "2 b"}]


def calculator_agreement(task, n: int) -> tuple[int, int]:
    """(calls that give the annotated result, calls) over the first n examples of a GSM8K task."""
    total = ok = 0
    for ex in list(task)[:n]:
        parts = ex["messages"][1]["content"]
        for call, out in itertools.pairwise(parts):
            if call["type"] == "python":
                total += 1
                got = calculate(call["text"])
                try:
                    ok += abs(float(got) - float(out["text"])) <= 1e-6 * max(1.0, abs(float(out["text"])))
                except ValueError:
                    pass
    return ok, total


def test_calculator_reproduces_gsm8k_annotations():
    """The engine's calculator must give the annotated results (numerically; "144.00" == "144")."""
    ok, total = calculator_agreement(GSM8K(data("gsm8k", "train.jsonl")), 50)
    assert total > 100 and ok == total, (ok, total)


# ----------------------------------------------------------------------------- arc / mmlu

def test_arc_numeric_labels_become_letters():
    task = ARC(data("arc", "ARC-Easy-train.jsonl"))
    assert len(task) == 14  # the first 12 rows, then rows 289 and 753
    ex = task[4]  # NYSEDREGENTS_2006_8_10: labels "1".."4", answerKey "3"
    assert ex["id"] == "NYSEDREGENTS_2006_8_10"
    assert ex["letters"] == ["A", "B", "C", "D"] and ex["answer"] == "C"
    assert "\nC. how they formed\n" in ex["messages"][0]["content"]
    assert ex["messages"][1]["content"] == "C"
    assert task[13]["letters"] == list("ABCDE")  # a 5-choice item (row 753)
    assert task[12]["letters"] == list("ABC")  # a 3-choice item (row 289)
    assert task.kind == "categorical"
    assert task.reward(ex, "C") == 1.0 and task.reward(ex, " (c).") == 1.0 and task.reward(ex, "B") == 0.0


def test_arc_directory_layout():
    d = data("arc")
    assert len(build_task("arc-challenge", d, split="test")) == 12
    assert len(build_task("arc", d, split="validation")) == 12 + 12


def test_mmlu_arrow_layout_counts():
    root = data("mmlu", "hf_arrow_mmlu_no_train")
    assert len(MMLU(root, "test")) == 30 + 20  # anatomy and astronomy
    assert len(MMLU(root, "dev")) == 10
    assert [len(MMLU(root, s, subject="anatomy")) for s in ("dev", "validation", "test")] == [5, 14, 30]
    assert len(MMLU(root / "anatomy", "test")) == 30  # one subject's directory
    ex = MMLU(root / "anatomy", "test")[0]
    assert ex["subject"] == "anatomy" and ex["answer"] == "A" and ex["letters"] == list("ABCD")
    assert ex["messages"][0]["content"].startswith("A lesion causing compression of the facial nerve")
    with pytest.raises(PicochatError, match="no 'auxiliary_train' files"):
        MMLU(root, "train")


def test_mmlu_csv_and_parquet(tmp_path):
    csv_root = data("mmlu", "csv_haechan")
    assert len(MMLU(csv_root, "test", subject="anatomy")) == 30
    assert len(MMLU(csv_root, "dev")) == 10
    import pyarrow as pa
    import pyarrow.parquet as pq
    rows = [{"question": "2+2?", "subject": "math", "choices": ["3", "4", "5", "6"], "answer": 1}]
    (tmp_path / "all").mkdir()
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "all" / "test-00000-of-00001.parquet")
    task = MMLU(tmp_path, "test")
    assert len(task) == 1 and task[0]["answer"] == "B"


# ----------------------------------------------------------------------------- humaneval

def test_humaneval_program_compiles():
    task = HumanEval(data("humaneval", "HumanEval.jsonl.gz"))
    assert len(task) == 40
    ex = task[0]
    assert ex["entry_point"] == "has_close_elements" and ex["task_id"] == "HumanEval/0"
    raw = read_records(data("humaneval", "HumanEval.jsonl.gz"))[0]
    assert ex["messages"][1]["content"] == raw["canonical_solution"]
    assert ex["messages"][0]["content"].endswith(raw["prompt"]) and ex["prompt"] == raw["prompt"]
    for ex in task:
        src = program(ex, ex["messages"][1]["content"])
        assert src.rstrip().endswith(f"check({ex['entry_point']})")
        compile(src, ex["task_id"], "exec")  # syntax only: running it is the sandbox's job
    fenced = program(task[0], "Sure:\n```python\n    return False\n```\n")
    assert "    return False\n" in fenced and "Sure" not in fenced
    # graded by running the tests in the sandbox (tests/test_sandbox.py covers the rest)
    assert task.reward(task[0], raw["canonical_solution"]) == 1.0
    assert task.reward(task[0], "    return False") == 0.0


# ----------------------------------------------------------------------------- identity

def test_identity(tmp_path):
    assert len(Identity()) == len(DEFAULT_PAIRS) >= 12
    assert sum("picochat" in ex["messages"][1]["content"] for ex in Identity()) >= len(DEFAULT_PAIRS) // 2
    path = write_jsonl(tmp_path / "me.jsonl", [
        [{"role": "user", "content": "Name?"}, {"role": "assistant", "content": "Zed."}],
        {"messages": [{"role": "user", "content": "Maker?"}, {"role": "assistant", "content": "Ann."}]},
        {"user": "Who?", "assistant": "Zed, made by Ann."},
    ])
    task = build_task("identity", path)
    assert [ex["messages"][1]["content"] for ex in task] == ["Zed.", "Ann.", "Zed, made by Ann."]
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"q": "x"}])
    with pytest.raises(PicochatError, match="record 0"):
        Identity(bad)


# ----------------------------------------------------------------------------- synthetic

def test_spelling():
    words = data("words", "words_alpha.txt")
    task = Spelling(words, size=200, seed=3)
    assert len(task) == 200
    assert all("\r" not in w for w in task.words[:1000])
    assert [task[i] for i in range(20)] == [Spelling(words, size=200, seed=3)[i] for i in range(20)]
    assert [task[i] for i in range(20)] != [Spelling(words, size=200, seed=4)[i] for i in range(20)]
    kinds = {ex["kind"] for ex in task}
    assert kinds == {"spell", "count"}
    for ex in list(task)[:50]:
        content = ex["messages"][1]["content"]
        if ex["kind"] == "spell":
            assert content == "-".join(ex["word"])
            assert task.reward(ex, content) == 1.0 and task.reward(ex, "x-y-z") == 0.0
        else:
            call = next(p for p in content if p["type"] == "python")
            assert call["text"] == f"'{ex['word']}'.count('{ex['letter']}')"
            assert calculate(call["text"]) == str(ex["answer"])
            text = "".join(p["text"] for p in content if p["type"] != "python")
            assert task.reward(ex, text) == 1.0
            assert task.reward(ex, f"The answer is {ex['answer'] + 1}.") == 0.0


def test_arithmetic():
    task = Arithmetic(size=300, seed=0, digits=3)
    assert [task[i] for i in range(10)] == [Arithmetic(size=300, seed=0, digits=3)[i] for i in range(10)]
    for ex in task:
        call, out, text = ex["messages"][1]["content"]
        assert call["type"] == "python" and out["type"] == "python_output"
        assert calculate(call["text"]) == out["text"] == str(ex["answer"])
        assert text["text"] == f"The answer is {ex['answer']}."
        assert task.reward(ex, text["text"]) == 1.0 and task.reward(ex, "The answer is 0.5.") == 0.0
    ops = {next(o for o in "+-*/" if o in ex["messages"][1]["content"][0]["text"][1:]) for ex in task}
    assert ops == set("+-*/")
    with pytest.raises(PicochatError):
        Arithmetic(digits=0)


# ----------------------------------------------------------------------------- reading errors

def test_read_errors(tmp_path):
    with pytest.raises(PicochatError, match="not found.*nope.jsonl"):
        GSM8K(tmp_path / "nope.jsonl")
    with pytest.raises(PicochatError, match=r"lacks the field\(s\) question, answer"):
        GSM8K(write_jsonl(tmp_path / "wrong.jsonl", [{"foo": 1}]))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "answer": "#### 1"}\n{oops\n')
    with pytest.raises(PicochatError, match="bad.jsonl:2: invalid JSON"):
        GSM8K(bad)
    gz = tmp_path / "x.jsonl.gz"
    gz.write_bytes(b"not gzip at all")
    with pytest.raises(PicochatError, match="cannot read"):
        read_records(gz)
    with gzip.open(tmp_path / "ok.jsonl.gz", "wt") as f:
        f.write('{"a": 1}\n')
    assert read_records(tmp_path / "ok.jsonl.gz", ("a",)) == [{"a": 1}]


# ----------------------------------------------------------------------------- mixtures

def test_parse_mixture(tmp_path):
    chat = write_jsonl(tmp_path / "a.jsonl", SMOLTALK[:2])
    gsm = write_jsonl(tmp_path / "b.jsonl", [{"question": "q", "answer": "#### 1"}])
    assert parse_mixture(f"{chat}:1.0,{gsm}:0.5") == [("chat", str(chat), 1.0), ("gsm8k", str(gsm), 0.5)]
    assert parse_mixture(f"gsm8k:{gsm}:2") == [("gsm8k", str(gsm), 2.0)]
    assert parse_mixture("arithmetic::1, arithmetic:3, arithmetic") == [("arithmetic", None, 1.0),
                                                                      ("arithmetic", None, 3.0),
                                                                      ("arithmetic", None, 1.0)]
    assert parse_mixture(f"spelling:{chat}:0.5") == [("spelling", str(chat), 0.5)]
    for spec, needle in [("nosuch::1", "unknown task 'nosuch'"),
                         ("nosuch.jsonl:1", "neither a task"),
                         (f"gsm8k:{tmp_path}/missing.jsonl:1", "path not found"),
                         ("arithmetic::-1", "weight '-1'"),
                         ("arithmetic::abc", "weight 'abc'"),
                         ("gsm8k::1", "needs a path"),
                         ("arithmetic::1,,", "empty item")]:
        with pytest.raises(PicochatError, match=needle):
            parse_mixture(spec)
    with pytest.raises(PicochatError, match="mixture item 'nosuch::1'"):
        parse_mixture("nosuch::1")


def test_mixture_counts_and_determinism(tmp_path):
    chat = Chat(write_jsonl(tmp_path / "a.jsonl", SMOLTALK[:2] * 5))  # 10 conversations
    arith = Arithmetic(size=20)
    mix = Mixture([(chat, 2.0), (arith, 0.5)], seed=1)
    assert len(mix) == 2 * 10 + 10
    counts = {0: 0, 1: 0}
    seen_arith = set()
    for k, i in mix.index:
        counts[k] += 1
        if k == 1:
            seen_arith.add(i)
    assert counts == {0: 20, 1: 10} and len(seen_arith) == 10  # the half is without replacement
    assert sorted(i for k, i in mix.index if k == 0) == sorted(list(range(10)) * 2)
    same = Mixture([(chat, 2.0), (arith, 0.5)], seed=1)
    other = Mixture([(chat, 2.0), (arith, 0.5)], seed=2)
    assert same.index == mix.index and other.index != mix.index
    ex = next(mix[i] for i in range(len(mix)) if mix.index[i][0] == 1)
    assert mix.reward(ex, f"The answer is {ex['answer']}") == 1.0

    spec = f"{tmp_path / 'a.jsonl'}:2,arithmetic::0.01,spelling:{data('words', 'words_alpha.txt')}:0.001"
    m1, m2 = build_mixture(spec, seed=5), build_mixture(spec, seed=5)
    assert len(m1) == 20 + 100 + 10
    assert [m1[i] for i in range(len(m1))] == [m2[i] for i in range(len(m2))]


# ----------------------------------------------------------------------------- Python docs, plain text

def test_pydocs_questions_come_from_the_stdlib_docstrings():
    import inspect
    import json as json_module

    from picochat.tasks.pydocs import PyDocs, build_pairs, held_out, overlap_f1, sample_questions
    pairs = dict(build_pairs())
    # answers are the first paragraph of the docstring, read from the source (never imported)
    assert pairs["What does json.dumps() do?"].startswith("Serialize ``obj`` to a JSON formatted ``str``")
    assert json_module.dumps.__doc__.strip().startswith("Serialize ``obj`` to a JSON formatted ``str``")
    names = [("**" if p.kind == p.VAR_KEYWORD else "") + p.name
             for p in inspect.signature(json_module.dumps).parameters.values()]
    assert pairs["What are the parameters of json.dumps?"] == f"json.dumps takes {', '.join(names[:-1])} and {names[-1]}."
    assert pairs["Which module provides urlopen?"] == "urlopen is in the urllib.request module."
    assert not any(q.startswith("What does _") or "._" in q.split()[2] for q in pairs)  # private names left out
    train, test = PyDocs("train"), PyDocs("test")
    assert len(train) + len(test) == len(pairs) > 2000 and 0.05 < len(test) / len(pairs) < 0.15
    train_q = {ex["messages"][0]["content"] for ex in train}
    test_q = {ex["messages"][0]["content"] for ex in test}
    assert not train_q & test_q and all(held_out(q) for q in test_q)  # the held-out tenth is disjoint
    assert [ex["messages"][0]["content"] for ex in PyDocs("test")] == [ex["messages"][0]["content"] for ex in test]
    assert {q for q, _ in sample_questions()} <= test_q and len(sample_questions()) == 4
    # the grader: word-overlap F1 with the reference, passing at 0.5
    assert overlap_f1("Return a set of all tasks for the loop.", "Return a set of all tasks for the loop.") == 1.0
    assert overlap_f1("a set of tasks", "Return a set of all tasks for the loop.") == pytest.approx(8 / 13)  # P 4/4, R 4/9
    ex = test[0]
    assert test.reward(ex, ex["answer"]) == 1.0 and test.reward(ex, "no idea") == 0.0


def test_text_rows_train_on_every_token(tok, tmp_path):
    from picochat.conversation import render_example
    from picochat.tasks.text import Text
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": f"document number {i}"}) + "\n" for i in range(30)))
    task = Text(tmp_path, limit=12)
    assert len(task) == 12 and task[3] == {"text": "document number 3"}
    ids, mask = render_example(tok, task[3])
    assert ids[0] == tok.bos_id and ids[1:] == tok.encode("document number 3") and mask == [0] + [1] * (len(ids) - 1)
    ids, mask = render_example(tok, task[3], max_tokens=4)
    assert len(ids) == 4 and len(mask) == 4
    with pytest.raises(PicochatError, match="limit"):
        Text(tmp_path, limit=0)
    mix = build_mixture(f"text:{tmp_path}:1,identity::1")
    assert sum("text" in mix[i] for i in range(len(mix))) == 30  # a mixture reads up to DEFAULT_LIMIT documents


# ----------------------------------------------------------------------------- every task renders

def test_every_task_renders(tok, tmp_path):
    d = DATA
    tasks = [
        Chat(data("chat", "fastchat", "dummy_conversation.json")),
        Chat(write_jsonl(tmp_path / "smol.jsonl", SMOLTALK[:2])),
        GSM8K(data("gsm8k"), split="train"),
        ARC(data("arc"), split="train"),
        MMLU(data("mmlu", "hf_arrow_mmlu_no_train"), "validation"),
        HumanEval(data("humaneval")),
        Identity(),
        Spelling(d / "words" / "words_alpha.txt", size=100),
        Arithmetic(size=100),
    ]
    for task in tasks:
        for i in range(min(50, len(task))):
            ids, mask = render_conversation(tok, task[i])
            assert len(ids) == len(mask) and sum(mask) > 0, (task.name, i)


# ----------------------------------------------------------------------------- the whole datasets

def test_whole_datasets_read_in_full():
    """Row counts of the full sets and the calculator over 2,000 GSM8K solutions: a larger check,
    on ../shared/data (skipped where it is not)."""
    full = shared_data()
    assert len(GSM8K(full / "gsm8k", split="train")) == 7473 and len(GSM8K(full / "gsm8k", split="test")) == 1319
    ok, total = calculator_agreement(GSM8K(full / "gsm8k" / "train.jsonl"), 2000)
    assert total > 5000 and ok / total > 0.99, (ok, total)
    easy = ARC(full / "arc" / "ARC-Easy-train.jsonl")
    assert len(easy) == 2251 and easy[753]["letters"] == list("ABCDE") and easy[289]["letters"] == list("ABC")
    assert len(build_task("arc-challenge", full / "arc", split="test")) == 1172
    assert len(build_task("arc", full / "arc", split="validation")) == 570 + 299
    root = full / "mmlu" / "hf_arrow_mmlu_no_train"
    assert len(MMLU(root, "test")) == 14042 and len(MMLU(root, "dev")) == 285
    assert [len(MMLU(root, s, subject="anatomy")) for s in ("dev", "validation", "test")] == [5, 14, 135]
    assert len(MMLU(full / "mmlu" / "csv_haechan", "test", subject="anatomy")) == 135
    assert len(HumanEval(full / "humaneval")) == 164
    assert len(Chat(full / "chat" / "fastchat" / "dummy_conversation.json")) == 500
