"""The teacher role as a Slurm het group: rendering, submission checks, and a real het job on the test cluster.

The real job runs on the cluster's four virtual nodes as trainer (1 task),
rollout (1 task), teacher (2 tasks: two processes of one alias) and
controller (1 task; rewards scored inside it), the teachers serving alias "math"
of configs/opd_tiny_cpu.toml: self-distillation of a tiny
MoE whose initial checkpoint is also its teacher, for a few steps.
"""

import json
import shlex
import sys
from pathlib import Path

import pytest

from harness import torchrun
from megatron_ernie.config.slurm import GpuGroupConfig, HetGroupConfig, SlurmConfig
from megatron_ernie.launch.render import JobSpec, render_job
from megatron_ernie.launch.submit import main as submit

REPO = Path(__file__).resolve().parents[2]
OPD = REPO / "configs" / "opd_tiny_cpu.toml"
STEPS = 6


def test_dry_run_renders_the_teacher_group(capsys):
    assert submit(["rl", "--config", str(OPD), "--dry-run"]) == 0
    script = capsys.readouterr().out
    assert "export ERNIE_HET_ROLES=trainer,rollout,reward,teacher,controller" in script.splitlines()
    assert "srun --het-group=0-4 " in script
    teacher = script.split("# het group 3: teacher (1 nodes x 2 tasks)\n")[1].split("#SBATCH hetjob")[0]
    assert "#SBATCH --nodes=1" in teacher and "#SBATCH --ntasks-per-node=2" in teacher
    assert "#SBATCH --gpus-per-node=2" in teacher


@pytest.mark.parametrize("sets, field", [
    (["slurm.teacher.nodes=0", "slurm.nodes=4"], "slurm.teacher.nodes"),  # teachers declared, no group
    (["slurm.teacher.gpus_per_node=1", 'rl.distill.teachers={a="x", b="y", c="z"}'], "slurm.teacher.nodes"),
    (["rl.distill.teachers={}"], "slurm.teacher.nodes"),  # a group without teachers
])
def test_teacher_group_must_fit_the_aliases(capsys, sets, field):
    args = ["rl", "--config", str(OPD), "--dry-run"]
    for s in sets:
        args += ["--set", s]
    assert submit(args) == 2
    assert field in capsys.readouterr().err


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher-ckpt")
    case = {"run_dir": str(out / "base"), "overrides": ["model.init_method_std=0.1"]}
    torchrun(1, [REPO / "tests" / "dist" / "teacher_worker.py", "checkpoint", out / "result.json", json.dumps(case)],
             timeout=600)
    return json.loads((out / "result.json").read_text())["checkpoint"]


@pytest.mark.slurm
@pytest.mark.slow
def test_het_job_with_a_teacher_group_distils_and_completes(slurm_cluster, checkpoint, tmp_path):
    run_dir = tmp_path / "run"
    slurm = SlurmConfig(nodes=4, time="20:00", mem="", exclusive=False, mpi="none", log_dir=str(tmp_path),
                        trainer=GpuGroupConfig(nodes=1, gpus_per_node=1),
                        rollout=GpuGroupConfig(nodes=1, gpus_per_node=1),
                        reward=HetGroupConfig(nodes=0), teacher=GpuGroupConfig(nodes=1, gpus_per_node=2),
                        controller=HetGroupConfig(nodes=1))
    sets = [f'run.dir="{run_dir}"', f"train.iters={STEPS}", f'checkpoint.load="{checkpoint}"',
            f'rl.distill.teachers={{math="{checkpoint}"}}', "log.tensorboard=false",
            "checkpoint.save_on_exit=false", "rl.system.reward_workers=0"]
    command = shlex.join([sys.executable, "-m", "megatron_ernie.rl.main", "--config", str(OPD),
                          *[a for s in sets for a in ("--set", s)], "--resume", "auto"])
    script = tmp_path / "rl.sbatch"
    script.write_text(render_job(slurm, JobSpec("rl", str(OPD), str(run_dir), command=command)))
    job_id = slurm_cluster.sbatch(script)
    info = slurm_cluster.wait(job_id, timeout=900)
    log = (tmp_path / f"ernie-{job_id}.out").read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log[-4000:]
    assert "roles trainer,rollout,teacher,controller" in log
    roles = json.loads((run_dir / "rl" / "roles.json").read_text())
    assert sorted((r["role"], r["rank"]) for r in roles) == [("rollout", 0), ("teacher", 0), ("teacher", 1),
                                                              ("trainer", 0)]
    metrics = [json.loads(line) for line in (run_dir / "rl" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, STEPS + 1))
    assert all(m["teacher/math/task_arithmetic"] == 64 for m in metrics)  # every sample went through a teacher
    assert abs(metrics[0]["distill/math/k1"]) <= 0.01  # the student is its teacher at step 1
