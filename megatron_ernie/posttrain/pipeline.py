"""`ernie pipeline`: ERNIE 5.1's four post-training stages as one reproducible job.

    ernie pipeline --config configs/posttrain_tiny_cpu.toml             # run here
    ernie pipeline --config C.toml --submit [--dry-run]                 # a Slurm dependency chain
    ernie pipeline --config C.toml --only opd,general --force opd       # rerun part of it

SFT -> one RL expert per domain (in parallel, each from the SFT checkpoint)
-> multi-teacher on-policy distillation of the experts into the SFT model ->
general RL from the distilled student. Stages hand over checkpoints, never
in-memory state (stages.py plans them all before anything runs), so a stage
can be rerun, skipped or submitted to Slurm with `afterok` dependencies
without changing code. The manifest (manifest.py) makes a rerun skip what is
done and a killed pipeline continue where it stopped.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from megatron_ernie.config.errors import ConfigError
from megatron_ernie.config.pipeline import STAGES
from megatron_ernie.posttrain.manifest import Manifest
from megatron_ernie.posttrain.stages import Stage, load_pipeline, plan, slurm_world_check


class StageFailed(RuntimeError):
    """A stage's command exited non-zero; the message names the stage and its log."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ernie pipeline", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="the pipeline TOML ([pipeline] table)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="pipeline.KEY=VALUE")
    p.add_argument("--only", default="", help=f"comma-separated stage groups to run, of {list(STAGES)}")
    p.add_argument("--force", action="append", default=[], metavar="STAGE",
                   help="rerun this stage even if its output is up to date (a group or experts/<name>)")
    p.add_argument("--submit", action="store_true", help="submit the chain to Slurm instead of running here")
    p.add_argument("--dry-run", action="store_true", help="show the plan (or the sbatch scripts) and stop")
    return p


def group_of(stage: Stage) -> str:
    return stage.name.split("/")[0]


def selected(stages: list[Stage], only: str) -> list[Stage]:
    groups = [g.strip() for g in only.split(",") if g.strip()] or list(STAGES)
    for g in groups:
        if g not in STAGES:
            raise ConfigError("--only", only, f"stage {g!r} is unknown; choose from {list(STAGES)}")
    return [s for s in stages if group_of(s) in groups]


def stage_command(stage: Stage) -> list[str]:
    """What runs a stage on this machine (every stage resumes from its own last checkpoint)."""
    if stage.kind == "sft":
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={stage.procs}",
                "-m", "megatron_ernie.cli", "sft", "--config", str(stage.config_path), "--resume", "auto"]
    return [sys.executable, "-m", "megatron_ernie.rl.main", "--config", str(stage.config_path),
            "--resume", "auto", "--trainer-procs", str(stage.procs)]


def _forced(stage: Stage, force: list[str]) -> bool:
    return stage.name in force or group_of(stage) in force


def _check_inputs(stage: Stage, manifest: Manifest, planned: set[str]) -> None:
    """A stage whose input stage is not part of this run must find that stage's output done."""
    for before in stage.after:
        if before not in planned and manifest.stages.get(before, {}).get("status") != "done":
            raise ConfigError("--only", group_of(stage), f"stage {stage.name} needs the output of {before}, "
                              f"which has not run; add {before.split('/')[0]} to --only")


# ------------------------------------------- resume this plan, or start over
RESUMABLE = ("running", "failed", "submitted")  # interrupted: the stage's checkpoints are this plan's


def resumable(stage: Stage, manifest: Manifest) -> bool:
    """Whether the stage's own checkpoints belong to this very plan: it was interrupted (killed, failed,
    or submitted and never recorded done) with the same config hash and the same input."""
    record = manifest.stages.get(stage.name, {})
    return (record.get("status") in RESUMABLE and record.get("config_hash") == stage.config_hash
            and record.get("input") == stage.input)


def start_over(stage: Stage) -> None:
    """A stage rerun for a new plan (another config, a retrained input, --force) must not resume the
    checkpoint an earlier plan left (--resume auto would pick it up, and a finished one ends at once).
    Its directory is moved to <dir>.previous, replacing an older one, so nothing is deleted unseen."""
    if not stage.run_dir.exists():
        return
    previous = stage.run_dir.with_name(stage.run_dir.name + ".previous")
    shutil.rmtree(previous, ignore_errors=True)
    stage.run_dir.rename(previous)
    print(f"[pipeline] {stage.name}: starts over; the earlier plan's run moved to {previous}", flush=True)


def fresh_stages(stages: list[Stage], manifest: Manifest, force: list[str]) -> set[str]:
    """Stages (in plan order) that start over: forced, not resumable, or after one that starts over."""
    fresh: set[str] = set()
    for stage in stages:
        if _forced(stage, force) or not resumable(stage, manifest) or any(b in fresh for b in stage.after):
            fresh.add(stage.name)
    return fresh


# ------------------------------------------------------------------ local run
def _start(stage: Stage, manifest: Manifest) -> subprocess.Popen:
    stage.write_config()
    log = open(stage.run_dir / "stage.log", "ab")
    print(f"[pipeline] {stage.name}: starting ({stage.config_path}; log {stage.run_dir / 'stage.log'})", flush=True)
    manifest.update(stage.name, status="running", input=stage.input, config_hash=stage.config_hash,
                    config=str(stage.config_path), output=str(stage.output), tasks=list(stage.tasks))
    return subprocess.Popen(stage_command(stage), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def _finish(stage: Stage, code: int, manifest: Manifest, scorer) -> None:
    if code != 0 or not (stage.output / "meta.json").is_file():
        manifest.update(stage.name, status="failed", exit_code=code)
        raise StageFailed(f"stage {stage.name} failed (exit {code}); see {stage.run_dir / 'stage.log'}")
    record = {"status": "done", "exit_code": 0, "output_tokenizer_hash": _tokenizer_hash(stage.output)}
    if stage.input:
        record["input_tokenizer_hash"] = _tokenizer_hash(Path(stage.input))
        if record["input_tokenizer_hash"] != record["output_tokenizer_hash"]:
            manifest.update(stage.name, status="failed", **record)
            raise StageFailed(f"stage {stage.name} changed the tokenizer of {stage.input}: every stage must keep "
                              "the ids of the checkpoint it starts from (do not set data.tokenizer in stage configs)")
    if scorer is not None and group_of(stage) != "judge":  # a judge answers y/n: the tasks do not score it
        record["scores"] = scorer(stage)
    manifest.update(stage.name, **record)
    print(f"[pipeline] {stage.name}: done -> {stage.output}", flush=True)


def _tokenizer_hash(checkpoint: Path) -> str:
    from megatron_ernie.data.tokenizer import tokenizer_hash

    return tokenizer_hash(str(Path(checkpoint) / "tokenizer.json"), "checkpoint")


def run_group(stages: list[Stage], manifest: Manifest, parallel: int, scorer=None) -> None:
    """Run stages `parallel` at a time; the first failure stops the pipeline after the others end."""
    waiting, running, failures = list(stages), [], []
    while waiting or running:
        while waiting and len(running) < parallel:
            stage = waiting.pop(0)
            running.append((stage, _start(stage, manifest)))
        time.sleep(0.5)
        for stage, process in [r for r in running if r[1].poll() is not None]:
            running.remove((stage, process))
            try:
                _finish(stage, process.returncode, manifest, scorer)
            except StageFailed as err:
                failures.append(str(err))
                waiting.clear()  # no new stage after a failure; the ones running may finish
    if failures:
        raise StageFailed("; ".join(failures))


def run_local(stages: list[Stage], manifest: Manifest, force: list[str], parallel: int, scorer=None) -> None:
    """Every group in order (sft, experts, opd, general), skipping stages that are up to date.

    A stage reruns when it is not done with the current config, when forced, or
    when a stage it starts from reran in this invocation (its input changed).
    """
    ran: set[str] = set()
    for group in STAGES:
        todo = []
        for stage in (s for s in stages if group_of(s) == group):
            stale = any(before in ran for before in stage.after) or _forced(stage, force)
            if not stale and manifest.is_done(stage.name, stage.config_hash, stage.output):
                print(f"[pipeline] {stage.name}: up to date ({stage.output}), skipped", flush=True)
                continue
            if stale or not resumable(stage, manifest):
                start_over(stage)
            todo.append(stage)
        run_group(todo, manifest, parallel if group == "experts" else 1, scorer)
        ran.update(s.name for s in todo)


# ------------------------------------------------------------------- scores
def eval_definitions(stages: list[Stage], directory: Path) -> tuple[dict, Path]:
    """The task definitions every stage's checkpoint is scored with (each task as the stage that trains it
    defines it: options and response budget, posttrain/task_definitions.py), also written as the
    [[rl.tasks]] file eval-tasks reads (<pipeline.dir>/eval_tasks.toml)."""
    from megatron_ernie.posttrain.task_definitions import from_stages, write_tasks_file

    definitions = from_stages(stages)
    return definitions, write_tasks_file(definitions, directory / "eval_tasks.toml")


def eval_command(stage: Stage, score, tasks: tuple[str, ...], definitions: dict, tasks_file: Path | None,
                 out: Path) -> list[str]:
    """`ernie eval-tasks` of one stage's output: every cell of its scoreboard row uses the pipeline's
    definition of the column's task (--config tasks_file, --max-new-tokens task=N,...), never the
    checkpoint's own, so an expert is scored on another domain as that domain's expert was trained."""
    from megatron_ernie.posttrain.task_definitions import budgets_argument

    command = [sys.executable, "-m", "megatron_ernie.posttrain.evaluate", "--checkpoint", str(stage.output),
               "--tasks", ",".join(tasks), "--prompts", str(score.prompts), "--samples", str(score.samples),
               "--json", str(out)]
    if tasks_file is not None:
        budgets = budgets_argument({t: definitions[t] for t in tasks})
        command += ["--config", str(tasks_file)] + (["--max-new-tokens", budgets] if budgets else [])
    return command


def stage_scorer(score, domains: tuple[str, ...], definitions: dict | None = None, tasks_file: Path | None = None):
    """A function stage -> {task: {greedy, sampled}} that runs `ernie eval-tasks` on the stage's output
    (its own process: a clean torch world per evaluation), or None when scoring is off. With
    `definitions` (eval_definitions) every task must be one the pipeline trains."""
    if score.prompts == 0:
        return None
    tasks = tuple(score.tasks or domains)
    undefined = [t for t in tasks if definitions is not None and t not in definitions]
    if undefined:
        raise ConfigError("pipeline.score.tasks", list(score.tasks), f"{undefined} are trained by no stage, so "
                                                                     "no stage defines their options; score the "
                                                                     f"pipeline's tasks {sorted(definitions)}")

    def evaluate(stage: Stage) -> dict:
        out = stage.run_dir / "eval.json"
        command = eval_command(stage, score, tasks, definitions or {}, tasks_file, out)
        with open(stage.run_dir / "eval.log", "wb") as log:
            code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT).returncode
        if code != 0:
            raise StageFailed(f"scoring {stage.name} failed (exit {code}); see {stage.run_dir / 'eval.log'}")
        result = json.loads(out.read_text())
        return {task: {m: [r[m]["mean"], r[m]["stderr"]] for m in ("greedy", "sampled")}
                for task, r in result["tasks"].items()}

    return evaluate


def board_from(manifest: Manifest, stages: list[Stage], mode: str) -> dict:
    """{stage: {task: (mean, stderr)}} of the scored stages, in pipeline order."""
    rows = {}
    for stage in stages:
        scores = manifest.stages.get(stage.name, {}).get("scores")
        if scores:
            rows[stage.name] = {task: tuple(by_mode[mode]) for task, by_mode in scores.items()}
    return rows


def write_summary(manifest: Manifest, stages: list[Stage], out_dir: Path) -> None:
    """The domain x stage matrix (greedy and sampled at T=1): text, PNG and TensorBoard."""
    from megatron_ernie.posttrain.scoreboard import write_scoreboard

    for mode in ("greedy", "sampled"):
        board = board_from(manifest, stages, mode)
        if board:
            print(f"[pipeline] held-out mean reward ({mode}):", flush=True)
            write_scoreboard(board, out_dir / mode)


# ---------------------------------------------------------------- Slurm chain
def submit_chain(stages: list[Stage], dry_run: bool, manifest: Manifest | None = None,
                 force: list[str] = ()) -> dict[str, str]:
    """One sbatch per stage, each `afterok` on the stages it starts from; experts are separate jobs
    (Slurm refuses arrays of heterogeneous jobs). With --kill-on-invalid-dep a failed expert cancels
    OPD instead of letting it start without a teacher. Returns stage -> job id, and records each
    stage's job id and the ids it waits for in the manifest (status "submitted") so a user finds the
    jobs of a chain (squeue -j, sacct -j) from the pipeline directory."""
    ids: dict[str, str] = {}
    for stage in stages:
        slurm_world_check(stage)
    if manifest is not None and not dry_run:
        fresh = fresh_stages(stages, manifest, list(force))
        for stage in stages:
            if stage.name in fresh:
                start_over(stage)
    with tempfile.TemporaryDirectory(prefix="ernie-pipeline-") as scratch:
        for stage in stages:
            _submit_stage(stage, ids, dry_run, manifest, Path(scratch))
    return ids


def _dry_run_config(stage: Stage, scratch: Path) -> Path:
    """Where a dry run writes a stage's config for `ernie submit` to read: a scratch folder, since a
    dry run writes nothing under pipeline.dir (a cluster path such as /checkpoint/... that may not
    exist, or be writable, on the machine that renders the chain)."""
    path = scratch / stage.name / "stage.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(stage.config_text)
    return path


def _submit_stage(stage: Stage, ids: dict[str, str], dry_run: bool, manifest: Manifest | None,
                  scratch: Path) -> None:
    """sbatch one stage (or, with dry_run, print its script as the real submission would write it)."""
    config = _dry_run_config(stage, scratch) if dry_run else stage.write_config()
    deps = [ids[b] for b in stage.after if b in ids]
    command = [sys.executable, "-m", "megatron_ernie.launch.submit", stage.kind, "--config", str(config)]
    if deps and not dry_run:  # a dry run has no job ids: its scripts show the chain in their headers
        command += [f"--dependency=afterok:{':'.join(deps)}"]
    command += ["--dry-run"] if dry_run else ["--parsable"]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise StageFailed(f"submitting {stage.name} failed: {done.stderr.strip() or done.stdout.strip()}")
    ids[stage.name] = f"<{stage.name}>" if dry_run else done.stdout.strip()
    if manifest is not None and not dry_run:
        manifest.update(stage.name, status="submitted", job_id=ids[stage.name], after_jobs=deps,
                        input=stage.input, config_hash=stage.config_hash, config=str(stage.config_path),
                        output=str(stage.output), tasks=list(stage.tasks))
    script = done.stdout.replace(str(config), str(stage.config_path))  # the path the real job reads
    print(f"# ---- {stage.name} (after {', '.join(stage.after) or 'nothing'})\n{script}" if dry_run
          else f"[pipeline] {stage.name}: job {ids[stage.name]}", flush=True)


# ----------------------------------------------------------------------- main
def domains(stages: list[Stage]) -> tuple[str, ...]:
    """Every task any stage trains on, in order of first appearance (SFT's tasks cover them all)."""
    return tuple(dict.fromkeys(t for s in stages for t in s.tasks))


def describe(stages: list[Stage]) -> str:
    lines = [f"{'stage':<22} {'kind':<4} {'starts from':<40} output"]
    for s in stages:
        lines.append(f"{s.name:<22} {s.kind:<4} {(s.input or '(scratch)')[-40:]:<40} {s.output}")
    return "\n".join(lines)


def main(argv=None, scorer=None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        pipeline, home = load_pipeline(args.config, args.overrides)
        stages = plan(pipeline, home)  # every stage's config is built and validated here
        chosen = selected(stages, args.only)
        manifest = Manifest(Path(stages[0].run_dir).parent / "manifest.json")
        for stage in chosen:
            _check_inputs(stage, manifest, {s.name for s in chosen})
        if args.dry_run and not args.submit:
            print(describe(chosen))
            return 0
        if args.submit:
            submit_chain(chosen, args.dry_run, manifest, args.force)
            if not args.dry_run:
                print(f"[pipeline] submitted; job ids in {manifest.path}")
            return 0
        if scorer is None and pipeline.score.prompts:
            scorer = stage_scorer(pipeline.score, domains(stages), *eval_definitions(stages, manifest.path.parent))
        run_local(chosen, manifest, args.force, pipeline.parallel_experts, scorer)
        write_summary(manifest, stages, manifest.path.parent / "scoreboard")
    except ConfigError as err:
        print(f"ernie pipeline: config error: {err}", file=sys.stderr)
        return 2
    except (StageFailed, ValueError) as err:
        print(f"ernie pipeline: {err}", file=sys.stderr)
        return 1
    print(f"[pipeline] finished; manifest: {manifest.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
