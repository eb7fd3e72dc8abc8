"""Tool calls in model text, and a calculator tool.

Format: the model writes
    <tool>calc
    12 * (3 + 4)</tool>
i.e. the tool name on the first line after <tool>, the argument up to </tool>.
Rollout stops generation at "</tool>" (a stop string), the agent loop calls
the tool and appends its reply as an environment turn:
    <result>84</result>
Tools take a string and return a string; errors are replies too ("error: ..."),
because the model should learn from a failed call rather than crash the episode.
"""

from __future__ import annotations

import ast
import operator
import re
from dataclasses import dataclass
from typing import Callable

STOP_STRING = "</tool>"
_CALL = re.compile(r"<tool>[ \t]*([A-Za-z_][\w-]*)[ \t]*\n(.*?)</tool>", re.DOTALL)
MAX_EXPRESSION_CHARS = 200
MAX_RESULT_BITS = 4096  # refuse 9**9**9-style work before doing it

_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}


@dataclass(frozen=True)
class ToolCall:
    name: str
    argument: str


def parse_tool_call(text: str) -> ToolCall | None:
    """The last complete tool call in a model turn, or None if it contains none."""
    calls = _CALL.findall(text)
    if not calls:
        return None
    name, argument = calls[-1]
    return ToolCall(name, argument.strip())


def _pow(base, exponent):
    if isinstance(exponent, int) and isinstance(base, int):
        if abs(exponent) * max(abs(base).bit_length(), 1) > MAX_RESULT_BITS:
            raise ValueError("result too large")
    return operator.pow(base, exponent)


def _evaluate(node):
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_evaluate(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _evaluate(node.left), _evaluate(node.right)
        result = _pow(left, right) if isinstance(node.op, ast.Pow) else _BINARY[type(node.op)](left, right)
        if isinstance(result, int) and result.bit_length() > MAX_RESULT_BITS:
            raise ValueError("result too large")
        return result
    raise ValueError(f"unsupported expression {ast.dump(node)[:40]}")


def calculator(expression: str) -> str:
    """Evaluate + - * / // % ** and parentheses on numbers, without eval(); errors as 'error: ...'."""
    if len(expression) > MAX_EXPRESSION_CHARS:
        return f"error: expression longer than {MAX_EXPRESSION_CHARS} characters"
    try:
        value = _evaluate(ast.parse(expression.strip(), mode="eval").body)
    except (SyntaxError, ValueError, ZeroDivisionError, OverflowError, TypeError) as exc:
        return f"error: {exc}"
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        value = int(value)
    return str(value)


TOOLS: dict[str, Callable[[str], str]] = {"calc": calculator}


def run_tool(call: ToolCall, tools: dict[str, Callable[[str], str]] | None = None) -> str:
    """The environment's reply to a call, wrapped as <result>...</result>."""
    tools = TOOLS if tools is None else tools
    tool = tools.get(call.name)
    if tool is None:
        return f"<result>error: unknown tool {call.name!r}; available: {sorted(tools)}</result>"
    try:
        reply = tool(call.argument)
    except Exception as exc:  # noqa: BLE001 - a tool failure is an observation for the model, not a crash
        reply = f"error: {type(exc).__name__}: {exc}"
    return f"<result>{reply}</result>"
