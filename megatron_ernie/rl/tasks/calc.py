"""Arithmetic with the calculator tool (the agent task): "37*48+12=" -> a tool call, its result, the answer.

Three operands of two digits mixing + - * are past what a tiny model computes
in its head, but a short tool call solves them: the task for multi-turn
tool-use episodes (rl.system.agent_max_turns > 1, rl/rollout/agent_loop.py).
The reward is the exact final number of the whole response, so answering
without the tool also counts when it is right.

Its demonstration is a scripted episode in the agent loop's format
(rl/agent/tools.py): the model writes ``<tool>calc\\n37*48+12</tool>``, the
environment replies ``<result>1788</result>`` (masked in SFT: the policy must
not learn to predict tool output) and the model writes ``1788``.

options: digits (1..3, default 2), operands (2..4, default 3), ops (default "+-*").
"""

from __future__ import annotations

import random

from megatron_ernie.config.errors import ConfigError
from megatron_ernie.rl.agent.tools import STOP_STRING, calculator
from megatron_ernie.rl.reward.verifiers import verify_math
from megatron_ernie.rl.tasks.registry import Demo, TaskExample, register_task

DEFAULTS = {"digits": 2, "operands": 3, "ops": "+-*"}


def check_options(options: dict) -> dict:
    unknown = set(options) - set(DEFAULTS)
    if unknown:
        raise ConfigError("rl.tasks.options", sorted(unknown), f"calc accepts only {sorted(DEFAULTS)}")
    merged = {**DEFAULTS, **options}
    for name, low, high in (("digits", 1, 3), ("operands", 2, 4)):
        if not isinstance(merged[name], int) or not low <= merged[name] <= high:
            raise ConfigError(f"rl.tasks.options.{name}", merged[name], f"use an integer from {low} to {high}")
    if not merged["ops"] or set(merged["ops"]) - set("+-*"):
        raise ConfigError("rl.tasks.options.ops", merged["ops"], "use a non-empty string of '+', '-', '*'")
    return merged


def _expression(seed: int, index: int, opts: dict) -> str:
    rng = random.Random(f"calc:{seed}:{index}")
    high = 10 ** opts["digits"] - 1
    ops = sorted(set(opts["ops"]))
    parts = [str(rng.randint(0, high))]
    for _ in range(opts["operands"] - 1):
        parts += [rng.choice(ops), str(rng.randint(0, high))]
    return "".join(parts)


def make_example(seed: int, index: int, options: dict) -> TaskExample:
    expression = _expression(seed, index, check_options(options))
    return TaskExample(prompt=f"{expression}=", reference=calculator(expression))


def demo(seed: int, index: int, options: dict, wrong: bool = False) -> Demo:
    """Call the calculator, read its result, answer with it (wrong: the answer is off by 1..9)."""
    expression = _expression(seed, index, check_options(options))
    value = int(calculator(expression))
    if wrong:
        rng = random.Random(f"calc-wrong:{seed}:{index}")
        value += rng.choice((-1, 1)) * rng.randint(1, 9)
    return Demo((("model", f"<tool>calc\n{expression}{STOP_STRING}"),
                 ("env", f"<result>{calculator(expression)}</result>"),
                 ("model", str(value))))


def reward(response: str, reference: str, sandbox=None):
    """Exact match of the response's final number."""
    return verify_math(response, reference)


register_task("calc", make_example, reward, description=__doc__.splitlines()[0], demo=demo,
              deterministic=True, inline=True)
