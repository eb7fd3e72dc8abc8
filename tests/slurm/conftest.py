"""A real Slurm cluster for the tests in this folder (no mocks).

``slurm_cluster`` (session scope) installs Slurm + MPI if missing and starts
the one-host cluster of .ci/slurm_cluster.sh (4 virtual nodes n1..n4, each 4
CPUs and 2 count-only GPUs, partitions ``debug`` (default) and ``cpu``); it
stops it at the end if it started it.  A test uses:

* ``cluster.env``: the environment for sbatch/srun/ernie (SLURM_CONF, Open MPI
  loopback settings, PYTHONPATH=repo); sbatch passes it on to the jobs;
* ``cluster.run(args)``, ``cluster.sbatch(path)``, ``cluster.wait(job_id)``,
  ``cluster.job(job_id)`` (``scontrol show job`` as a dict; no sacct here),
  ``cluster.ended(job_id)`` (the final state, or None while it runs or waits).

Jobs run on this host, so a test's tmp_path is visible to its tasks.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / ".ci" / "slurm_cluster.sh"
DONE_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED"}


def _read_env_sh(path: Path) -> dict[str, str]:
    env = {}
    for line in path.read_text().splitlines():
        if line.startswith("export "):
            key, _, value = line[len("export "):].partition("=")
            env[key] = value
    return env


@dataclass
class SlurmCluster:
    dir: Path
    env: dict[str, str]

    def run(self, args, check=True, **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(args, env=self.env, capture_output=True, text=True, check=check,
                              timeout=kwargs.pop("timeout", 120), **kwargs)

    def sbatch(self, script: Path) -> str:
        return self.run(["sbatch", "--parsable", str(script)]).stdout.strip().split(";")[0]

    def job(self, job_id: str, attempts: int = 5) -> dict[str, str]:
        """`scontrol show job -o` as key -> value (the first het component for het jobs).

        On a loaded 2-core host slurmctld sometimes drops a client's connection
        and scontrol dies of SIGPIPE; that says nothing about the job, so the
        query is retried a few times before it counts as a failure.
        """
        for attempt in range(attempts):
            done = self.run(["scontrol", "show", "job", "-o", job_id], check=attempt == attempts - 1)
            if done.returncode == 0:
                break
            time.sleep(1.0)
        line = done.stdout.splitlines()[0]
        return dict(item.split("=", 1) for item in line.split() if "=" in item)

    def ended(self, job_id: str) -> str | None:
        """The job's final state once it has ended (COMPLETED, FAILED, ...), else None."""
        state = self.job(job_id)["JobState"]
        return state if state in DONE_STATES else None

    def wait(self, job_id: str, timeout: float = 300) -> dict[str, str]:
        """Poll until the job ends; returns its final `scontrol show job` record.

        The timeout only guards against a hung job: it is generous (tests do not
        assert on speed, and a 2-core CI host can be slow), and when it expires
        the error carries what is needed to see why: the job record, the job's
        output file and the busiest processes on the host.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info["JobState"] in DONE_STATES:
                return info
            time.sleep(0.25)
        info = self.job(job_id)
        self.run(["scancel", job_id], check=False)
        raise AssertionError(f"job {job_id} did not finish in {timeout} s: {info}\n{self.diagnostics(info)}")

    def diagnostics(self, info: dict[str, str]) -> str:
        """The job's output file and the top CPU users, for a failure message."""
        out = Path(info.get("StdOut", ""))
        text = out.read_text()[-4000:] if out.is_file() else f"(no output file {out})"
        top = subprocess.run(["ps", "-eo", "pid,etime,pcpu,rss,args", "--sort=-pcpu"],
                             capture_output=True, text=True).stdout.splitlines()[:15]
        return f"--- {out}:\n{text}\n--- busiest processes:\n" + "\n".join(line[:200] for line in top)


def _cluster_script(action: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), action], capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="session")
def slurm_cluster():
    if shutil.which("slurmctld") is None or shutil.which("mpirun") is None:
        done = _cluster_script("install")
        assert done.returncode == 0, f"installing Slurm failed:\n{done.stderr}"
    directory = Path(os.environ.get("ERNIE_SLURM_DIR", "/tmp/ernie-slurm"))
    started = _cluster_script("status").returncode != 0
    if started:
        done = _cluster_script("start")
        assert done.returncode == 0, f"starting Slurm failed:\n{done.stderr}"
    env = {**os.environ, **_read_env_sh(directory / "env.sh")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    yield SlurmCluster(dir=directory, env=env)
    if started:
        _cluster_script("stop")
