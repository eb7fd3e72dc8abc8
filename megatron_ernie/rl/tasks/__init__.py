"""Verifiable tasks for RL, and how to add your own.

Shipped: "arithmetic" (exact answers, tasks/arithmetic.py), "code"
(programs run in the sandbox, tasks/code.py) and "calc" (arithmetic with the
calculator tool: the agent task, tasks/calc.py), plus the open-ended
"open_ended" (name words of a category, scored by a partial-credit rubric,
tasks/open_ended.py). Each also gives SFT
demonstrations (`demo`, see registry.py).

Adding a task (two functions, then one line of config):

    # my_project/rl_tasks.py
    from megatron_ernie.rl.tasks import TaskExample, Verdict, task

    def reward(response: str, reference: str, sandbox) -> Verdict | float:
        return 1.0 if response.strip().lower() == reference else 0.0

    @task("capitals", reward=reward)
    def make_example(seed: int, index: int, options: dict) -> TaskExample:
        '''Name the capital of a country.'''
        country, capital = PAIRS[(seed + index) % len(PAIRS)]
        return TaskExample(prompt=f"The capital of {country} is", reference=capital)

    # config.toml
    [[rl.tasks]]
    name = "capitals"
    module = "my_project.rl_tasks"   # imported first; its import registers the task

`register_task(name, make_example, reward)` is the same without a decorator.
make_example must be deterministic in (seed, index, options); reward must not
raise for bad responses (return 0.0 or a Verdict with a status); exceptions it
does raise are caught by the reward worker and scored as status "error".
"""

from megatron_ernie.rl.reward.verifiers import Verdict
from megatron_ernie.rl.tasks.registry import (Demo, Task, TaskExample, available_tasks, get_task, register_task,
                                              resolve_task, task)
from megatron_ernie.rl.tasks import arithmetic, calc, code, open_ended  # noqa: F401 - importing registers the shipped tasks

__all__ = ["Demo", "Task", "TaskExample", "Verdict", "arithmetic", "available_tasks", "calc", "code", "get_task",
           "open_ended", "register_task", "resolve_task", "task"]
