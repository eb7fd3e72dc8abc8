"""`ernie submit`: render a Slurm template from the config, show it or sbatch it.

    ernie submit pretrain --config run.toml [--set slurm.nodes=64 ...] [--dry-run]
    ernie submit rl --config rl.toml --dependency afterok:1234

The [slurm] section of the config sizes the job; every other ``--set`` is
passed on to the command inside the job.  Before sbatch sees the script the
partitions are checked against ``sinfo``, so a typo fails here with the list
of real partitions instead of an opaque sbatch error.  The rendered script is
kept beside the logs (the job id is in the log name), and ``--parsable``
prints only the job id so stages chain in shell:

    jid=$(ernie submit pretrain --config a.toml --parsable)
    ernie submit rl --config b.toml --dependency afterok:$jid
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

from megatron_ernie.config.errors import ConfigError
from megatron_ernie.config.loader import apply_overrides, build, read_toml
from megatron_ernie.config.slurm import SlurmConfig
from megatron_ernie.launch.render import TEMPLATE_DIR, TEMPLATES, JobSpec, log_dir, render_job


class SubmitError(RuntimeError):
    """sbatch (or sinfo) is missing or refused the job; the message says what it printed."""


def parse_args(argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="ernie submit", description=__doc__.split("\n\n")[0])
    parser.add_argument("kind", choices=sorted(TEMPLATES), help="which template: pretrain or rl (het job)")
    parser.add_argument("--config", required=True, help="the run's TOML; its [slurm] section sizes the job")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a config value (slurm.* here, the rest in the job's command)")
    parser.add_argument("--dry-run", action="store_true", help="print the rendered script, submit nothing")
    parser.add_argument("--dependency", default="", help="Slurm dependency, e.g. afterok:1234")
    parser.add_argument("--command", default="", help="run this in every task instead of `ernie <kind> ...`")
    parser.add_argument("--parsable", action="store_true", help="print only the job id")
    parser.add_argument("--gpu", default="h100", help="device for the predicted-memory check (see ernie plan)")
    parser.add_argument("--force", action="store_true", help="submit even when the layout is predicted not to fit")
    parser.add_argument("--template-dir", default=str(TEMPLATE_DIR), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def load_submission(args: argparse.Namespace) -> tuple[SlurmConfig, JobSpec]:
    """SlurmConfig from [slurm] (+ slurm.* overrides); JobSpec from the rest."""
    config_path = Path(args.config).resolve()
    raw = apply_overrides(read_toml(config_path), args.set)
    slurm = build(SlurmConfig, raw.get("slurm", {}), "slurm")
    run_dir = Path(raw.get("run", {}).get("dir", "runs/ernie")).resolve()
    passed_on = tuple(o for o in args.set if not o.startswith(("slurm.", "run.dir=")))
    job = JobSpec(kind=args.kind, config_path=str(config_path), run_dir=str(run_dir),
                  overrides=passed_on, command=args.command, dependency=args.dependency)
    if args.kind == "rl":
        check_rollout_replicas(slurm, raw.get("rl", {}).get("system", {}).get("rollout_tensor", 1))
        slurm.check_teachers("slurm", sorted(raw.get("rl", {}).get("distill", {}).get("teachers", {})))
        slurm.check_judge("slurm", bool(raw.get("rl", {}).get("judge", {}).get("checkpoint", "")))
    if not args.command:
        check_job_config(config_path, args.set, None if args.kind == "rl" else slurm.nodes * slurm.gpus_per_node)
    return slurm, job


def check_job_config(config_path: Path, overrides, world: int | None) -> None:
    """The config checks the job itself runs at start-up (every section and the rules between
    them), here, before anything is queued: a typo must not wait in the queue for hours to fail.
    A training job (one task per GPU) is also checked at its world size, nodes x gpus_per_node:
    the layout must divide it and the batch must split over its data-parallel ranks. (An RL
    job's trainer layout is checked by the trainer group at start-up.)"""
    from megatron_ernie import config as C

    cfg = C.load(config_path, overrides)
    C.validate(cfg, world or None)


def check_memory(slurm: SlurmConfig, args) -> None:
    """Training jobs on GPUs: the planner's predicted peak memory per rank of the configured layout
    (megatron_ernie/plan), on stderr; refuse with a layout that fits unless --force."""
    if args.kind == "rl" or args.command or slurm.gpus_per_node <= 0:
        return
    from megatron_ernie import config as C
    from megatron_ernie.plan.check import peak_memory_line

    cfg = C.load(Path(args.config), args.set)
    print(peak_memory_line(cfg, slurm.nodes * slurm.gpus_per_node, args.gpu, args.force), file=sys.stderr)


def check_rollout_replicas(slurm: SlurmConfig, rollout_tensor) -> None:
    """The rollout group's tasks must split into TP replicas of rl.system.rollout_tensor (before queueing)."""
    group = slurm.rollout
    tasks = group.nodes * group.ntasks_per_node
    if isinstance(rollout_tensor, int) and rollout_tensor > 0 and tasks % rollout_tensor:
        raise ConfigError("rl.system.rollout_tensor", rollout_tensor,
                          f"the rollout group runs {tasks} tasks (slurm.rollout.nodes={group.nodes} x "
                          f"{group.ntasks_per_node} per node), which do not split into replicas of "
                          f"{rollout_tensor}; choose a divisor of {tasks} or resize slurm.rollout")


def _run(command: list[str]) -> str:
    if shutil.which(command[0]) is None:
        raise SubmitError(f"{command[0]} not found: run on a Slurm login node, or use --dry-run")
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SubmitError(f"{' '.join(command[:2])} failed: {done.stderr.strip() or done.stdout.strip()}")
    return done.stdout


def check_partitions(slurm: SlurmConfig, kind: str) -> None:
    """Every named partition must exist on this cluster (sinfo)."""
    known = set(_run(["sinfo", "-h", "-o", "%R"]).split())
    wanted = [("slurm.partition", slurm.partition)]
    if kind == "rl":
        wanted += [(f"slurm.{role}.partition", group.partition) for role, group in slurm.groups()]
    for field, name in wanted:
        if name and name not in known:
            raise ConfigError(field, name, f"no such partition on this cluster; available: {sorted(known)}")


def submit_script(script: str, directory: Path, job_name: str) -> tuple[str, Path]:
    """Write the script next to the logs (Slurm does not create --output dirs) and sbatch it."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{job_name}-{time.strftime('%Y%m%d-%H%M%S')}.sbatch"
    path.write_text(script)
    job_id = _run(["sbatch", "--parsable", str(path)]).strip().split(";")[0]
    if not job_id.isdigit():
        raise SubmitError(f"sbatch printed {job_id!r}, not a job id")
    return job_id, path


def _summary(slurm: SlurmConfig, job: JobSpec, job_id: str, script: Path) -> str:
    if job.kind == "rl":
        shape = ", ".join(f"{role} {g.nodes}x{g.ntasks_per_node}" for role, g in slurm.groups())
    else:
        shape = f"{slurm.nodes} nodes x {slurm.gpus_per_node} GPUs"
    log = Path(log_dir(slurm, job)) / f"{slurm.job_name}-{job_id}.out"
    return f"submitted {job.kind} job {job_id} ({shape})\n  script: {script}\n  log:    {log}\n  run:    {job.run_dir}"


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        slurm, job = load_submission(args)
        check_memory(slurm, args)
        script = render_job(slurm, job, Path(args.template_dir))
        if args.dry_run:
            print(script, end="")
            return 0
        check_partitions(slurm, job.kind)
        job_id, path = submit_script(script, Path(log_dir(slurm, job)), slurm.job_name)
    except ConfigError as err:
        print(f"ernie submit: {err}", file=sys.stderr)
        return 2
    except SubmitError as err:
        print(f"ernie submit: {err}", file=sys.stderr)
        return 1
    print(job_id if args.parsable else _summary(slurm, job, job_id, path))
    return 0


if __name__ == "__main__":
    sys.exit(main())
