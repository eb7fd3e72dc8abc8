"""End to end on the real test cluster: `ernie submit pretrain` runs the real trainer.

Three launches of the same tiny pretraining (configs/tiny_cpu.toml, 12
iterations, PP2 x EP2 x DP2 on 4 gloo ranks) run side by side, so the
requeue delays of one overlap the work of the others:

* the reference: torchrun, 4 processes on this host;
* job A: 2 nodes x 2 tasks, uninterrupted;
* job B: the same job, interrupted twice.  Run 1 gets USR1 from
  ``scancel --signal=USR1 --batch`` (exactly what slurmctld sends before the
  time limit with ``--signal=B:USR1@lead``; a real limit is only checked
  every ~30 s, see test_slurm_requeue.py), so the trainer saves, exits 75 and
  the script requeues the job.  Run 2 loses rank 3 (the trainer and its
  checkpoint helper processes, as with a lost node) to ``kill -9`` after it
  saved a checkpoint of its own; the others are killed by
  ``--kill-on-bad-exit`` and the script requeues the job because ``latest``
  moved.  Run 3 resumes from ``latest`` and finishes.

Per-iteration losses are read back with TensorBoard's own EventAccumulator
and must equal the reference exactly (same ranks, same gloo reductions).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slurm, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "tiny_cpu.toml"
ITERS = 12
TRAIN = (f"train.iters={ITERS}", "train.eval_interval=6", "train.eval_iters=1", "parallel.pipeline=2",
         "checkpoint.keep_last=0")
ERNIE = f"{sys.executable} -m megatron_ernie.cli"
RUN_LINE = re.compile(r"job \d+ run (\d+) on ")
ITERATION = re.compile(r"iteration +(\d+)/\d+ +\|.*\| loss ([0-9.]+) \|")
SAVED = re.compile(r"saved checkpoint \S*/iter_(\d+)")
RESUMED = re.compile(r"resumed from \S*/iter_(\d+) at iteration (\d+)")


@dataclass
class JobResult:
    info: dict  # the final `scontrol show job` record
    runs: list  # the log split by run: run i's text at index i - 1
    run_dir: Path
    killed: int = 0  # job B: the iteration after which rank 3 was killed


def iterations(text: str) -> list[tuple[int, str]]:
    """(iteration, printed loss) for every iteration line of one run's log."""
    return [(int(i), loss) for i, loss in ITERATION.findall(text)]


def split_runs(log: str) -> list[str]:
    """The job log (appended to by every run) cut at the script's `run N` banner."""
    parts = RUN_LINE.split(log)  # [before, "1", text1, "2", text2, ...]
    return [parts[i + 1] for i in range(1, len(parts) - 1, 2)]


def tensorboard_scalars(run_dir: Path, tag: str) -> dict[int, float]:
    """step -> value as TensorBoard shows it (later runs replace the steps they repeat)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars(tag)}


def final_meta(run_dir: Path) -> dict:
    root = run_dir / "checkpoints"
    return json.loads((root / (root / "latest").read_text().strip() / "meta.json").read_text())


def submit(cluster, out: Path, name: str, *train: str) -> str:
    slurm = (f"slurm.job_name={name}", "slurm.nodes=2", "slurm.gpus_per_node=2", 'slurm.time="00:10:00"',
             "slurm.signal_lead_s=60", f"slurm.ernie={ERNIE}", f"run.dir={out / name}")
    args = [a for o in (*slurm, *TRAIN, *train) for a in ("--set", o)]
    done = cluster.run([sys.executable, "-m", "megatron_ernie.cli", "submit", "pretrain", "--config", str(CONFIG),
                        "--parsable", *args], check=False, cwd=out)
    assert done.returncode == 0 and done.stdout.strip().isdigit(), done.stderr
    return done.stdout.strip()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_reference(out: Path, env: dict) -> subprocess.Popen:
    args = [f"--set={o}" for o in (*TRAIN, f"run.dir={out / 'reference'}", "checkpoint.save_interval=0",
                                          "checkpoint.save_on_exit=false")]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=4", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", "-m", "megatron_ernie.cli", "pretrain", "--config", str(CONFIG), *args]
    env = {k: v for k, v in env.items() if not k.startswith("SLURM_")} | {"OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # its own process group: stop_process_group ends all 5


def stop_process_group(proc: subprocess.Popen) -> None:
    """End torchrun and its workers if a failure left them running."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


class LogWatch:
    """Polls one job's log until a condition on its runs holds."""

    def __init__(self, cluster, job_id: str, log: Path):
        self.cluster, self.job_id, self.log = cluster, job_id, log

    def runs(self) -> list[str]:
        return split_runs(self.log.read_text()) if self.log.exists() else []

    def until(self, what: str, condition, timeout: float = 600):
        deadline, ended = time.monotonic() + timeout, None
        while time.monotonic() < deadline and not ended:
            found = condition(self.runs())
            if found:
                return found
            ended = self.cluster.ended(self.job_id)
            time.sleep(0.1)
        raise AssertionError(f"job {self.job_id} (ended: {ended}): no {what} in {timeout} s; log:\n"
                             f"{self.log.read_text()[-4000:]}")


def job_processes(job_id: str, **slurm_vars) -> list[int]:
    """This host's processes of one job (Slurm's variables in their environment), e.g. rank=3."""
    want = {b"SLURM_JOB_ID=" + job_id.encode()}
    want |= {b"SLURM_%s=%d" % (key.upper().encode(), value) for key, value in slurm_vars.items()}
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and want <= set((proc / "environ").read_bytes().split(b"\0")):
                pids.append(int(proc.name))
        except OSError:  # ended meanwhile, or not ours to read
            continue
    return pids


def kill_task(job_id: str, rank: int, restart: int) -> None:
    """kill -9 a task and its helper processes (checkpoint writer manager), as a lost node would."""
    pids = [p for p in job_processes(job_id, procid=rank, restart_count=restart) if p != os.getpid()]
    assert pids, f"no process of task {rank} of job {job_id} run {restart + 1}"
    for pid in pids:
        os.kill(pid, signal.SIGKILL)


def end_leftovers(job_ids) -> list[str]:
    """Kill what the jobs left behind (nothing, if Slurm cleaned up); returns their command lines."""
    left = [p for job_id in job_ids for p in job_processes(job_id) if p != os.getpid()]
    described = []
    for pid in left:
        try:
            described.append(f"{pid}: {Path(f'/proc/{pid}/cmdline').read_bytes().replace(bytes(1), b' ')[:200]!r}")
        except OSError:
            described.append(str(pid))
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:  # it ended between the listing and now
            described.pop()
    return described


def interrupt_job_b(watch: LogWatch) -> int:
    """USR1 in run 1 after its first iteration; kill -9 of rank 3 in run 2 after its own checkpoint."""
    watch.until("an iteration in run 1", lambda runs: runs and iterations(runs[0]))
    watch.cluster.run(["scancel", "--signal=USR1", "--batch", watch.job_id])

    def after_own_checkpoint(runs):
        if len(runs) < 2:
            return None
        saves = [int(s) for s in SAVED.findall(runs[1])]
        assert not saves or saves[0] < ITERS, f"run 2 reached the end before it could be killed:\n{runs[1]}"
        later = [i for i, _ in iterations(runs[1]) if saves and i > saves[0]]
        return later[-1] if later else None

    killed = watch.until("checkpoint and a further iteration in run 2", after_own_checkpoint)
    kill_task(watch.job_id, rank=3, restart=1)
    return killed


@pytest.fixture(scope="module")
def jobs(slurm_cluster, data_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("pretrain-slurm")
    env = {**slurm_cluster.env, "ERNIE_DATA_CACHE": data_cache}
    cluster = type(slurm_cluster)(slurm_cluster.dir, env)
    reference, job_ids = start_reference(out, env), []
    try:
        job_a = submit(cluster, out, "a", "checkpoint.save_interval=0")
        job_b = submit(cluster, out, "b", "checkpoint.save_interval=4")
        job_ids += [job_a, job_b]
        killed = interrupt_job_b(LogWatch(cluster, job_b, out / "b" / "slurm" / f"b-{job_b}.out"))
        results = {}
        for name, job_id in (("a", job_a), ("b", job_b)):
            info = cluster.wait(job_id, timeout=600)
            log = (out / name / "slurm" / f"{name}-{job_id}.out").read_text()
            results[name] = JobResult(info, split_runs(log), out / name, killed if name == "b" else 0)
        stdout, _ = reference.communicate(timeout=600)
    finally:
        stop_process_group(reference)
        for job_id in job_ids:
            cluster.run(["scancel", job_id], check=False)
        results_left = end_leftovers(job_ids)
    assert not results_left, f"processes of jobs {job_ids} outlived them: {results_left}"
    assert reference.returncode == 0, stdout[-6000:]
    results["reference"] = JobResult({}, [stdout], out / "reference")
    return results


def test_reference_trains_every_iteration_once(jobs):
    ref = jobs["reference"]
    assert [i for i, _ in iterations(ref.runs[0])] == list(range(1, ITERS + 1))
    losses = tensorboard_scalars(ref.run_dir, "train/loss")
    assert sorted(losses) == list(range(1, ITERS + 1))
    assert losses[ITERS] < losses[1] - 0.5  # it learns: 7.6 -> ~6.9 in 12 steps


def test_two_node_job_matches_torchrun(jobs):
    a, ref = jobs["a"], jobs["reference"]
    assert (a.info["JobState"], a.info["Restarts"], a.info["ExitCode"], a.info["NumNodes"]) == (
        "COMPLETED", "0", "0:0", "2")
    assert len(a.runs) == 1 and "tasks exited with code 0" in a.runs[0]
    assert [i for i, _ in iterations(a.runs[0])] == list(range(1, ITERS + 1))
    for tag in ("train/loss", "eval/loss", "train/grad_norm"):
        assert tensorboard_scalars(a.run_dir, tag) == tensorboard_scalars(ref.run_dir, tag), tag
    assert final_meta(a.run_dir)["iteration"] == ITERS


def test_usr1_saves_exits_75_and_the_requeued_run_continues(jobs):
    b = jobs["b"]
    first = iterations(b.runs[0])
    stopped = first[-1][0]
    assert [i for i, _ in first] == list(range(1, stopped + 1)) and 1 <= stopped < ITERS
    assert SAVED.findall(b.runs[0]) == [f"{stopped:07d}"], b.runs[0][-3000:]  # the save USR1 asked for
    assert b.runs[0].count(f"stop signal received: saving at iteration {stopped} ") == 4  # every rank agreed
    assert "USR1: time limit near" in b.runs[0] and "requeueing job" in b.runs[0]
    # The first rank to exit reports 75; srun --kill-on-bad-exit may end the others (143) as it does.
    assert re.search(r"srun: error: n\d: tasks? [\d,-]+: Exited with exit code 75", b.runs[0]), b.runs[0][-3000:]
    assert RESUMED.search(b.runs[1]).groups() == (f"{stopped:07d}", str(stopped))
    assert iterations(b.runs[1])[0][0] == stopped + 1  # nothing lost, nothing repeated


def test_killed_run_is_requeued_and_resumes_from_latest(jobs):
    b, ref = jobs["b"], jobs["reference"]
    assert (b.info["JobState"], b.info["Restarts"], b.info["ExitCode"]) == ("COMPLETED", "2", "0:0")
    saved = int(SAVED.findall(b.runs[1])[0])
    second = dict(iterations(b.runs[1]))
    assert max(second) >= b.killed > saved
    assert "tasks failed with code" in b.runs[1] and "requeueing job" in b.runs[1]
    assert RESUMED.search(b.runs[2]).groups() == (f"{saved:07d}", str(saved))
    third = dict(iterations(b.runs[2]))
    assert sorted(third) == list(range(saved + 1, ITERS + 1))
    repeated = sorted(set(second) & set(third))
    assert repeated and all(second[i] == third[i] for i in repeated)  # redone after the kill, same numbers
    assert final_meta(b.run_dir)["iteration"] == ITERS
    assert tensorboard_scalars(b.run_dir, "train/loss") == tensorboard_scalars(ref.run_dir, "train/loss")
