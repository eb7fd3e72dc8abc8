"""slurm/pretrain.sbatch before its time limit: USR1 reaches the tasks, the job requeues itself.

One job serves both tests: a 1-minute limit with a 50 s lead, so USR1 is due
10 s after the start.  slurmctld checks time limits periodically (every ~30 s,
measured here: 5 s early to 18 s late), so the test allows 30 s after that;
a 300 s lead in production hides this.
The probe tasks exit with EXIT_REQUEUE when it arrives
(as a trainer does after saving), the script requeues the job, and the second
run (SLURM_RESTART_COUNT=1) exits 0.  The test cluster has no RequeueExit, so
the requeue is the template's own doing.
"""

import json
from pathlib import Path

import pytest

from megatron_ernie.config.slurm import SlurmConfig
from megatron_ernie.launch.render import JobSpec, render_job

pytestmark = [pytest.mark.slurm, pytest.mark.slow]
PROBE = Path(__file__).with_name("probe.py")
LIMIT_S, LEAD_S, CHECK_PERIOD_S = 60, 50, 30


@pytest.fixture(scope="module")
def requeued_job(slurm_cluster, tmp_path_factory):
    out = tmp_path_factory.mktemp("requeue")
    slurm = SlurmConfig(nodes=1, gpus_per_node=2, time="1", signal_lead_s=LEAD_S, mem="", log_dir=str(out))
    job = JobSpec("pretrain", "/unused.toml", str(out / "run"), command=f"python3 {PROBE} {out} --wait-usr1 {LIMIT_S}")
    script = out / "pretrain.sbatch"
    script.write_text(render_job(slurm, job))
    job_id = slurm_cluster.sbatch(script)
    info = slurm_cluster.wait(job_id)
    runs = {p.stem: json.loads(p.read_text()) for p in out.glob("rank*-run*.json")}
    return info, runs, (out / f"ernie-{job_id}.out").read_text()


def test_usr1_reaches_every_task_at_the_lead_time(requeued_job):
    _, runs, log = requeued_job
    first = [runs[f"rank{r}-run0"] for r in range(2)]
    for report in first:
        waited = report["usr1"] - report["start"]
        assert 0 < waited <= LIMIT_S - LEAD_S + CHECK_PERIOD_S + 1, waited  # well before the limit
    assert "USR1: time limit near" in log


def test_requeue_exit_requeues_and_second_run_sees_restart_count(requeued_job):
    info, runs, log = requeued_job
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1" and info["ExitCode"] == "0:0"
    assert [runs[f"rank{r}-run1"]["restart"] for r in range(2)] == [1, 1]
    assert [runs[f"rank{r}-run1"]["usr1"] for r in range(2)] == [None, None]
    assert "exit 75; requeueing job" in log and log.count(" run 2 on ") == 1
