"""The `[pipeline]` file of `ernie pipeline`: the four post-training stages and their configs.

ERNIE 5.1's post-training runs SFT, then one RL expert per domain (each from
the SFT model, in parallel), then multi-teacher on-policy distillation of the
experts into the SFT model, then general online RL, whose open-ended tasks are
rewarded by a learned judge (an SFT run on rubric-labelled verdicts,
rl/judge/data.py, from the SFT model). This file only names the
stages: each stage's own settings live in an ordinary run config (an `ernie
sft` or `ernie rl` TOML) that the pipeline completes with what links the
stages (the checkpoint it starts from, its run directory, its tasks, its
teachers) before anything starts.

    [pipeline]
    dir = "runs/posttrain"      # <dir>/<stage>[/<expert>] are the stages' run directories
    base = ""                   # a checkpoint SFT starts from ("" = from scratch)
    [pipeline.sft]      config = "sft.toml", set = [...], procs = 2
    [pipeline.expert]   config = "rl.toml"   (shared by every expert)
    [[pipeline.experts]] name = "arith", tasks = ["arithmetic"], steps = 60
    [pipeline.opd]      config = "rl.toml", steps = 60
    [pipeline.judge]    config = "sft.toml", steps = 300, tasks = ["open_ended"]   (optional)
    [pipeline.general]  config = "rl.toml", steps = 60, tasks = [...]
    [pipeline.score]    prompts = 32, samples = 2  (held-out evaluation of every stage's output)

Paths in the file are relative to the file itself.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from megatron_ernie.config.errors import ConfigError, require

STAGES = ("sft", "experts", "opd", "judge", "general")
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,31}$")


def _int_at_least(path: str, value, minimum: int) -> None:
    require(isinstance(value, int) and not isinstance(value, bool) and value >= minimum, path, value,
            f"use an integer >= {minimum}")


@dataclass(frozen=True)
class StageConfig:
    """One stage: the run config it starts from, overrides, processes and optimizer steps.

    steps: train.iters of the stage (0 keeps the config's own value).
    procs: training processes (SFT: torchrun ranks; RL: trainer ranks).
    tasks: names of the [[rl.tasks]] entries this stage trains on (empty: all of them).
    """

    config: str = ""
    set: tuple[str, ...] = ()
    steps: int = 0
    procs: int = 1
    tasks: tuple[str, ...] = ()

    def validate(self, path: str, needed: bool = True) -> None:
        if needed:
            require(bool(self.config), f"{path}.config", self.config,
                    "name the stage's run config (a TOML file, relative to the pipeline file)")
        _int_at_least(f"{path}.steps", self.steps, 0)
        _int_at_least(f"{path}.procs", self.procs, 1)


@dataclass(frozen=True)
class ExpertConfig:
    """One domain expert: an RL run from the SFT checkpoint on its own tasks."""

    name: str = ""
    tasks: tuple[str, ...] = ()
    steps: int = 0
    set: tuple[str, ...] = ()  # this expert's own overrides, after [pipeline.expert]'s (e.g. agent turns)

    def validate(self, path: str) -> None:
        require(isinstance(self.name, str) and bool(_NAME.match(self.name)), f"{path}.name", self.name,
                "use a short name of letters, digits, '_' or '-' starting with a letter (it names a directory)")
        require(bool(self.tasks), f"{path}.tasks", self.tasks, "list the task names of this expert's domain")
        _int_at_least(f"{path}.steps", self.steps, 0)


@dataclass(frozen=True)
class ScoreConfig:
    """How every stage's output is scored (`ernie eval-tasks` on held-out prompts); prompts = 0 skips it.
    tasks: the columns of the domain x stage scoreboard (empty: every expert's tasks plus general's)."""

    prompts: int = 32
    samples: int = 2
    tasks: tuple[str, ...] = ()

    def validate(self, path: str) -> None:
        require(self.prompts == 0 or (isinstance(self.prompts, int) and self.prompts >= 2), f"{path}.prompts",
                self.prompts, "use 0 (no scoring) or >= 2 prompts (a standard error needs two)")
        _int_at_least(f"{path}.samples", self.samples, 1)


@dataclass(frozen=True)
class PipelineConfig:
    """dir: where the stages write; base: SFT's starting checkpoint ("" = from scratch);
    parallel_experts: experts trained at once by a local run (a Slurm run submits them all)."""

    dir: str = "runs/posttrain"
    base: str = ""
    parallel_experts: int = 1
    sft: StageConfig = field(default_factory=StageConfig)
    expert: StageConfig = field(default_factory=StageConfig)
    experts: tuple[ExpertConfig, ...] = ()
    opd: StageConfig = field(default_factory=StageConfig)
    judge: StageConfig = field(default_factory=StageConfig)  # no config: general RL keeps the rubric rewards
    general: StageConfig = field(default_factory=StageConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)

    def validate(self, path: str = "pipeline") -> None:
        require(bool(self.dir), f"{path}.dir", self.dir, "name the pipeline's output directory")
        _int_at_least(f"{path}.parallel_experts", self.parallel_experts, 1)
        self.sft.validate(f"{path}.sft")
        self.expert.validate(f"{path}.expert")
        self.opd.validate(f"{path}.opd")
        self.judge.validate(f"{path}.judge", needed=False)
        require(not self.judge.config or bool(self.judge.tasks), f"{path}.judge.tasks", list(self.judge.tasks),
                "name the open-ended tasks the judge learns and scores in general RL, e.g. [\"open_ended\"]")
        self.general.validate(f"{path}.general")
        self.score.validate(f"{path}.score")
        require(bool(self.experts), f"{path}.experts", self.experts,
                "list at least one [[pipeline.experts]] entry (name, tasks, steps)")
        for i, expert in enumerate(self.experts):
            expert.validate(f"{path}.experts[{i}]")
        self._check_domains(path)

    def _check_domains(self, path: str) -> None:
        """Each task belongs to one expert: OPD routes a prompt to the expert of its task."""
        owner: dict[str, str] = {}
        for i, expert in enumerate(self.experts):
            if expert.name in [e.name for e in self.experts[:i]]:
                raise ConfigError(f"{path}.experts[{i}].name", expert.name, "is used twice; names must differ")
            for task in expert.tasks:
                if task in owner:
                    raise ConfigError(f"{path}.experts[{i}].tasks", list(expert.tasks),
                                      f"task {task!r} already belongs to expert {owner[task]!r}: "
                                      "OPD routes each task to one teacher")
                owner[task] = expert.name

    def routes(self) -> dict[str, str]:
        """task name -> the expert (teacher alias) of its domain."""
        return {task: e.name for e in self.experts for task in e.tasks}


@dataclass(frozen=True)
class PipelineFile:
    """The root of a pipeline file: only the [pipeline] table."""

    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
