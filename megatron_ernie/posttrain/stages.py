"""From a pipeline file to the stages' resolved run configs, before anything runs.

Each stage is an ordinary `ernie sft` or `ernie rl` run. The pipeline takes
the stage's own TOML, applies its overrides, then sets what links it to the
other stages: its run directory, the checkpoint it starts from, the tasks of
its domain, its teachers (OPD). The result is built into the config tree and
validated, so a mistake in any stage is reported before the first stage
starts, and written as `<stage run dir>/stage.toml`, which is what the stage
runs and what the manifest hashes.

A stage's output checkpoint is known in advance: a stage of N steps saves on
exit, so it ends with `<run dir>/checkpoints/iter_N`. That is what lets the
whole chain be planned (and submitted to Slurm with dependencies) up front.
"""

from __future__ import annotations

import copy
import hashlib
import tomllib
from dataclasses import dataclass
from pathlib import Path

from megatron_ernie import config as C
from megatron_ernie.config.errors import ConfigError
from megatron_ernie.config.loader import apply_overrides, build, read_toml
from megatron_ernie.config.pipeline import PipelineConfig, PipelineFile, StageConfig
from megatron_ernie.config.slurm import SlurmConfig


@dataclass(frozen=True)
class Stage:
    """One run of the pipeline: `kind` is "sft" or "rl"; `after` names the stages it needs."""

    name: str          # "sft", "experts/<name>", "opd", "general"
    kind: str
    run_dir: Path
    config_text: str   # the resolved TOML the stage runs
    input: str         # the checkpoint it starts from ("" = from scratch)
    output: Path       # the checkpoint it ends with
    procs: int
    after: tuple[str, ...] = ()
    tasks: tuple[str, ...] = ()

    @property
    def config_path(self) -> Path:
        return self.run_dir / "stage.toml"

    @property
    def config_hash(self) -> str:
        return hashlib.sha256(self.config_text.encode()).hexdigest()

    def write_config(self) -> Path:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        temporary = self.config_path.with_suffix(".toml.tmp")
        temporary.write_text(self.config_text)
        temporary.replace(self.config_path)
        return self.config_path


def load_pipeline(path: str, overrides=()) -> tuple[PipelineConfig, Path]:
    """The validated [pipeline] table and the folder its relative paths start from."""
    raw = apply_overrides(read_toml(path), overrides)
    pipeline = build(PipelineFile, raw).pipeline
    pipeline.validate("pipeline")
    return pipeline, Path(path).resolve().parent


def plan(pipeline: PipelineConfig, home: Path) -> list[Stage]:
    """Every stage in dependency order: sft, the experts, opd, general."""
    root = _absolute(home, pipeline.dir)
    base = str(_absolute(home, pipeline.base)) if pipeline.base else ""
    sft = _stage("sft", "sft", pipeline.sft, pipeline.sft, home, root / "sft", base, (), {})
    experts = [_stage(f"experts/{e.name}", "rl", pipeline.expert, _with(pipeline.expert, e.steps, e.tasks, e.set), home,
                      root / "experts" / e.name, str(sft.output), ("sft",), {}) for e in pipeline.experts]
    teachers = {e.name: str(s.output) for e, s in zip(pipeline.experts, experts)}
    domains = tuple(pipeline.routes())
    opd = _stage("opd", "rl", pipeline.opd, _with(pipeline.opd, pipeline.opd.steps, pipeline.opd.tasks or domains),
                 home, root / "opd", str(sft.output), tuple(s.name for s in experts),
                 _distill(teachers, pipeline.routes()))
    judge = _judge_stage(pipeline, home, root, sft)
    general = _stage("general", "rl", pipeline.general, pipeline.general, home, root / "general",
                     str(opd.output), ("opd",) + (("judge",) if judge else ()), _judged(judge))
    return [sft, *experts, opd, *([judge] if judge else []), general]


def _judge_stage(pipeline: PipelineConfig, home: Path, root: Path, sft: Stage) -> Stage | None:
    """The learned judge: SFT from the SFT model (so it shares its tokenizer and its reading of the tasks)
    on rubric-labelled verdicts for its tasks (`[sft] source = "judge"`, rl/judge/data.py; a stage
    config or `set` that chose "judge-items" keeps its per-item verdicts)."""
    if not pipeline.judge.config:
        return None
    stage = _with(pipeline.judge, pipeline.judge.steps, pipeline.judge.tasks)
    return _stage("judge", "sft", pipeline.judge, stage, home, root / "judge", str(sft.output), ("sft",),
                  {"sft": {"source": _judge_source(stage, home), "error_fraction": 0.0}})


def _judge_source(stage: StageConfig, home: Path) -> str:
    from megatron_ernie.rl.judge.data import VERDICT_FORMATS

    source = apply_overrides(read_toml(_absolute(home, stage.config)), stage.set).get("sft", {}).get("source")
    return source if source in VERDICT_FORMATS else "judge"


def _judged(judge: Stage | None) -> dict:
    """The [rl.judge] table of the general stage: the judge stage's output scores the judge's tasks."""
    if judge is None:
        return {}
    return {"rl": {"judge": {"checkpoint": str(judge.output), "tasks": list(judge.tasks)}}}


def _with(stage: StageConfig, steps: int, tasks, extra_set=()) -> StageConfig:
    return StageConfig(stage.config, (*stage.set, *extra_set), steps or stage.steps, stage.procs, tuple(tasks))


def _distill(teachers: dict, routes: dict) -> dict:
    """The [rl.distill] table of the OPD stage: every expert a teacher, every task routed to its expert."""
    return {"rl": {"algorithm": {"advantage": "opd"}, "distill": {"teachers": teachers, "routes": routes}}}


def _absolute(home: Path, path: str) -> Path:
    return Path(path) if Path(path).is_absolute() else (home / path).resolve()


def _stage(name: str, kind: str, source: StageConfig, stage: StageConfig, home: Path, run_dir: Path, start: str,
           after: tuple, extra: dict) -> Stage:
    field = f"pipeline.{name.split('/')[0]}"
    raw = apply_overrides(read_toml(_absolute(home, source.config)), stage.set)
    raw = _scorer_groups(_merge(raw, extra))
    raw = _sized_to_procs(raw, stage.procs) if kind == "sft" else raw
    raw = _link(raw, run_dir, start, stage.steps)
    raw = _select_tasks(raw, stage.tasks, f"{field}.tasks")
    cfg = _validated(raw, f"{field}.config")
    output = Path(cfg.run.dir) / "checkpoints" / f"iter_{cfg.train.iters:07d}"
    return Stage(name, kind, run_dir, C.dumps(cfg), start, output, stage.procs, after,
                 tuple(t.name for t in cfg.rl.tasks))


_REPLACED = ("teachers", "routes")  # tables the pipeline owns whole: never merged with the stage config's


def _merge(raw: dict, extra: dict) -> dict:
    out = copy.deepcopy(raw)
    for key, value in extra.items():
        nested = isinstance(value, dict) and key not in _REPLACED
        out[key] = _merge(out.get(key, {}), value) if nested else value
    return out


def _scorer_groups(raw: dict) -> dict:
    """On Slurm a stage's scorers run in their own het groups: OPD's teachers in [slurm.teacher] (a task
    per teacher), general RL's learned judge in [slurm.judge] (one task). A stage config that sizes no
    such group (it is usually the experts' config) gets one node with those tasks, one node more for
    the job. A config that sizes the group itself is left as it is."""
    rl = raw.get("rl", {})
    raw = _scorer_group(raw, "teacher", len(rl.get("distill", {}).get("teachers", {})))
    return _scorer_group(raw, "judge", 1 if rl.get("judge", {}).get("checkpoint", "") else 0)


def _scorer_group(raw: dict, role: str, tasks: int) -> dict:
    """[slurm.<role>] with one node of `tasks` tasks, unless there is nothing to score or it is sized."""
    slurm = raw.get("slurm", {})
    if not tasks or slurm.get(role, {}).get("nodes", 0):
        return raw
    out = copy.deepcopy(raw)
    group = {**slurm.get(role, {}), "nodes": 1, "tasks_per_node": tasks}
    out["slurm"] = {**slurm, role: group, "nodes": slurm.get("nodes", 1) + 1}
    return out


DEFAULT_GPUS_PER_NODE = SlurmConfig().gpus_per_node  # the node shape a stage config that names none gets


def _sized_to_procs(raw: dict, procs: int) -> dict:
    """A training stage (SFT, the judge) runs as `procs` ranks here and must run as `procs` ranks on
    Slurm too: its layout and batch were chosen for that world size, and `ernie submit` checks them at
    nodes x gpus_per_node. What the stage config leaves of [slurm] nodes / gpus_per_node is derived
    from procs (up to 8 GPUs a node); what it sets is kept, and checked when the chain is submitted
    (slurm_world_check), since a local run never reads it."""
    slurm = raw.get("slurm", {})
    nodes, gpus = slurm.get("nodes"), slurm.get("gpus_per_node")
    if gpus is None:
        gpus = max(procs // nodes, 1) if nodes else min(procs, DEFAULT_GPUS_PER_NODE)
    nodes = nodes if nodes is not None else max(procs // max(gpus, 1), 1)
    out = copy.deepcopy(raw)
    out["slurm"] = {**slurm, "nodes": nodes, "gpus_per_node": gpus}
    return out


def slurm_world_check(stage: Stage) -> None:
    """Before a training stage is submitted: its Slurm job must have the `procs` ranks it was planned for."""
    if stage.kind != "sft":
        return
    slurm = tomllib.loads(stage.config_text)["slurm"]
    nodes, gpus = slurm["nodes"], slurm["gpus_per_node"]
    if nodes * gpus != stage.procs:
        field = f"pipeline.{stage.name}.procs"
        raise ConfigError(field, stage.procs, f"its Slurm job would have {nodes} node(s) x {gpus} GPUs = "
                          f"{nodes * gpus} ranks; set {field} = {nodes * gpus}, or size the stage "
                          f"config's [slurm] nodes x gpus_per_node to {stage.procs}")


def _link(raw: dict, run_dir: Path, start: str, steps: int) -> dict:
    """Run directory, starting checkpoint, steps, and a checkpoint at the end (the stage's output)."""
    sets = [f'run.dir="{run_dir}"', f'checkpoint.load="{start}"', "checkpoint.save_on_exit=true"]
    sets += [f"train.iters={steps}"] if steps else []
    return apply_overrides(raw, sets)


def _select_tasks(raw: dict, names: tuple, field: str) -> dict:
    """Keep the [[rl.tasks]] entries named by `names` (all when empty); each name must exist."""
    if not names:
        return raw
    tasks = raw.get("rl", {}).get("tasks", [])
    known = [t.get("name", "arithmetic") for t in tasks]
    for name in names:
        if name not in known:
            raise ConfigError(field, list(names), f"task {name!r} is not among the stage config's "
                              f"[[rl.tasks]] ({known}); add it there or fix the name")
    out = copy.deepcopy(raw)
    out["rl"]["tasks"] = [t for t in tasks if t.get("name", "arithmetic") in names]
    return out


def _validated(raw: dict, field: str) -> C.ErnieConfig:
    try:
        cfg = build(C.ErnieConfig, raw)
        C.validate(cfg)
    except ConfigError as err:
        raise ConfigError(err.field, err.value, f"{err.fix} (in the stage built from {field})") from None
    return cfg
