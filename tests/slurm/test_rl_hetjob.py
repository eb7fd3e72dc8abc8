"""`ernie rl` as a Slurm heterogeneous job: one het group per role, as slurm/rl_hetjob.sbatch renders it.

Four groups on the test cluster's four virtual nodes: trainer (1 task),
rollout (2 tasks), reward (1 task), controller (1 task). Each task finds its
role from ERNIE_HET_ROLES and its group; the trainer's torch world is its own
group; everyone finds the controller on the first node of its group. The
run is configs/rl_tiny_cpu.toml, shortened. A second job sets
rl.system.rollout_tensor = 2: the rollout group's two tasks then form one
tensor-parallel replica, whose world is the rollout group.
"""

import json
import shlex
import sys
from pathlib import Path

import pytest

from megatron_ernie.config.slurm import GpuGroupConfig, HetGroupConfig, SlurmConfig
from megatron_ernie.launch.render import JobSpec, render_job

pytestmark = [pytest.mark.slurm, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "rl_tiny_cpu.toml"
STEPS = 30


def run_rl_job(cluster, out: Path, steps: int, *overrides: str):
    """Submit the het job for `ernie rl` (4 groups, 2 rollout tasks); (scontrol record, log, metrics, roles)."""
    run_dir = out / "run"
    slurm = SlurmConfig(nodes=4, time="20:00", mem="", exclusive=False, mpi="none", log_dir=str(out),
                        trainer=GpuGroupConfig(nodes=1, gpus_per_node=1),
                        rollout=GpuGroupConfig(nodes=1, gpus_per_node=2),
                        reward=HetGroupConfig(nodes=1), controller=HetGroupConfig(nodes=1))
    sets = [arg for o in (f'run.dir="{run_dir}"', f"train.iters={steps}", *overrides) for arg in ("--set", o)]
    command = shlex.join([sys.executable, "-m", "megatron_ernie.rl.main", "--config", str(CONFIG), *sets,
                          "--resume", "auto"])
    script = out / "rl.sbatch"
    script.write_text(render_job(slurm, JobSpec("rl", str(CONFIG), str(run_dir), command=command)))
    job_id = cluster.sbatch(script)
    info = cluster.wait(job_id, timeout=900)
    log = (out / f"ernie-{job_id}.out").read_text()
    metrics_path = run_dir / "rl" / "metrics.jsonl"
    metrics = [json.loads(line) for line in metrics_path.read_text().splitlines()] if metrics_path.exists() else []
    roles = json.loads((run_dir / "rl" / "roles.json").read_text()) if (run_dir / "rl" / "roles.json").exists() else []
    return info, log, metrics, roles


@pytest.fixture(scope="module")
def rl_job(slurm_cluster, tmp_path_factory):
    return run_rl_job(slurm_cluster, tmp_path_factory.mktemp("rl-hetjob"), STEPS)


def test_every_role_runs_in_its_het_group_and_the_run_completes(rl_job):
    info, log, metrics, roles = rl_job
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log[-4000:]
    assert "roles trainer,rollout,reward,controller" in log
    assert sorted((r["role"], r["rank"]) for r in roles) == [("reward", 0), ("rollout", 0), ("rollout", 1),
                                                              ("trainer", 0)]
    assert [m["step"] for m in metrics] == list(range(1, STEPS + 1))
    assert metrics[-1]["rollout/alive_workers"] == 2
    assert all(m["routing/mismatch_used"] == 0.0 for m in metrics)


def test_rollout_group_forms_a_tensor_parallel_replica(slurm_cluster, tmp_path):
    """rl.system.rollout_tensor = 2: the rollout group's two tasks are one TP2 replica (its leader joins)."""
    info, log, metrics, roles = run_rl_job(slurm_cluster, tmp_path, 4, "rl.system.rollout_tensor=2",
                                           "rl.buffer.max_policy_lag=0")
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log[-4000:]
    assert sorted((r["role"], r["rank"]) for r in roles) == [("reward", 0), ("rollout", 0), ("trainer", 0)]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert metrics[-1]["rollout/alive_workers"] == 1
    assert all(m["policy/rollout_kl_k3"] < 1e-5 for m in metrics)
