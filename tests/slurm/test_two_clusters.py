"""Two test clusters on one host (.ci/slurm_cluster.sh) are independent (issue: `stop` removed the
shared /etc/hosts line another cluster still needed, and both clusters numbered jobs from 1, so the
ports jobs derive from their id collided).

Each cluster gets its own slot: its own hosts line, daemon ports and first job id (so the job-derived
ports of runtime/env.py differ). A second, 2-node cluster is started beside the session's, runs a
job, and is stopped; the session's cluster still resolves its node names and runs a job after that.
"""

import re
import subprocess
from pathlib import Path

import pytest

from conftest import SCRIPT, _read_env_sh

pytestmark = pytest.mark.slurm


def _script(action: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), action], capture_output=True, text=True, timeout=300, env=env)


def _hosts_lines(directory: Path) -> list[str]:
    tag = f"# ernie-slurm-test {directory}"
    return [line for line in Path("/etc/hosts").read_text().splitlines() if line.endswith(tag)]


def _slurm_value(conf: Path, key: str) -> str:
    return re.search(rf"^{key}=(\S+)$", conf.read_text(), re.M).group(1)


def _run_job(env: dict, out: Path) -> str:
    """sbatch a one-line job on the cluster of `env`; its id once it COMPLETED."""
    job = subprocess.run(["sbatch", "--parsable", "-o", str(out), "--wrap", "getent hosts n2 && echo ok"],
                         env=env, capture_output=True, text=True, check=True, timeout=60).stdout.strip()
    for _ in range(240):
        state = subprocess.run(["scontrol", "show", "job", job], env=env, capture_output=True, text=True).stdout
        if "JobState=COMPLETED" in state or "JobState=FAILED" in state:
            break
        subprocess.run(["sleep", "0.5"])
    assert "JobState=COMPLETED" in state, state + (out.read_text() if out.exists() else "")
    return job


def test_a_second_cluster_runs_beside_the_first_and_stops_alone(slurm_cluster, tmp_path):
    second_dir = tmp_path / "c2"
    env = {**slurm_cluster.env, "ERNIE_SLURM_DIR": str(second_dir), "ERNIE_SLURM_NODES": "2"}
    env.pop("SLURM_CONF", None)
    started = _script("start", env)
    try:
        assert started.returncode == 0, started.stderr[-3000:]
        second_env = {**env, **_read_env_sh(second_dir / "env.sh")}
        first_conf, second_conf = slurm_cluster.dir / "etc" / "slurm.conf", second_dir / "etc" / "slurm.conf"
        assert _slurm_value(first_conf, "SlurmctldPort") != _slurm_value(second_conf, "SlurmctldPort")
        first_id = int(_slurm_value(second_conf, "FirstJobId"))
        assert first_id > 1
        assert len(_hosts_lines(second_dir)) == 1
        job = _run_job(second_env, tmp_path / "second.out")
        assert int(job) >= first_id  # job-derived ports come from this cluster's own range
    finally:
        stopped = _script("stop", env)
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    assert _hosts_lines(second_dir) == []  # its own line is gone ...
    assert subprocess.run(["getent", "hosts", "n2"], capture_output=True).returncode == 0  # ... the names stay
    _run_job(slurm_cluster.env, tmp_path / "first.out")  # and the session's cluster still works
    assert "ok" in (tmp_path / "first.out").read_text()
