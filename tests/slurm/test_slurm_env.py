"""Rank discovery inside real srun tasks, plain and heterogeneous (with mpi4py)."""

import json
from pathlib import Path

import pytest

from megatron_ernie.config.slurm import GpuGroupConfig, HetGroupConfig, SlurmConfig
from megatron_ernie.launch.render import JobSpec, render_job
from megatron_ernie.runtime.env import expand_hostlist

pytestmark = [pytest.mark.slurm, pytest.mark.slow]
PROBE = Path(__file__).with_name("probe.py")


def reports(out: Path) -> list[dict]:
    found = [json.loads(p.read_text()) for p in out.glob("rank*-run0.json")]
    return sorted(found, key=lambda r: r["rank"])


def test_srun_tasks_discover_rank_world_local_rank_and_master(slurm_cluster, tmp_path):
    slurm_cluster.run(["srun", "-N2", "--ntasks-per-node=2", "python3", str(PROBE), str(tmp_path)])
    got = reports(tmp_path)
    assert [r["rank"] for r in got] == [0, 1, 2, 3]
    assert [r["local_rank"] for r in got] == [0, 1, 0, 1]
    assert [r["node_rank"] for r in got] == [0, 0, 1, 1]
    assert {(r["world_size"], r["local_world_size"], r["launcher"]) for r in got} == {(4, 2, "slurm")}
    first_node = got[0]["host_node"]
    assert got[1]["host_node"] == first_node != got[2]["host_node"] == got[3]["host_node"]
    assert {r["master_addr"] for r in got} == {first_node}
    assert len({r["master_port"] for r in got}) == 1 and len({r["job_id"] for r in got}) == 1
    assert got[3]["torch_env"] == {"MASTER_ADDR": first_node, "MASTER_PORT": str(got[0]["master_port"]),
                                   "RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}


def het_job_config(log_dir: Path) -> SlurmConfig:
    """3 groups on 3 nodes: trainer 2 tasks, rollout 3 tasks, controller 1 task (reward left out)."""
    return SlurmConfig(nodes=3, time="5", signal_lead_s=60, mem="", exclusive=False, log_dir=str(log_dir),
                       trainer=GpuGroupConfig(nodes=1, gpus_per_node=2),
                       rollout=GpuGroupConfig(nodes=1, gpus_per_node=1, tasks_per_node=3),
                       reward=HetGroupConfig(nodes=0), controller=HetGroupConfig(nodes=1))


def test_rl_hetjob_ranks_know_role_and_mpi_spans_groups(slurm_cluster, tmp_path):
    job = JobSpec("rl", "/unused.toml", str(tmp_path / "run"), command=f"python3 {PROBE} {tmp_path} --mpi")
    script = tmp_path / "rl.sbatch"
    script.write_text(render_job(het_job_config(tmp_path), job))
    job_id = slurm_cluster.sbatch(script)
    info = slurm_cluster.wait(job_id, timeout=240)  # within the job's 5-minute limit
    assert info["JobState"] == "COMPLETED", slurm_cluster.diagnostics(info)
    got = reports(tmp_path)
    assert [(r["role"], r["het_group"], r["het_group_rank"], r["het_group_size"]) for r in got] == [
        ("trainer", 0, 0, 2), ("trainer", 0, 1, 2),
        ("rollout", 1, 0, 3), ("rollout", 1, 1, 3), ("rollout", 1, 2, 3),
        ("controller", 2, 0, 1)]
    assert {r["job_id"] for r in got} == {job_id}  # the leader's id in every group
    assert [r["mpi_rank"] for r in got] == [0, 1, 2, 3, 4, 5]
    assert {(r["mpi_size"], r["world_sum"], r["world_size"]) for r in got} == {(6, 6, 6)}
    assert [r["group_comm_size"] for r in got] == [2, 2, 3, 3, 3, 1] == [r["group_sum"] for r in got]
    assert [r["group_roles"] for r in got] == [[r["role"]] for r in got]
    nodes = {r["het_group"]: r["host_node"] for r in got}
    assert len(set(nodes.values())) == 3  # one node per group
    assert {r["master_addr"] for r in got} == {nodes[0]}
    assert [r["het_group_master_addr"] for r in got] == [nodes[r["het_group"]] for r in got]
    assert [r["local_rank"] for r in got] == [0, 1, 0, 1, 2, 0]


@pytest.mark.parametrize("hostlist", ["n[1-3,5],gpu-[01-02]", "r[1-2]n[08-10]", "a,b[7],c-[9-10]", "x[098-101]"])
def test_hostlist_expansion_matches_scontrol(slurm_cluster, hostlist):
    expected = slurm_cluster.run(["scontrol", "show", "hostnames", hostlist]).stdout.split()
    assert expand_hostlist(hostlist) == expected
