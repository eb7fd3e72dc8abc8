"""Small-number arithmetic with exact answers: "12+7=" -> "19".

Small enough that a tiny model learns it on a CPU in minutes, and verifiable
exactly, so reward curves are noise-free: the first task to run when checking
that the RL loop learns at all.

options: digits (1..6, default 2): operands have at most this many digits;
         ops (default "+-"): any of "+", "-", "*";
         negative (default False): allow a - b < 0 (else operands are ordered).
"""

from __future__ import annotations

import random

from megatron_ernie.config.errors import ConfigError
from megatron_ernie.rl.reward.verifiers import verify_math
from megatron_ernie.rl.tasks.registry import Demo, TaskExample, register_task

DEFAULTS = {"digits": 2, "ops": "+-", "negative": False}
_APPLY = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def check_options(options: dict) -> dict:
    """Options merged over DEFAULTS; ConfigError for unknown keys or bad values."""
    unknown = set(options) - set(DEFAULTS)
    if unknown:
        raise ConfigError("rl.tasks.options", sorted(unknown), f"arithmetic accepts only {sorted(DEFAULTS)}")
    merged = {**DEFAULTS, **options}
    if not isinstance(merged["digits"], int) or not 1 <= merged["digits"] <= 6:
        raise ConfigError("rl.tasks.options.digits", merged["digits"], "use an integer from 1 to 6")
    if not merged["ops"] or set(merged["ops"]) - set(_APPLY):
        raise ConfigError("rl.tasks.options.ops", merged["ops"], "use a non-empty string of '+', '-', '*'")
    return merged


def make_example(seed: int, index: int, options: dict) -> TaskExample:
    opts = check_options(options)
    rng = random.Random(f"arithmetic:{seed}:{index}")
    high = 10 ** opts["digits"] - 1
    a, b = rng.randint(0, high), rng.randint(0, high)
    op = rng.choice(sorted(set(opts["ops"])))
    if op == "-" and not opts["negative"] and a < b:
        a, b = b, a
    return TaskExample(prompt=f"{a}{op}{b}=", reference=str(_APPLY[op](a, b)))


def demo(seed: int, index: int, options: dict, wrong: bool = False) -> Demo:
    """The answer; a wrong demo is off by 1..9 (either way), so the exact-match reward is 0."""
    answer = int(make_example(seed, index, options).reference)
    if wrong:
        rng = random.Random(f"arithmetic-wrong:{seed}:{index}")
        answer += rng.choice((-1, 1)) * rng.randint(1, 9)
    return Demo.answer(str(answer))


def reward(response: str, reference: str, sandbox=None):
    """Exact match of the response's final number (see verifiers.extract_final_answer)."""
    return verify_math(response, reference)


register_task("arithmetic", make_example, reward, description=__doc__.splitlines()[0], demo=demo,
              deterministic=True, inline=True)
