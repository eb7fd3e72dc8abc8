"""`ernie submit`: rendering (no cluster needed), real submission, chains and bad input."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_ernie.config.slurm import parse_time_limit
from megatron_ernie.launch.submit import main

PROBE = Path(__file__).with_name("probe.py")

PRETRAIN_64 = """
[run]
dir = "{run}"
[slurm]
job_name = "pretrain-64n"
partition = "gpu"
account = "proj"
qos = "high"
time = "2-00:00:00"
nodes = 64
gpus_per_node = 8
cpus_per_task = 12
signal_lead_s = 600
env = ["NCCL_SOCKET_IFNAME=ib0", "NCCL_IB_HCA=mlx5"]
setup = ["source /opt/venv/bin/activate"]
extra_sbatch = ["--constraint=h100"]
[train]
global_batch_size = 512
micro_batch_size = 1
"""

RL_64 = """
[run]
dir = "{run}"
[slurm]
partition = "gpu"
time = "12:00:00"
nodes = 64
[slurm.trainer]
nodes = 32
[slurm.rollout]
nodes = 24
gpus_per_node = 4
[slurm.reward]
nodes = 7
partition = "cpu"
tasks_per_node = 16
cpus_per_task = 4
[slurm.controller]
partition = "cpu"
"""


def write_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.toml"
    path.write_text(text.format(run=tmp_path / "run"))
    return path


def sbatch_lines(script: str) -> list[str]:
    return [line for line in script.splitlines() if line.startswith("#SBATCH")]


def test_dry_run_renders_64_node_pretraining(tmp_path, capsys):
    config = write_config(tmp_path, PRETRAIN_64)
    assert main(["pretrain", "--config", str(config), "--dry-run", "--set", "train.iters=100",
                 "--set", "slurm.qos=urgent", "--set", "slurm.ernie='python -m megatron_ernie.cli'",
                 "--dependency", "afterok:41"]) == 0
    script = capsys.readouterr().out
    run = tmp_path / "run"
    assert sbatch_lines(script) == [
        "#SBATCH --job-name=pretrain-64n", "#SBATCH --partition=gpu", "#SBATCH --account=proj",
        "#SBATCH --qos=urgent", "#SBATCH --time=2-00:00:00", "#SBATCH --nodes=64",
        "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8", "#SBATCH --cpus-per-task=12",
        "#SBATCH --mem=0", "#SBATCH --exclusive", "#SBATCH --signal=B:USR1@600", "#SBATCH --requeue",
        "#SBATCH --open-mode=append", f"#SBATCH --output={run}/slurm/%x-%j.out",
        "#SBATCH --constraint=h100", "#SBATCH --dependency=afterok:41", "#SBATCH --kill-on-invalid-dep=yes"]
    srun = [line for line in script.splitlines() if line.startswith("srun ")]
    assert srun == [f"srun --kill-on-bad-exit=1 --cpu-bind=none python -m megatron_ernie.cli pretrain "
                    f"--config {config} --set run.dir={run} --set train.iters=100 --resume auto &"]
    for line in ("export NCCL_SOCKET_IFNAME=ib0", "export NCCL_IB_HCA=mlx5", "source /opt/venv/bin/activate",
                 "REQUEUE_EXIT=75", f"RUN_DIR={run}"):
        assert line in script.splitlines()
    assert "{{" not in script
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)  # valid shell


def test_dry_run_renders_rl_hetjob_groups(tmp_path, capsys):
    config = write_config(tmp_path, RL_64)
    assert main(["rl", "--config", str(config), "--dry-run"]) == 0
    script = capsys.readouterr().out
    groups = "\n".join(sbatch_lines(script)).split("#SBATCH hetjob")
    assert len(groups) == 4
    assert [[line for line in g.strip().splitlines() if "partition" in line or "nodes" in line
             or "tasks" in line or "gpus" in line or "cpus" in line] for g in groups] == [
        ["#SBATCH --partition=gpu", "#SBATCH --nodes=32", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8"],
        ["#SBATCH --partition=gpu", "#SBATCH --nodes=24", "#SBATCH --ntasks-per-node=4", "#SBATCH --gpus-per-node=4"],
        ["#SBATCH --partition=cpu", "#SBATCH --nodes=7", "#SBATCH --ntasks-per-node=16", "#SBATCH --cpus-per-task=4"],
        ["#SBATCH --partition=cpu", "#SBATCH --nodes=1", "#SBATCH --ntasks-per-node=1"]]
    assert "#SBATCH --signal=B:USR1@300" in groups[0] and "--signal" not in "".join(groups[1:])
    assert "export ERNIE_HET_ROLES=trainer,rollout,reward,controller" in script.splitlines()
    srun = [line for line in script.splitlines() if line.startswith("srun ")]
    assert srun == [f"srun --het-group=0-3 --mpi=pmix --kill-on-bad-exit=1 --cpu-bind=none ernie rl "
                    f"--config {config} --set run.dir={tmp_path / 'run'} --resume auto &"]
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)


@pytest.mark.parametrize("kind, overrides, message", [
    ("rl", ["slurm.nodes=60"], "slurm.nodes = 60: the het groups need 64 nodes (slurm.trainer.nodes=32 + "
                               "slurm.rollout.nodes=24 + slurm.reward.nodes=7 + slurm.controller.nodes=1)"),
    ("rl", ["slurm.controller.nodes=0"], "slurm.controller.nodes = 0: the controller needs at least one node"),
    ("rl", ["slurm.time='00:04:00'"], "slurm.signal_lead_s = 300: must be >= 0 and shorter than slurm.time"),
    ("rl", ["slurm.time='soon'"], "slurm.time = 'soon': use a Slurm time"),
    ("rl", ["slurm.nodez=3"], "slurm.nodez = 3: unknown key (did you mean 'nodes'?)"),
    ("rl", ["slurm.mpi='openmpi'"], "slurm.mpi = 'openmpi': use pmix (OpenMPI), pmi2 (MPICH) or none"),
    ("rl", ["rl.system.rollout_tensor=5"], "rl.system.rollout_tensor = 5: the rollout group runs 96 tasks "
                                           "(slurm.rollout.nodes=24 x 4 per node)"),
    ("pretrain", ["slurm.env='NCCL_DEBUG=INFO'"], "slurm.env = 'NCCL_DEBUG=INFO': "),
    ("pretrain", ["slurm.gpus_per_node=0"], "slurm.gpus_per_node = 0: must be at least 1"),
])
def test_bad_inputs_name_the_field(tmp_path, capsys, kind, overrides, message):
    config = write_config(tmp_path, RL_64)
    args = [kind, "--config", str(config), "--dry-run"]
    for override in overrides:
        args += ["--set", override]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("ernie submit: " + message), err


@pytest.mark.parametrize("text, seconds", [("90", 5400), ("5:30", 330), ("02:00:00", 7200),
                                           ("2-00:00:00", 172800), ("1-12", 129600), ("1-00:30", 88200)])
def test_parse_time_limit(text, seconds):
    assert parse_time_limit(text) == seconds


def test_bad_dependency_is_refused(tmp_path, capsys):
    config = write_config(tmp_path, PRETRAIN_64)
    assert main(["pretrain", "--config", str(config), "--dry-run", "--dependency", "afterok:abc"]) == 2
    assert "--dependency = 'afterok:abc': use Slurm's form" in capsys.readouterr().err


# ------------------------------------------------------------ real cluster
TINY = """
[run]
dir = "{run}"
[slurm]
job_name = "{name}"
nodes = 1
gpus_per_node = 1
time = "2"
signal_lead_s = 30
mem = ""
exclusive = false
"""


def ernie_submit(cluster, tmp_path: Path, name: str, *args: str) -> subprocess.CompletedProcess:
    config = tmp_path / f"{name}.toml"
    config.write_text(TINY.format(run=tmp_path / name, name=name))
    command = [sys.executable, "-m", "megatron_ernie.launch.submit", "pretrain", "--config", str(config), *args]
    return cluster.run(command, check=False, cwd=tmp_path)


@pytest.mark.slurm
@pytest.mark.slow
def test_submit_prints_job_id_and_log_and_job_completes(slurm_cluster, tmp_path):
    done = ernie_submit(slurm_cluster, tmp_path, "tiny", "--command", f"python3 {PROBE} {tmp_path}")
    assert done.returncode == 0, done.stderr
    job_id = re.search(r"submitted pretrain job (\d+) \(1 nodes x 1 GPUs\)", done.stdout).group(1)
    log = Path(re.search(r"log: +(\S+)", done.stdout).group(1))
    assert log == tmp_path / "tiny" / "slurm" / f"tiny-{job_id}.out"
    assert slurm_cluster.wait(job_id)["JobState"] == "COMPLETED"
    assert "tasks exited with code 0" in log.read_text()
    assert (tmp_path / "rank0-run0.json").exists()


@pytest.mark.slurm
@pytest.mark.slow
def test_afterok_chain_runs_in_order_and_cancels_after_failure(slurm_cluster, tmp_path):
    def submit(name, *args):
        done = ernie_submit(slurm_cluster, tmp_path, name, "--parsable", *args)
        assert done.returncode == 0 and done.stdout.strip().isdigit(), done.stderr
        return done.stdout.strip()

    first = submit("first", "--command", "sleep 1")
    second = submit("second", "--command", "true", "--dependency", f"afterok:{first}")
    broken = submit("broken", "--command", "false")
    never = submit("never", "--command", "true", "--dependency", f"afterok:{broken}")
    assert slurm_cluster.job(second)["Dependency"] == f"afterok:{first}(unfulfilled)"
    a, b = slurm_cluster.wait(first), slurm_cluster.wait(second)
    assert (a["JobState"], b["JobState"]) == ("COMPLETED", "COMPLETED")
    assert b["StartTime"] >= a["EndTime"]  # ISO timestamps compare in time order
    assert slurm_cluster.wait(broken)["JobState"] == "FAILED"
    assert slurm_cluster.wait(never)["JobState"] == "CANCELLED"  # --kill-on-invalid-dep=yes
    assert not (tmp_path / "never" / "slurm" / f"never-{never}.out").exists()


@pytest.mark.slurm
@pytest.mark.slow
def test_unknown_partition_is_refused_before_sbatch(slurm_cluster, tmp_path):
    done = ernie_submit(slurm_cluster, tmp_path, "nopart", "--set", "slurm.partition=gpu")
    assert done.returncode == 2
    assert ("slurm.partition = 'gpu': no such partition on this cluster; available: ['cpu', 'debug']"
            in done.stderr)
    assert not (tmp_path / "nopart" / "slurm").exists()


def test_dry_run_checks_the_layout_at_the_jobs_world_size(tmp_path, capsys):
    """64 nodes x 8 GPUs = 512 ranks: a global batch that does not split over the data-parallel
    ranks fails the job at start-up, so it must fail the submission before anything is queued."""
    from megatron_ernie.launch import submit

    config = write_config(tmp_path, PRETRAIN_64.replace("global_batch_size = 512", "global_batch_size = 100"))
    assert submit.main(["pretrain", "--config", str(config), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "global_batch_size" in err and "100" in err and "Traceback" not in err
