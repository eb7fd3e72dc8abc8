"""`ernie rl` as a Slurm heterogeneous job: one het group per role, as slurm/rl_hetjob.sbatch renders it.

Four groups on the test cluster's four virtual nodes: trainer (1 task),
rollout (2 tasks), reward (1 task), controller (1 task). Each task finds its
role from ERNIE_HET_ROLES and its group; the trainer's torch world is its own
group; everyone finds the controller on the first node of its group. The
run is configs/rl_tiny_cpu.toml, shortened.
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


@pytest.fixture(scope="module")
def rl_job(slurm_cluster, tmp_path_factory):
    out = tmp_path_factory.mktemp("rl-hetjob")
    run_dir = out / "run"
    slurm = SlurmConfig(nodes=4, time="20:00", mem="", exclusive=False, mpi="none", log_dir=str(out),
                        trainer=GpuGroupConfig(nodes=1, gpus_per_node=1),
                        rollout=GpuGroupConfig(nodes=1, gpus_per_node=2),
                        reward=HetGroupConfig(nodes=1), controller=HetGroupConfig(nodes=1))
    command = shlex.join([sys.executable, "-m", "megatron_ernie.rl.main", "--config", str(CONFIG),
                          "--set", f'run.dir="{run_dir}"', "--set", f"train.iters={STEPS}", "--resume", "auto"])
    script = out / "rl.sbatch"
    script.write_text(render_job(slurm, JobSpec("rl", str(CONFIG), str(run_dir), command=command)))
    job_id = slurm_cluster.sbatch(script)
    info = slurm_cluster.wait(job_id, timeout=900)
    log = (out / f"ernie-{job_id}.out").read_text()
    metrics_path = run_dir / "rl" / "metrics.jsonl"
    metrics = [json.loads(line) for line in metrics_path.read_text().splitlines()] if metrics_path.exists() else []
    roles = json.loads((run_dir / "rl" / "roles.json").read_text()) if (run_dir / "rl" / "roles.json").exists() else []
    return info, log, metrics, roles


def test_every_role_runs_in_its_het_group_and_the_run_completes(rl_job):
    info, log, metrics, roles = rl_job
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log[-4000:]
    assert "roles trainer,rollout,reward,controller" in log
    assert sorted((r["role"], r["rank"]) for r in roles) == [("reward", 0), ("rollout", 0), ("rollout", 1),
                                                              ("trainer", 0)]
    assert [m["step"] for m in metrics] == list(range(1, STEPS + 1))
    assert metrics[-1]["rollout/alive_workers"] == 2
    assert all(m["routing/mismatch_used"] == 0.0 for m in metrics)
