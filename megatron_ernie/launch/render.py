"""Render the Slurm templates in slurm/ from a SlurmConfig and a JobSpec.

The templates are ordinary sbatch scripts with ``{{name}}`` placeholders, so a
user can read exactly what will run; ``--dry-run`` prints the result.  Rule:
a line holding a placeholder whose value is empty is left out (an unset
account, no dependency), so optional #SBATCH options need no template logic.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

from megatron_ernie.config.errors import ConfigError
from megatron_ernie.config.slurm import SlurmConfig
from megatron_ernie.runtime.env import EXIT_REQUEUE

TEMPLATE_DIR = Path(__file__).resolve().parents[2] / "slurm"
TEMPLATES = {"pretrain": "pretrain.sbatch", "sft": "pretrain.sbatch", "rl": "rl_hetjob.sbatch"}  # sft: the pretraining job
_PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")
_DEPENDENCY = re.compile(r"(after|afterok|afternotok|afterany|aftercorr|afterburstbuffer)(:\d+(\+\d+)?)+"
                         r"|singleton")


@dataclass(frozen=True)
class JobSpec:
    """What runs inside the job: the command side of a submission."""

    kind: str  # "pretrain" | "sft" | "rl" (the ernie subcommand)
    config_path: str  # the training TOML (absolute: the job may start elsewhere)
    run_dir: str  # checkpoints, `latest`, and (by default) the Slurm logs
    overrides: tuple[str, ...] = ()  # --set section.key=value passed to the command
    command: str = ""  # replaces the ernie command (probes, custom entry points)
    dependency: str = ""  # e.g. afterok:1234 (multi-stage pipelines)


def render_template(text: str, values: dict[str, str]) -> str:
    """Fill ``{{name}}`` placeholders; drop lines whose placeholder is empty."""
    unknown = sorted(set(_PLACEHOLDER.findall(text)) - set(values))
    if unknown:
        raise ConfigError("template", unknown, f"placeholders without a value; known: {sorted(values)}")
    lines = []
    for line in text.splitlines():
        names = _PLACEHOLDER.findall(line)
        if any(str(values[n]) == "" for n in names):
            continue
        lines.append(_PLACEHOLDER.sub(lambda m: str(values[m.group(1)]), line))
    return "\n".join(lines) + "\n"


def check_dependency(dependency: str) -> None:
    for part in filter(None, re.split(r"[,?]", dependency)):
        if not _DEPENDENCY.fullmatch(part):
            raise ConfigError("--dependency", dependency,
                              "use Slurm's form type:jobid[:jobid...], e.g. afterok:1234 or afterok:12:13")


def log_dir(slurm: SlurmConfig, job: JobSpec) -> str:
    return slurm.log_dir or str(Path(job.run_dir) / "slurm")


def command_line(slurm: SlurmConfig, job: JobSpec) -> str:
    """`ernie pretrain|rl --config C --set run.dir=R [--set ...] --resume auto`, shell-quoted."""
    if job.command:
        return job.command
    words = [*shlex.split(slurm.ernie), job.kind, "--config", job.config_path, "--set", f"run.dir={job.run_dir}"]
    for override in job.overrides:
        words += ["--set", override]
    words += ["--resume", "auto"]
    return shlex.join(words)


def _sbatch_block(options: list[str]) -> str:
    return "\n".join(f"#SBATCH {o}" for o in options)


def _job_wide_values(slurm: SlurmConfig, job: JobSpec) -> dict[str, str]:
    """Values shared by both templates: identity, limits, logs, body."""
    extra = list(slurm.extra_sbatch)
    if job.dependency:
        check_dependency(job.dependency)
        extra += [f"--dependency={job.dependency}", "--kill-on-invalid-dep=yes"]
    return {
        "job_name": slurm.job_name, "partition": slurm.partition, "account": slurm.account,
        "qos": slurm.qos, "time": slurm.time, "signal_lead_s": str(slurm.signal_lead_s),
        "requeue": "--requeue" if slurm.requeue else "--no-requeue",
        "log_file": shlex.quote(str(Path(log_dir(slurm, job)) / "%x-%j.out")),
        "extra_sbatch": _sbatch_block(extra),
        "run_dir": shlex.quote(job.run_dir), "requeue_exit": str(EXIT_REQUEUE),
        "max_restarts": str(slurm.max_restarts), "setup": "\n".join(slurm.setup),
        "env": "\n".join(f"export {k}={shlex.quote(v)}" for k, v in (e.split("=", 1) for e in slurm.env)),
        "command": command_line(slurm, job),
    }


def pretrain_values(slurm: SlurmConfig, job: JobSpec) -> dict[str, str]:
    return {**_job_wide_values(slurm, job), "nodes": str(slurm.nodes),
            "ntasks_per_node": str(slurm.gpus_per_node), "gpus_per_node": str(slurm.gpus_per_node),
            "cpus_per_task": str(slurm.cpus_per_task or ""), "mem": slurm.mem,
            "exclusive": "--exclusive" if slurm.exclusive else ""}


def _group_options(slurm: SlurmConfig, group) -> list[str]:
    options = [f"--partition={group.partition or slurm.partition}", f"--nodes={group.nodes}",
               f"--ntasks-per-node={group.ntasks_per_node}"]
    options += [f"--gpus-per-node={group.gpus_per_node}"] if group.gpus_per_node else []
    options += [f"--cpus-per-task={group.cpus_per_task}"] if group.cpus_per_task else []
    options += [f"--mem={slurm.mem}"] if slurm.mem else []
    options += ["--exclusive"] if slurm.exclusive else []
    return [o for o in options if o != "--partition="]


def rl_values(slurm: SlurmConfig, job: JobSpec) -> dict[str, str]:
    """Job-wide options go with the first group; `#SBATCH hetjob` separates the groups."""
    groups = slurm.groups()
    blocks = []
    for index, (role, group) in enumerate(groups):
        header = f"# het group {index}: {role} ({group.nodes} nodes x {group.ntasks_per_node} tasks)"
        blocks.append(("#SBATCH hetjob\n" if index else "") + header + "\n"
                      + _sbatch_block(_group_options(slurm, group)))
    return {**_job_wide_values(slurm, job), "het_groups": "\n".join(blocks),
            "roles": ",".join(role for role, _ in groups), "het_group_ids": f"0-{len(groups) - 1}",
            "cpu_roles": ",".join(slurm.cpu_model_roles()),
            "mpi": slurm.mpi}


def render_job(slurm: SlurmConfig, job: JobSpec, template_dir: Path = TEMPLATE_DIR) -> str:
    """The sbatch script for ``job`` (validated first: nothing half-rendered reaches sbatch)."""
    if job.kind not in TEMPLATES:
        raise ConfigError("kind", job.kind, f"choose one of {sorted(TEMPLATES)}")
    slurm.validate("slurm")
    if job.kind == "rl":
        slurm.validate_rl("slurm")
    values = rl_values(slurm, job) if job.kind == "rl" else pretrain_values(slurm, job)
    template = Path(template_dir) / TEMPLATES[job.kind]
    if not template.is_file():
        raise ConfigError("template", str(template), "not found; run from a checkout that has slurm/")
    return render_template(template.read_text(), values)
