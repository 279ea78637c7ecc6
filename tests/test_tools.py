"""The calculator: right answers, and hostile inputs that come back as quick error strings."""

import os
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from picochat.tools import calculate


@pytest.mark.parametrize("expr, want", [
    ("1+2*3", "7"),
    ("(1+2)*3", "9"),
    ("4821*377", "1817517"),
    ("7/2", "3.5"),
    ("8/2", "4"),
    ("4.0", "4"),
    ("7//2", "3"),
    ("-7 % 3", "2"),
    ("2**10", "1024"),
    ("2**-2", "0.25"),
    ("-(3-5)", "2"),
    ("+5", "5"),
    ("0.1+0.2", "0.3"),
    ("1/3", "0.3333333333"),
    ("12/60", "0.2"),
    ("2*20*.01", "0.4"),
    ("1e20", "1e+20"),
    ("2**100", "1267650600228229401496703205376"),
    ('"strawberry".count("r")', "3"),
    ("'strawberry'.count('r')", "3"),
    ("'Hello'.upper()", "HELLO"),
    ("'Hello'.lower()", "hello"),
    ("'  x '.strip()", "x"),
    ("'banana'.replace('a', 'o')", "bonono"),
    ("'banana'.startswith('ba')", "True"),
    ("'banana'.endswith('x')", "False"),
    ("'banana'.find('n')", "2"),
    ("'banana'.index('na')", "2"),
    ("len('banana')", "6"),
    ("len('ab' + 'cd') * 2", "8"),
    ("  3 + 4  ", "7"),
    ("(" * 150 + "1" + ")" * 150, "1"),  # parentheses make no nodes: deep but harmless
])
def test_results(expr, want):
    assert calculate(expr) == want


HOSTILE = [
    "__import__('os').system('touch {marker}')",
    "().__class__.__bases__[0].__subclasses__()",
    "''.__class__.__mro__[1].__subclasses__()",
    "open('{marker}', 'w').write('x')",
    "open('/etc/passwd').read()",
    "(lambda: 1)()",
    "[x for x in range(10)]",
    "{{x for x in 'ab'}}",
    "(x for x in 'ab')",
    "9**9**9",
    "10**100000",
    "2**64**64",
    "(-2)**100000",
    "7**7**7**7",
    "99999999999**999",
    "'a'*10**9",
    "10**9*'a'",
    "'%s' % 5",
    "'ab'.replace('', 'xyzxyz').replace('', 'xyzxyz').replace('', 'xyzxyz').replace('', 'xyzxyz')",
    "(" * 1000 + "1" + ")" * 1000,
    "-" * 400 + "1",
    "+".join(["1"] * 300),
    "1" * 600,
    "(1).real",
    "(1).__class__",
    "1 .bit_length()",
    "x",
    "True",
    "None",
    "f'{{1+1}}'",
    "(y := 5)",
    "exec('import os')",
    "eval('1+1')",
    "compile('1', 'x', 'eval')",
    "b'abc'",
    "1j * 2",
    "'abc'[0]",
    "[1, 2, 3]",
    "{{'a': 1}}",
    "'abc'.format()",
    "'abc'.join(['x'])",
    "'a'.count(x='a')",
    "len([1, 2])",
    "len('a', 'b')",
    "getattr('', 'upper')()",
    "1; import os",
    "import os",
    "1 if 1 else 2",
    "1 < 2",
    "not 1",
    "~1",
    "1 << 100000",
    "1/0",
    "1 // 0",
    "1 % 0",
    "0 ** -1",
    "10**400 / 3",
    "1e308 * 10",
    "(-8) ** 0.5",
    "2.5 ** 100000",
    "'a'.index('b')",
    "'abc'.upper",
    "",
    "   ",
    "1 +",
    "\x00",
    "'\ud800'",
]


def test_hostile_inputs_return_errors_quickly(tmp_path):
    marker = tmp_path / "pwned"
    before = sorted(os.listdir(tmp_path))
    for template in HOSTILE:
        expr = template.replace("{marker}", str(marker)).replace("{{", "{").replace("}}", "}")
        t0 = time.perf_counter()
        out = calculate(expr)
        dt = time.perf_counter() - t0
        assert isinstance(out, str) and out.startswith("error: "), (expr[:60], out)
        assert dt < 0.5, (expr[:60], dt)
    assert not marker.exists() and sorted(os.listdir(tmp_path)) == before
    assert calculate("1+1") == "2"  # still working afterwards


def test_outputs_are_bounded():
    assert calculate("2**1000").startswith("error: result too long")  # 302 digits > 200 chars
    assert calculate("'abcdefghijklmnopqrst'.replace('', 'abcdefghij')").startswith("error: result too long")
    assert calculate("'abc' * 2").startswith("error: ")
    assert calculate(123).startswith("error: ")  # not even a string


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=80))
def test_fuzz_never_raises(text):
    out = calculate(text)
    assert isinstance(out, str)


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet="0123456789+-*/%().e '\"abcr", max_size=40))
def test_fuzz_arithmetic_alphabet(text):
    t0 = time.perf_counter()
    assert isinstance(calculate(text), str)
    assert time.perf_counter() - t0 < 0.5
