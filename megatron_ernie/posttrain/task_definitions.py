"""Where `ernie eval-tasks` takes a task's definition (options, seed, response budget) from.

Why: the pipeline's scoreboard scores every stage's checkpoint on every
domain, also on domains it was not trained on (the off-diagonal cells: the
arithmetic expert on code). A checkpoint knows only its own tasks: for the
others it would fall back to the task's default options and to its own
rl.sampling.max_new_tokens (e.g. the arithmetic expert's 4 tokens for a code
answer), so the cells of one column would measure different prompt
distributions and budgets. A definitions source fixes one definition per
task for every checkpoint:

* a run config (any TOML with [[rl.tasks]]): those entries, and its
  rl.sampling.max_new_tokens, when it sets one, as the budget of each of them;
* a pipeline file ([pipeline]): each task as the stage that trains it
  defines it, after that stage's overrides: its domain expert first, then
  general RL, OPD, SFT (the judge stage answers y/n and defines no task);
  its budget is that stage's rl.sampling.max_new_tokens (general RL's for a
  task only SFT trains: SFT samples nothing).

`ernie pipeline` writes its definitions as a tasks file
(<pipeline.dir>/eval_tasks.toml, [[rl.tasks]] only) and passes the per-task
budgets on the command line (`--max-new-tokens arithmetic=4,code=48`), so a
cell can be rerun by hand with the exact command the pipeline used.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass
from pathlib import Path

from megatron_ernie.config.errors import ConfigError
from megatron_ernie.config.loader import build, dumps, read_toml
from megatron_ernie.config.rl import TaskConfig

_OWNER_ORDER = ("experts", "general", "opd", "sft")  # which stage's definition of a task wins


@dataclass(frozen=True)
class TaskDefinition:
    """One task as every checkpoint is scored on it; max_new_tokens 0 leaves the budget to the checkpoint."""

    task: TaskConfig
    max_new_tokens: int = 0


def from_run_config(raw: dict, where: str) -> dict[str, TaskDefinition]:
    """The [[rl.tasks]] entries of a raw run config (validated as a run would), by name."""
    rl = raw.get("rl", {})
    sampling = rl.get("sampling", {})
    budget = sampling.get("max_new_tokens", 0)  # 0: the file sets none
    if "max_new_tokens" in sampling and (not isinstance(budget, int) or isinstance(budget, bool) or budget < 1):
        raise ConfigError("rl.sampling.max_new_tokens", budget, f"in {where}: use an integer >= 1")
    out: dict[str, TaskDefinition] = {}
    for i, entry in enumerate(rl.get("tasks", [])):
        task = build(TaskConfig, entry, f"rl.tasks[{i}]")
        task.validate(f"rl.tasks[{i}]")
        if task.name in out:
            raise ConfigError(f"rl.tasks[{i}].name", task.name, f"in {where}: defined twice; keep one entry")
        out[task.name] = TaskDefinition(task, budget)
    return out


def from_stages(stages) -> dict[str, TaskDefinition]:
    """Each task as the stage that trains it defines it (see the module docstring for the order). SFT
    samples nothing, so a task only SFT trains gets general RL's response budget."""
    out: dict[str, TaskDefinition] = {}
    sampled_budget = 0
    for group in _OWNER_ORDER:
        for stage in (s for s in stages if s.name.split("/")[0] == group):
            raw = tomllib.loads(stage.config_text)
            defined = from_run_config(raw, f"stage {stage.name}")
            if group == "general":
                sampled_budget = raw["rl"]["sampling"]["max_new_tokens"]
            for name in stage.tasks:
                budget = sampled_budget if group == "sft" else defined[name].max_new_tokens
                out.setdefault(name, dataclasses.replace(defined[name], max_new_tokens=budget))
    return out


def load_definitions(path: str) -> dict[str, TaskDefinition]:
    """The definitions of a run config with [[rl.tasks]] or of a pipeline file (--config of eval-tasks)."""
    raw = read_toml(path)
    if "pipeline" in raw:
        from megatron_ernie.posttrain.stages import load_pipeline, plan

        return from_stages(plan(*load_pipeline(path)))
    defined = from_run_config(raw, str(path))
    if not defined:
        raise ConfigError("--config", str(path), "defines no task: give a run config with [[rl.tasks]] "
                                                 "entries or a pipeline file ([pipeline])")
    return defined


@dataclass(frozen=True)
class _RLTasks:
    tasks: tuple[TaskConfig, ...] = ()


@dataclass(frozen=True)
class _TasksFile:
    rl: _RLTasks = dataclasses.field(default_factory=_RLTasks)


def write_tasks_file(definitions: dict[str, TaskDefinition], path: Path) -> Path:
    """[[rl.tasks]] of the definitions as TOML (a run config fragment `--config` reads back)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = dumps(_TasksFile(_RLTasks(tuple(d.task for d in definitions.values()))))
    path.write_text("# task definitions every checkpoint is scored with (written by ernie pipeline)\n" + text)
    return path


def budgets_argument(definitions: dict[str, TaskDefinition]) -> str:
    """`task=N,...` for --max-new-tokens: the budget of every task that has one."""
    return ",".join(f"{name}={d.max_new_tokens}" for name, d in definitions.items() if d.max_new_tokens)


def parse_budgets(text: str) -> tuple[int, dict[str, int]]:
    """--max-new-tokens: `N` (every task), `task=N,...` (those tasks) or both, e.g. `32,code=64`."""
    default, per_task = 0, {}
    for part in filter(None, (p.strip() for p in str(text).split(","))):
        name, sep, value = part.rpartition("=") if "=" in part else ("", "", part)
        named = bool(sep)
        if not value.isdigit() or (named and (not name or "=" in name or int(value) < 1)):
            raise ConfigError("--max-new-tokens", text, "use N, task=N or a comma-separated mix, e.g. 32,code=64 "
                                                        "(N >= 1 per task; a bare 0 means the checkpoint's)")
        if named:
            per_task[name.strip()] = int(value)
        else:
            default = int(value)
    return default, per_task
