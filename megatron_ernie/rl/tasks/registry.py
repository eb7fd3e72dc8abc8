"""The task registry: name -> (example generator, reward function).

A task is two plain functions:
  make_example(seed, index, options) -> TaskExample(prompt, reference)
      deterministic: the same (seed, index, options) always gives the same
      example, so the controller checkpoints only an index to resume;
  reward(response, reference, sandbox) -> Verdict | float
      called by reward workers; `sandbox` is the SandboxConfig for code
      execution. A float is taken as the reward with status "ok" if > 0,
      else "wrong".
and optionally a demonstration for supervised fine-tuning (data/sft.py):
  demo(seed, index, options, wrong) -> Demo
      a response to example (seed, index) as the task's author would write
      it: the answer, a reference program, a scripted tool-call episode.
      wrong=True must give a response the reward function scores as wrong
      (deliberately imperfect SFT data, so RL after SFT has headroom).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

from megatron_ernie.config.errors import ConfigError
from megatron_ernie.config.rl import SandboxConfig, TaskConfig
from megatron_ernie.rl.reward.verifiers import Verdict


@dataclass(frozen=True)
class TaskExample:
    prompt: str
    reference: str  # what the reward function needs: an answer, or JSON test cases


DEMO_ROLES = ("model", "env")


@dataclass(frozen=True)
class Demo:
    """A demonstration response as turns in order: (role, text), role "model" (the policy writes it:
    supervised) or "env" (a tool's reply: in context, never supervised), like rl/agent/episode.py."""

    turns: tuple[tuple[str, str], ...]

    def __post_init__(self):
        if not self.turns or any(role not in DEMO_ROLES for role, _ in self.turns):
            raise ValueError(f"Demo.turns = {self.turns!r}: give (role, text) pairs, role one of {DEMO_ROLES}")

    @classmethod
    def answer(cls, text: str) -> "Demo":
        return cls((("model", text),))

    @property
    def text(self) -> str:
        return "".join(text for _, text in self.turns)


@dataclass(frozen=True)
class Task:
    name: str
    make_example: Callable[[int, int, dict], TaskExample]
    reward: Callable[[str, str, SandboxConfig], "Verdict | float"]
    description: str = ""
    demo: Callable[[int, int, dict, bool], Demo] | None = None  # optional: SFT demonstrations
    # the verdict is a function of (response, reference) alone, so a reward process may score
    # identical samples once (rl/reward/worker.py); off for user tasks unless they say so
    deterministic: bool = False
    # the reward is microseconds of pure Python with no side effects (an exact-match check), so the
    # controller scores it where the samples arrive: a reward-worker round trip would cost ~1000x
    # more (issue 14's hand-off). Sandboxed and user tasks go to reward workers unless they say so.
    inline: bool = False

    def examples(self, seed: int, start: int, count: int, options: dict | None = None) -> list[TaskExample]:
        return [self.make_example(seed, i, dict(options or {})) for i in range(start, start + count)]

    def score(self, response: str, reference: str, sandbox: SandboxConfig) -> Verdict:
        """Run the reward function and make its result a Verdict."""
        result = self.reward(response, reference, sandbox)
        if isinstance(result, Verdict):
            return result
        reward = float(result)
        return Verdict(reward, "ok" if reward > 0 else "wrong")


_TASKS: dict[str, Task] = {}


def register_task(name: str, make_example, reward, description: str = "", replace: bool = False,
                  demo=None, deterministic: bool = False, inline: bool = False) -> Task:
    """Make a task available by name (the `name` of a [[rl.tasks]] entry). `deterministic=True`
    promises the reward depends only on (response, reference): identical samples are scored once.
    `inline=True` promises it is cheap and side-effect free: the controller scores it itself."""
    if not name or not isinstance(name, str):
        raise ValueError(f"task name {name!r}: use a non-empty string")
    if name in _TASKS and not replace:
        raise ValueError(f"task {name!r} is already registered: pick another name or pass replace=True")
    _TASKS[name] = Task(name, make_example, reward, description, demo, deterministic, inline)
    return _TASKS[name]


def task(name: str, reward, description: str = "", demo=None):
    """Decorator form: `@task("my_task", reward=my_reward)` on the example generator."""
    def register(make_example):
        register_task(name, make_example, reward, description or (make_example.__doc__ or "").strip(),
                      demo=demo)
        return make_example
    return register


def get_task(name: str) -> Task:
    if name not in _TASKS:
        raise KeyError(f"unknown task {name!r}; registered: {sorted(_TASKS)}. "
                       "Register it with megatron_ernie.rl.tasks.register_task, or set the task's `module`")
    return _TASKS[name]


def available_tasks() -> list[str]:
    return sorted(_TASKS)


def resolve_task(config: TaskConfig, path: str = "rl.tasks") -> Task:
    """The task a [[rl.tasks]] entry names, importing its `module` first if set."""
    if config.module:
        try:
            importlib.import_module(config.module)
        except ImportError as exc:
            raise ConfigError(f"{path}.module", config.module, f"cannot import it ({exc}); "
                              "give an importable module name, e.g. 'my_project.rl_tasks'") from None
    if config.name not in _TASKS:
        raise ConfigError(f"{path}.name", config.name, f"not a registered task; registered: {sorted(_TASKS)}")
    return _TASKS[config.name]
