"""Single-node launchers: launch/pretrain.sh (torchrun) and launch/rl_local.sh (mpirun MPMD)."""

import json
import os
import subprocess
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow]
PROBE = Path(__file__).with_name("probe.py")
REPO = Path(__file__).resolve().parents[2]


def reports(out: Path) -> list[dict]:
    return sorted((json.loads(p.read_text()) for p in out.glob("rank*-run0.json")), key=lambda r: r["rank"])


def plain_node_env(**extra) -> dict:
    """This process's environment without Slurm's variables, and the repo importable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    pythonpath = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return {**env, "PYTHONPATH": pythonpath, **extra}


def test_pretrain_sh_starts_one_torchrun_process_per_rank(tmp_path):
    env = plain_node_env(NPROC="2", ERNIE=f"python3 {PROBE} {tmp_path}")
    subprocess.run([str(REPO / "launch" / "pretrain.sh"), "cfg.toml", "--set", "train.iters=3"],
                   env=env, check=True, capture_output=True, timeout=120)
    got = reports(tmp_path)
    assert [(r["launcher"], r["rank"], r["world_size"], r["local_rank"]) for r in got] == [
        ("torchrun", 0, 2, 0), ("torchrun", 1, 2, 1)]
    assert got[0]["argv"] == ["pretrain", "--config", "cfg.toml", "--set", "train.iters=3", "--resume", "auto"]


def test_rl_local_sh_gives_each_role_its_group_and_gpus(slurm_cluster, tmp_path):
    """slurm_cluster for its MPI install and Open MPI settings; no Slurm job here."""
    mpi = {k: v for k, v in slurm_cluster.env.items() if k.startswith("OMPI_")}
    env = plain_node_env(**mpi, TRAINER_GPUS="2", ROLLOUT_GPUS="1", REWARD_WORKERS="1",
                         MPIRUN_ARGS="--oversubscribe", ERNIE=f"python3 {PROBE} {tmp_path} --mpi")
    subprocess.run([str(REPO / "launch" / "rl_local.sh"), "rl.toml"], env=env, check=True,
                   capture_output=True, timeout=120)
    got = reports(tmp_path)
    assert [(r["role"], r["het_group"], r["het_group_rank"], r["het_group_size"]) for r in got] == [
        ("trainer", 0, 0, 2), ("trainer", 0, 1, 2), ("rollout", 1, 0, 1), ("reward", 2, 0, 1),
        ("controller", 3, 0, 1)]
    assert [r["cuda_visible_devices"] for r in got] == ["0,1", "0,1", "2", "", ""]
    assert [r["local_rank"] for r in got] == [0, 1, 0, 0, 0]  # GPU index within the role's devices
    assert {(r["launcher"], r["mpi_size"], r["world_sum"]) for r in got} == {("mpi", 5, 5)}
    assert [r["group_sum"] for r in got] == [2, 2, 1, 1, 1]
    assert len({(r["master_addr"], r["master_port"]) for r in got}) == 1
    assert got[0]["argv"] == ["rl", "--config", "rl.toml", "--resume", "auto"]
