"""Rank discovery from plain dicts (megatron_ernie.runtime.env.discover is pure).

The Slurm dicts copy what real srun tasks of Slurm 22.05 get (tests/slurm/
checks the same on a live cluster).
"""

import pytest

from megatron_ernie.config.errors import ConfigError
from megatron_ernie.runtime.env import (
    DistEnv,
    discover,
    expand_hostlist,
    expand_tasks_per_node,
    export_torch_env,
    torch_env,
)


@pytest.mark.parametrize("hostlist, hosts", [
    ("n1", ["n1"]),
    ("n[1-3,5],gpu-[01-02]", ["n1", "n2", "n3", "n5", "gpu-01", "gpu-02"]),
    ("node[008-011]", ["node008", "node009", "node010", "node011"]),
    ("r[1-2]n[1-2]", ["r1n1", "r1n2", "r2n1", "r2n2"]),
    ("a,b[7],c-[9-10]", ["a", "b7", "c-9", "c-10"]),
])
def test_expand_hostlist(hostlist, hosts):
    assert expand_hostlist(hostlist) == hosts


@pytest.mark.parametrize("bad", ["n[1-3", "n[3-1]", "n[a-b]", "n[[1]]"])
def test_bad_hostlist_is_named(bad):
    with pytest.raises(ConfigError, match="hostlist"):
        expand_hostlist(bad)


def test_expand_tasks_per_node():
    assert expand_tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    assert expand_tasks_per_node("8") == [8]
    with pytest.raises(ConfigError, match="SLURM_STEP_TASKS_PER_NODE"):
        expand_tasks_per_node("2x3")


def test_torchrun():
    env = discover({"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4",
                    "GROUP_RANK": "1", "MASTER_ADDR": "host-a", "MASTER_PORT": "29400",
                    "TORCHELASTIC_RUN_ID": "x", "SLURM_PROCID": "1", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "2"})
    assert env == DistEnv(rank=5, world_size=8, local_rank=1, local_world_size=4, master_addr="host-a",
                          master_port=29400, launcher="torchrun", node_rank=1, het_group=None,
                          het_group_rank=5, het_group_size=8, het_group_master_addr="host-a")


def slurm_env(**extra):
    """Task 3 of `srun -N2 --ntasks-per-node=2` in job 1234 on gpu-[07-08]."""
    return {"SLURM_JOB_ID": "1234", "SLURM_STEP_ID": "0", "SLURM_PROCID": "3", "SLURM_NTASKS": "4",
            "SLURM_LOCALID": "1", "SLURM_NODEID": "1", "SLURM_STEP_NODELIST": "gpu-[07-08]",
            "SLURM_JOB_NODELIST": "gpu-[07-08]", "SLURM_STEP_TASKS_PER_NODE": "2(x2)", **extra}


def test_slurm_task():
    env = discover(slurm_env())
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size, env.node_rank) == (3, 4, 1, 2, 1)
    assert (env.master_addr, env.master_port, env.launcher, env.job_id) == ("gpu-07", 21234, "slurm", "1234")
    assert torch_env(env) == {"MASTER_ADDR": "gpu-07", "MASTER_PORT": "21234", "RANK": "3", "WORLD_SIZE": "4",
                              "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}


def test_slurm_uneven_layout_and_explicit_master():
    env = discover(slurm_env(SLURM_PROCID="2", SLURM_NTASKS="3", SLURM_LOCALID="0",
                             SLURM_STEP_TASKS_PER_NODE="2,1", MASTER_ADDR="10.0.0.1", MASTER_PORT="6000"))
    assert (env.rank, env.local_world_size, env.master_addr, env.master_port) == (2, 1, "10.0.0.1", 6000)


def test_batch_script_itself_is_a_single_process():
    env = discover({"SLURM_JOB_ID": "9", "SLURM_PROCID": "0", "SLURM_NTASKS": "16"})  # no step id
    assert (env.launcher, env.rank, env.world_size, env.job_id) == ("single", 0, 1, "9")


def het_env(procid: int, **extra):
    """A task of `srun --het-group=0,1,2` in a 3-group job: 4 + 2 + 1 tasks on n[1-2], n3, n4."""
    return {"SLURM_JOB_ID": "77", "SLURM_STEP_ID": "0", "SLURM_PROCID": str(procid), "SLURM_NTASKS": "7",
            "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_STEP_NODELIST": "n[1-4]",
            "SLURM_STEP_TASKS_PER_NODE": "2(x3),1", "SLURM_HET_SIZE": "3",
            "SLURM_JOB_NODELIST_HET_GROUP_0": "n[1-2]", "SLURM_JOB_NODELIST_HET_GROUP_1": "n3",
            "SLURM_JOB_NODELIST_HET_GROUP_2": "n4", "SLURM_NTASKS_HET_GROUP_0": "4",
            "SLURM_NTASKS_HET_GROUP_1": "2", "SLURM_NTASKS_HET_GROUP_2": "1",
            "ERNIE_HET_ROLES": "trainer,rollout,controller", **extra}


@pytest.mark.parametrize("procid, group, group_rank, group_size, role, group_master", [
    (0, 0, 0, 4, "trainer", "n1"), (3, 0, 3, 4, "trainer", "n1"), (4, 1, 0, 2, "rollout", "n3"),
    (5, 1, 1, 2, "rollout", "n3"), (6, 2, 0, 1, "controller", "n4")])
def test_het_step_spanning_groups(procid, group, group_rank, group_size, role, group_master):
    env = discover(het_env(procid))
    assert (env.het_group, env.het_group_rank, env.het_group_size, env.role) == (group, group_rank, group_size, role)
    assert (env.rank, env.world_size, env.master_addr, env.het_group_master_addr) == (procid, 7, "n1", group_master)
    inner = env.within_group()
    assert (inner.rank, inner.world_size, inner.master_addr, inner.master_port) == (
        group_rank, group_size, group_master, 20077 + 1 + group)


def test_het_step_master_is_first_host_of_first_group_not_of_sorted_list():
    # group 0 got n3, group 1 got n1: rank 0 (group 0) runs on n3
    env = discover(het_env(0, SLURM_STEP_NODELIST="n[1,3]", SLURM_STEP_TASKS_PER_NODE="1,2", SLURM_NTASKS="3",
                           SLURM_HET_SIZE="2", SLURM_JOB_NODELIST_HET_GROUP_0="n3",
                           SLURM_JOB_NODELIST_HET_GROUP_1="n1"))
    assert (env.master_addr, env.het_group, env.het_group_size) == ("n3", 0, 2)


def test_het_step_on_one_group_numbers_inside_it():
    """`srun --het-group=1`: Slurm rewrites the step's node list to the group's."""
    env = discover(het_env(1, SLURM_NTASKS="2", SLURM_STEP_NODELIST="n3", SLURM_JOB_NODELIST="n3",
                           SLURM_STEP_TASKS_PER_NODE="2", SLURM_LOCALID="1"))
    assert (env.het_group, env.het_group_rank, env.het_group_size, env.role, env.master_addr) == (
        1, 1, 2, "rollout", "n3")


def test_het_step_with_fewer_tasks_than_allocated():
    """`srun -n1 --het-group=0 a : -n1 --het-group=1 b`: SLURM_NTASKS_HET_GROUP_k still say 4 and 2."""
    env = discover(het_env(1, SLURM_NTASKS="2", SLURM_STEP_NODELIST="n[1,3]", SLURM_STEP_TASKS_PER_NODE="1(x2)"))
    assert (env.het_group, env.het_group_rank, env.het_group_size, env.role) == (1, 0, 1, "rollout")


def test_explicit_role_wins():
    assert discover(het_env(6, ERNIE_ROLE="reward")).role == "reward"
    assert discover(slurm_env(ERNIE_HET_ROLES="trainer")).role == "trainer"
    assert discover(slurm_env(ERNIE_HET_ROLES="trainer,rollout")).role is None  # no group: ambiguous


def test_openmpi_mpirun():
    env = discover({"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "0",
                    "OMPI_COMM_WORLD_LOCAL_SIZE": "2", "ERNIE_ROLE": "rollout"})
    assert (env.launcher, env.rank, env.world_size, env.local_rank, env.local_world_size, env.role) == (
        "mpi", 2, 4, 0, 2, "rollout")
    assert env.master_addr is None
    with pytest.raises(ConfigError, match="MASTER_ADDR = None: an mpirun start"):
        torch_env(env)


def test_mpich_hydra_with_master():
    env = discover({"PMI_RANK": "1", "PMI_SIZE": "2", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "2",
                    "MASTER_ADDR": "h0", "MASTER_PORT": "7000"})
    assert (env.launcher, env.rank, env.master_addr, env.master_port) == ("mpi", 1, "h0", 7000)


def test_srun_mpi_keeps_slurm_view_but_mpirun_inside_allocation_does_not():
    under_srun = discover(slurm_env(PMI_RANK="3", PMI_SIZE="4"))
    assert (under_srun.launcher, under_srun.rank) == ("slurm", 3)
    # mpirun's daemons are srun tasks (one per node): SLURM_PROCID is the node's index
    under_mpirun = discover(slurm_env(SLURM_PROCID="1", SLURM_NTASKS="2", SLURM_LOCALID="0",
                                      SLURM_STEP_TASKS_PER_NODE="1(x2)", OMPI_COMM_WORLD_RANK="3",
                                      OMPI_COMM_WORLD_SIZE="4"))
    assert (under_mpirun.launcher, under_mpirun.rank, under_mpirun.world_size) == ("mpi", 3, 4)


def test_single_process():
    env = discover({})
    assert env == DistEnv(rank=0, world_size=1, local_rank=0, local_world_size=1, master_addr="127.0.0.1",
                          master_port=29500, launcher="single", het_group_master_addr="127.0.0.1")
    target = {}
    assert export_torch_env(env, target) == target and target["WORLD_SIZE"] == "1"


@pytest.mark.parametrize("environ, message", [
    ({"RANK": "4", "WORLD_SIZE": "4", "MASTER_ADDR": "h"}, r"RANK = 4: must be in \[0, WORLD_SIZE=4\)"),
    ({"RANK": "x", "WORLD_SIZE": "4"}, "RANK = 'x': must be an integer"),
    ({"RANK": "1", "WORLD_SIZE": "2"}, "MASTER_ADDR = None: set it"),
    ({"RANK": "0", "WORLD_SIZE": "0"}, "WORLD_SIZE = 0: must be at least 1"),
    (slurm_env(SLURM_PROCID="4"), r"SLURM_PROCID = 4: must be in \[0, SLURM_NTASKS=4\)"),
    (slurm_env(SLURM_LOCALID="2"), "SLURM_LOCALID = 2"),
    (slurm_env(SLURM_STEP_TASKS_PER_NODE="2(x3)"), "lists 3 nodes but the node list 'gpu-\\[07-08\\]' has 2"),
    (slurm_env(SLURM_STEP_TASKS_PER_NODE="1(x2)"), "adds up to 2, not SLURM_NTASKS=4"),
    (het_env(0, SLURM_JOB_NODELIST_HET_GROUP_1="n[2-3]"), "each node of the step must belong to exactly one"),
    (het_env(6, ERNIE_HET_ROLES="trainer,rollout"), "names 2 roles but this task is in het group 2"),
    ({"OMPI_COMM_WORLD_RANK": "5", "OMPI_COMM_WORLD_SIZE": "2"}, "OMPI_COMM_WORLD_RANK = 5"),
])
def test_bad_environment_is_named(environ, message):
    with pytest.raises(ConfigError, match=message):
        discover(environ)
