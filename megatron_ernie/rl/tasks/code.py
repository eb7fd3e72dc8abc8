"""Tiny programs checked by running them: "read a and b, print their sum".

The response must be a Python program (optionally in a ```python fence); the
reward runs it in the sandbox on a few generated inputs and compares stdout
(verifiers.verify_code). Four kinds of prompt, each with one short correct
program, so a tiny model can learn them on a CPU; the inputs change with every
example, so printing a memorised number never passes.

options: kinds (default all of "sum", "difference", "product", "max");
         tests (1..10, default 3): test inputs per example;
         digits (1..6, default 2): size of the input numbers.
"""

from __future__ import annotations

import json
import random

from megatron_ernie.config.errors import ConfigError
from megatron_ernie.rl.reward.verifiers import verify_code
from megatron_ernie.rl.tasks.registry import Demo, TaskExample, register_task

KINDS = {"sum": lambda a, b: a + b, "difference": lambda a, b: a - b,
         "product": lambda a, b: a * b, "max": max}
DEFAULTS = {"kinds": tuple(KINDS), "tests": 3, "digits": 2}
PROMPT = ("Write a Python program that reads two integers a and b from one line of standard input "
          "and prints their {kind}{note}.\n")
NOTES = {"difference": " (a - b)"}
# The reference program of each kind (the SFT demonstration); only characters of the prompts' text.
PROGRAMS = {"sum": "a + b", "difference": "a - b", "product": "a * b", "max": "max(a, b)"}
PROGRAM = "a, b = map(int, input().split())\nprint({expression})\n"


def check_options(options: dict) -> dict:
    unknown = set(options) - set(DEFAULTS)
    if unknown:
        raise ConfigError("rl.tasks.options", sorted(unknown), f"code accepts only {sorted(DEFAULTS)}")
    merged = {**DEFAULTS, **options}
    if not merged["kinds"] or set(merged["kinds"]) - set(KINDS):
        raise ConfigError("rl.tasks.options.kinds", merged["kinds"], f"use a non-empty subset of {list(KINDS)}")
    for name, high in (("tests", 10), ("digits", 6)):
        if not isinstance(merged[name], int) or not 1 <= merged[name] <= high:
            raise ConfigError(f"rl.tasks.options.{name}", merged[name], f"use an integer from 1 to {high}")
    return merged


def _draw(seed: int, index: int, opts: dict) -> tuple[str, list[dict]]:
    """The example's kind and test cases (deterministic in seed and index)."""
    rng = random.Random(f"code:{seed}:{index}")
    kind = rng.choice(sorted(opts["kinds"]))
    high = 10 ** opts["digits"] - 1
    tests = []
    for _ in range(opts["tests"]):
        a, b = rng.randint(-high, high), rng.randint(-high, high)
        tests.append({"stdin": f"{a} {b}\n", "stdout": str(KINDS[kind](a, b))})
    return kind, tests


def make_example(seed: int, index: int, options: dict) -> TaskExample:
    kind, tests = _draw(seed, index, check_options(options))
    prompt = PROMPT.format(kind=kind, note=NOTES.get(kind, ""))
    return TaskExample(prompt=prompt, reference=json.dumps({"tests": tests}))


def demo(seed: int, index: int, options: dict, wrong: bool = False) -> Demo:
    """The kind's reference program; a wrong demo prints the result plus 1 (fails every test)."""
    kind, _ = _draw(seed, index, check_options(options))
    expression = f"{PROGRAMS[kind]} + 1" if wrong else PROGRAMS[kind]
    return Demo.answer(PROGRAM.format(expression=expression))


def reward(response: str, reference: str, sandbox=None):
    """All test inputs must produce the expected output in the sandbox."""
    return verify_code(response, reference, sandbox)


register_task("code", make_example, reward, description=__doc__.splitlines()[0], demo=demo,
              deterministic=True)
