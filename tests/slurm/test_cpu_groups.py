"""`ernie submit rl` for CPU-only clusters: trainer, rollout and teacher groups with gpus_per_node = 0
(issue: they required >= 1 although the RL config runs on CPU).

A CPU model group asks Slurm for no GPU and one task per node, and the job lists it in
ERNIE_CPU_ROLES; its tasks then hide every GPU before torch looks, so torch picks gloo and host
memory even on a node that has GPUs this group was not given. Checked by rendering, and on the
test cluster (whose nodes do have count-only GPUs) by a het job whose tasks report what they see.
"""

import json
import shlex
import sys
from pathlib import Path

import pytest

from megatron_ernie.config.slurm import GpuGroupConfig, HetGroupConfig, SlurmConfig
from megatron_ernie.launch.render import JobSpec, render_job
from megatron_ernie.launch.submit import main as submit

REPO = Path(__file__).resolve().parents[2]
CPU_RL = """
[run]
dir = "{run}"
[slurm]
partition = "cpu"
nodes = 4
mem = ""
exclusive = false
[slurm.trainer]
gpus_per_node = 0
tasks_per_node = 2
[slurm.rollout]
gpus_per_node = 0
[slurm.reward]
nodes = 1
[slurm.controller]
nodes = 1
"""

# What a task of the job reports: its role (as ernie rl finds it), the GPUs it sees and its backend.
REPORT = """
import json, os, sys
from megatron_ernie.rl.main import _hide_gpus_from_cpu_role, _role_from_env, build_parser
role, rank, _ = _role_from_env(build_parser().parse_args([]))
_hide_gpus_from_cpu_role(role)
from megatron_ernie.runtime.distributed import backend
out = {"role": role, "rank": rank, "cuda_visible": os.environ.get("CUDA_VISIBLE_DEVICES"), "backend": backend()}
open(os.path.join(sys.argv[1], f"{role}-{rank}.json"), "w").write(json.dumps(out))
"""


def test_cpu_model_groups_render_without_gpus(tmp_path, capsys):
    config = tmp_path / "rl.toml"
    config.write_text(CPU_RL.format(run=tmp_path / "run"))
    assert submit(["rl", "--config", str(config), "--dry-run"]) == 0
    script = capsys.readouterr().out
    groups = script.split("\n#SBATCH hetjob\n")
    assert len(groups) == 4
    assert "--gpus-per-node" not in script
    assert "#SBATCH --ntasks-per-node=2" in groups[0]  # trainer: tasks_per_node
    assert "#SBATCH --ntasks-per-node=1" in groups[1]  # rollout: one task per CPU node
    assert all("#SBATCH --partition=cpu" in g for g in groups)
    assert "export ERNIE_CPU_ROLES=trainer,rollout  # model roles on CPU-only nodes: gloo, no GPU" in script


def test_gpu_groups_list_no_cpu_roles(tmp_path, capsys):
    config = tmp_path / "rl.toml"
    config.write_text(CPU_RL.format(run=tmp_path / "run").replace("gpus_per_node = 0", "gpus_per_node = 2"))
    assert submit(["rl", "--config", str(config), "--dry-run"]) == 0
    script = capsys.readouterr().out
    assert "export ERNIE_CPU_ROLES" not in script and script.count("#SBATCH --gpus-per-node=2") == 2


@pytest.mark.slurm
def test_cpu_groups_see_no_gpu_and_use_gloo_on_the_cluster(slurm_cluster, tmp_path):
    """Trainer on CPU (2 tasks), rollout on a GPU, reward and controller: each task reports."""
    slurm = SlurmConfig(nodes=4, time="10:00", mem="", exclusive=False, mpi="none", log_dir=str(tmp_path),
                        trainer=GpuGroupConfig(nodes=1, gpus_per_node=0, tasks_per_node=2),
                        rollout=GpuGroupConfig(nodes=1, gpus_per_node=1),
                        reward=HetGroupConfig(nodes=1), controller=HetGroupConfig(nodes=1))
    command = shlex.join([sys.executable, "-c", REPORT, str(tmp_path)])
    script = tmp_path / "report.sbatch"
    script.write_text(render_job(slurm, JobSpec("rl", "", str(tmp_path / "run"), command=command)))
    job_id = slurm_cluster.sbatch(script)
    info = slurm_cluster.wait(job_id, timeout=300)
    assert info["JobState"] == "COMPLETED", slurm_cluster.diagnostics(info)
    seen = {p.stem: json.loads(p.read_text()) for p in tmp_path.glob("*-*.json")}
    assert sorted(seen) == ["controller-0", "reward-0", "rollout-0", "trainer-0", "trainer-1"]
    for name in ("trainer-0", "trainer-1"):
        assert seen[name]["cuda_visible"] == "" and seen[name]["backend"] == "gloo", seen
    assert seen["rollout-0"]["cuda_visible"] in ("0", "1")  # the GPU group keeps the GPU Slurm gave it
