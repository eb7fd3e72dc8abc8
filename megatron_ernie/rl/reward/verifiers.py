"""Verifiers: turn a response and a task's reference into a reward with a reason.

Two kinds of verifiable reward (RL with verifiable rewards, "RLVR", Lambert et
al., Tulu 3, arXiv:2411.15124):
- exact answers: the final number of the response equals the reference;
- code execution: the program in the response, run in the sandbox on each
  test input, prints the expected output.

Final-answer format (what `extract_final_answer` accepts, in this order):
  1. the text after the last "Answer:" (any case), e.g. "... so Answer: 42";
  2. the content of the last \\boxed{...}, e.g. "\\boxed{-7}";
  3. otherwise the last number anywhere in the response, e.g. "12+7=19".
Numbers compare exactly as fractions after normalisation: " 42.0" == "42",
"1,000" == "1000", "+3" == "3", "0.5" == "1/2"; never as floats with a tolerance.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from fractions import Fraction

from megatron_ernie.config.rl import SandboxConfig
from megatron_ernie.rl.reward.sandbox import run_python

_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?")
_ANSWER = re.compile(r"answer\s*[:=]\s*(.*)", re.IGNORECASE)
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
_FENCE = re.compile(r"```[ \t]*(?:python|py)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)


@dataclass(frozen=True)
class Verdict:
    """reward, status (one of protocol.REWARD_STATUSES) and a one-line detail."""

    reward: float
    status: str
    detail: str = ""


@functools.lru_cache(maxsize=8192)
def parse_number(text: str) -> Fraction | None:
    """Exact value of a number written as an integer, decimal or fraction; None if it is not one.

    Cached (Fractions are immutable): answers and references repeat across a run's samples, and
    building Fractions was most of the time of scoring arithmetic where samples arrive (issue 14)."""
    cleaned = text.strip().strip("$").strip().rstrip(".")
    if not _NUMBER.fullmatch(cleaned):
        return None
    try:
        return Fraction(cleaned.replace(",", ""))
    except (ValueError, ZeroDivisionError):
        return None


@functools.lru_cache(maxsize=8192)
def normalize_number(text: str) -> str | None:
    """Canonical text of a number: "42.0" -> "42", "+3" -> "3", "3.50" -> "3.5", "6/8" -> "0.75", "2/6" -> "1/3".

    Integers as integers, terminating fractions as decimals, others as p/q in lowest terms.
    """
    value = parse_number(text)
    if value is None:
        return None
    if value.denominator == 1:
        return str(value.numerator)
    decimal = f"{float(value):.12f}".rstrip("0")
    return decimal if Fraction(decimal) == value else f"{value.numerator}/{value.denominator}"


def extract_final_answer(response: str) -> str | None:
    """The response's final answer as text (see the module docstring for the format), or None."""
    answers = _ANSWER.findall(response)
    if answers:
        numbers = _NUMBER.findall(answers[-1])
        return numbers[0] if numbers else None
    boxed = _BOXED.findall(response)
    if boxed:
        return boxed[-1].strip()
    numbers = _NUMBER.findall(response)
    return numbers[-1] if numbers else None


def verify_math(response: str, reference: str) -> Verdict:
    """1.0 if the final answer equals the reference number exactly, else 0.0 ("wrong" / "no_answer")."""
    expected = parse_number(reference)
    if expected is None:
        raise ValueError(f"reference {reference!r} is not a number: fix the task's generator")
    answer = extract_final_answer(response)
    got = parse_number(answer) if answer is not None else None
    if got is None:
        return Verdict(0.0, "no_answer", f"no final answer found in {response[-80:]!r}")
    if got == expected:
        return Verdict(1.0, "ok", f"answer {normalize_number(answer)}")
    return Verdict(0.0, "wrong", f"expected {normalize_number(reference)}, got {normalize_number(answer)}")


def extract_code(response: str) -> str:
    """The program in a response: the last ```python fenced block, else the whole response."""
    blocks = _FENCE.findall(response)
    return blocks[-1] if blocks else response


def _normalize_output(text: str) -> str:
    """Ignore trailing spaces on lines and trailing blank lines, nothing else."""
    return "\n".join(line.rstrip() for line in text.strip("\n").splitlines()).rstrip()


def parse_tests(reference: str) -> list[dict]:
    """Reference of a code task: JSON {"tests": [{"stdin": "...", "stdout": "..."}, ...]}."""
    try:
        tests = json.loads(reference)["tests"]
        well_formed = bool(tests) and all(isinstance(t.get("stdin", ""), str) and isinstance(t["stdout"], str)
                                          for t in tests)
    except (ValueError, KeyError, TypeError, AttributeError):
        well_formed = False
    if not well_formed:
        raise ValueError(f'code reference must be JSON {{"tests": [{{"stdin": ..., "stdout": ...}}]}}, '
                         f"got {reference[:120]!r}")
    return tests


def verify_code(response: str, reference: str, sandbox: SandboxConfig | None = None) -> Verdict:
    """1.0 if the program passes every test case in the sandbox; else 0.0 with the first failure.

    Tests run in order and stop at the first failure (saves sandbox time; the
    reward is all-or-nothing, as in DeepSeek-R1's code rewards).
    """
    tests = parse_tests(reference)
    code = extract_code(response)
    if not code.strip():
        return Verdict(0.0, "no_answer", "empty program")
    for i, test in enumerate(tests):
        result = run_python(code, stdin=test.get("stdin", ""), config=sandbox)
        if not result.ok:
            return Verdict(0.0, result.status, f"test {i}: {result.detail}")
        got, expected = _normalize_output(result.stdout), _normalize_output(test["stdout"])
        if got != expected:
            return Verdict(0.0, "wrong", f"test {i}: expected {expected[:60]!r}, got {got[:60]!r}")
    return Verdict(1.0, "ok", f"passed {len(tests)} tests")
