"""The calculator tool: a safe evaluator for the expressions a model writes between
<|python_start|> and <|python_end|>.

The text is parsed with `ast` and the tree is walked by hand against a whitelist: numbers,
strings, + - * / // % ** and unary +/-, a few string methods and len(). Nothing is ever
eval'd, exec'd or compiled, so there are no names, attributes or builtins to reach through.

Every cost is bounded before it is paid: the input length, the nesting depth, the number of
nodes evaluated (a time budget that works in any thread, unlike signals), the size of every
integer and string (checked from bit lengths and counts *before* multiplying, raising to a power
or replacing), and the output length. calculate() never raises: every failure, a model's typo or
a hostile input, comes back as a string starting with "error: ", which the engine feeds back to
the model as the tool's output.
"""

from __future__ import annotations

import ast
import math
import operator
import time

MAX_INPUT_CHARS = 500
MAX_OUTPUT_CHARS = 200
MAX_DEPTH = 100  # nested operations; ast.parse itself refuses ~200 nested parentheses
MAX_STEPS = 2_000  # nodes evaluated (a 500-char input has far fewer)
MAX_SECONDS = 0.1  # wall-clock budget, checked at every node
MAX_INT_BITS = 3_400  # ~1000 decimal digits, for any intermediate integer
MAX_STR_CHARS = 1_000  # any intermediate string

_LOG2_10 = math.log2(10)


class CalcError(Exception):
    """A refused or failed evaluation; its message becomes the tool output."""


# str methods that are pure, cheap and return a str/int/bool; name -> allowed argument counts
_STR_METHODS = {
    "count": (1,), "upper": (0,), "lower": (0,), "strip": (0, 1), "replace": (2,),
    "startswith": (1,), "endswith": (1,), "find": (1,), "index": (1,),
}

_BINOPS = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
}


def _is_num(x) -> bool:
    return isinstance(x, (int, float))  # bool is an int: True + 1 is harmless


def _check_int(x):
    if isinstance(x, int) and x.bit_length() > MAX_INT_BITS:
        raise CalcError("number too large (over ~1000 digits)")
    return x


class _Evaluator:
    def __init__(self):
        self.steps = 0
        self.deadline = time.perf_counter() + MAX_SECONDS

    def eval(self, node: ast.AST, depth: int = 0):
        self.steps += 1
        if self.steps > MAX_STEPS or time.perf_counter() > self.deadline:
            raise CalcError("expression too costly to evaluate")
        if depth > MAX_DEPTH:
            raise CalcError("expression nested too deeply")
        if isinstance(node, ast.Expression):
            return self.eval(node.body, depth + 1)
        if isinstance(node, ast.Constant):
            v = node.value
            if isinstance(v, bool) or not isinstance(v, (int, float, str)):
                raise CalcError(f"constant {v!r} is not allowed (only numbers and strings)")
            return _check_int(v)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
            v = self.eval(node.operand, depth + 1)
            if not _is_num(v):
                raise CalcError("unary +/- needs a number")
            return +v if isinstance(node.op, ast.UAdd) else -v
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            return self.binop(node.op, self.eval(node.left, depth + 1), self.eval(node.right, depth + 1))
        if isinstance(node, ast.Call):
            return self.call(node, depth)
        raise CalcError(f"{type(node).__name__} is not allowed (only arithmetic and string methods)")

    def binop(self, op: ast.operator, a, b):
        if isinstance(a, str) or isinstance(b, str):
            # Only str + str: str * int is repetition (a memory bomb) and str % x is formatting.
            if isinstance(op, ast.Add) and isinstance(a, str) and isinstance(b, str):
                if len(a) + len(b) > MAX_STR_CHARS:
                    raise CalcError("string too long")
                return a + b
            raise CalcError("only + is allowed between strings")
        if (isinstance(op, ast.Mult) and isinstance(a, int) and isinstance(b, int)
                and a.bit_length() + b.bit_length() > MAX_INT_BITS + 1):
            raise CalcError("number too large (over ~1000 digits)")
        if isinstance(op, ast.Pow):
            self.check_pow(a, b)
        result = _BINOPS[type(op)](a, b)
        if isinstance(result, complex):  # e.g. (-8) ** 0.5
            raise CalcError("result is a complex number")
        return _check_int(result)

    @staticmethod
    def check_pow(a, b) -> None:
        """Refuse a power whose result would be huge, before computing it."""
        if isinstance(a, int) and isinstance(b, int):
            if abs(a) <= 1 or b <= 0:
                if b < -MAX_INT_BITS:  # 2 ** -10**50 would still loop over the exponent's bits
                    raise CalcError("exponent too large")
                return
            if b * math.log2(abs(a)) > MAX_INT_BITS:
                raise CalcError(f"result of ** would have over {int(MAX_INT_BITS / _LOG2_10)} digits")
        # floats: overflow raises OverflowError, caught by calculate(); an int exponent too big for
        # a float raises the same.

    def call(self, node: ast.Call, depth: int):
        if node.keywords:
            raise CalcError("keyword arguments are not allowed")
        if any(isinstance(a, ast.Starred) for a in node.args):
            raise CalcError("* arguments are not allowed")
        func = node.func
        if isinstance(func, ast.Name) and func.id == "len":
            if len(node.args) != 1:
                raise CalcError("len() takes one string")
            v = self.eval(node.args[0], depth + 1)
            if not isinstance(v, str):
                raise CalcError("len() takes a string")
            return len(v)
        if not isinstance(func, ast.Attribute) or func.attr not in _STR_METHODS:
            what = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", type(func).__name__)
            raise CalcError(f"calling {what!r} is not allowed (only len() and the string methods "
                            f"{', '.join(_STR_METHODS)})")
        name = func.attr
        if len(node.args) not in _STR_METHODS[name]:
            raise CalcError(f".{name}() takes {' or '.join(map(str, _STR_METHODS[name]))} argument(s)")
        obj = self.eval(func.value, depth + 1)
        if not isinstance(obj, str):
            raise CalcError(f".{name}() is only allowed on strings")
        args = [self.eval(a, depth + 1) for a in node.args]
        if not all(isinstance(a, str) for a in args):
            raise CalcError(f".{name}() takes string arguments")
        if name == "replace":
            old, new = args
            # Bound the result before building it: replace("", x) inserts x at every position.
            grows = (obj.count(old) if old else len(obj) + 1) * (len(new) - len(old))
            if len(obj) + grows > MAX_STR_CHARS:
                raise CalcError("string too long")
        try:
            return getattr(obj, name)(*args)  # name is from the whitelist, obj is a str
        except ValueError:  # .index() of a missing substring
            raise CalcError(f"substring not found by .{name}()") from None


def format_result(value) -> str:
    """Ints exactly, floats to 10 significant digits (4.0 -> "4"), strings as they are."""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise CalcError("result is not a finite number")
        if value.is_integer() and abs(value) < 1e15:
            return str(int(value))
        return f"{value:.10g}"
    return str(value)


def calculate(expr: str) -> str:
    """Evaluate a calculator expression; always returns a str, "error: ..." on any failure."""
    try:
        if not isinstance(expr, str):
            return "error: the expression must be a string"
        if len(expr) > MAX_INPUT_CHARS:
            return f"error: expression too long ({len(expr)} chars, max {MAX_INPUT_CHARS})"
        if not expr.strip():
            return "error: empty expression"
        try:
            tree = ast.parse(expr.strip(), mode="eval")
        except SyntaxError as e:
            return f"error: invalid syntax ({e.msg})"
        out = format_result(_Evaluator().eval(tree))
        if len(out) > MAX_OUTPUT_CHARS:
            return f"error: result too long ({len(out)} chars, max {MAX_OUTPUT_CHARS})"
        return out
    except CalcError as e:
        return f"error: {e}"
    except ZeroDivisionError:
        return "error: division by zero"
    except OverflowError:
        return "error: number too large"
    except RecursionError:
        return "error: expression nested too deeply"
    except Exception as e:  # noqa: BLE001 -- never raise: MemoryError, ValueError from the parser (null bytes), anything else
        return f"error: {type(e).__name__}"
