"""The whole RL system on CPU, every role a separate process (controller, trainer, 2 rollout, 1 reward).

configs/rl_tiny_cpu.toml: a tiny MoE learns one-digit subtraction from scratch
with asynchronous GRPO (max_policy_lag 1), bf16 rollout engines with routing
replay. During the run the test SIGKILLs one rollout worker; the controller
must notice, reissue its prompts and finish on the survivor. A second launch
resumes the finished run (one rollout worker, rewards scored inside the
controller) and gets SIGUSR1, as Slurm sends it before the time limit: it
must save and exit 75 (requeue). A third launch resumes from that checkpoint.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from harness import ROOT

pytestmark = pytest.mark.slow
CONFIG = ROOT / "configs" / "rl_tiny_cpu.toml"
STEPS, KILL_AT = 300, 80


def launch(run_dir: Path, *args: str, log_name: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "megatron_ernie.rl.main", "--config", str(CONFIG),
           "--set", f'run.dir="{run_dir}"', *args]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    log = open(run_dir.parent / log_name, "w")
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "rl" / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def kill_rollout_after(run_dir: Path, proc: subprocess.Popen, step: int, timeout_s: float) -> int:
    """SIGKILL rollout worker 1 once the run has trained `step` steps; returns its pid."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        if len(read_metrics(run_dir)) >= step:
            roles = json.loads((run_dir / "rl" / "roles.json").read_text())
            pid = next(r["pid"] for r in roles if r["role"] == "rollout" and r["rank"] == 1)
            os.kill(pid, signal.SIGKILL)
            return pid
        time.sleep(0.2)
    raise AssertionError(f"the run did not reach step {step}: {(run_dir.parent / 'first.log').read_text()[-3000:]}")


def wait_for_step(run_dir: Path, proc: subprocess.Popen, step: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while len(read_metrics(run_dir)) < step:
        assert proc.poll() is None and time.monotonic() < deadline, f"the run did not reach step {step}"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("rl-e2e") / "run"
    run_dir.mkdir()
    start = time.monotonic()
    proc = launch(run_dir, "--set", f"train.iters={STEPS}", log_name="first.log")
    killed = kill_rollout_after(run_dir, proc, KILL_AT, timeout_s=900)
    first_rc = proc.wait(timeout=900)
    first_s = time.monotonic() - start
    first = read_metrics(run_dir)
    small = ("--resume", "auto", "--rollout-workers", "1", "--reward-workers", "0")
    proc = launch(run_dir, "--set", f"train.iters={STEPS + 100}", *small, log_name="second.log")
    wait_for_step(run_dir, proc, STEPS + 2, timeout_s=600)
    proc.send_signal(signal.SIGUSR1)  # the controller is the launching process
    second_rc = proc.wait(timeout=300)
    saved = len(read_metrics(run_dir))
    proc = launch(run_dir, "--set", f"train.iters={saved + 2}", *small, log_name="third.log")
    third_rc = proc.wait(timeout=600)
    logs = {name: (run_dir.parent / f"{name}.log").read_text() for name in ("first", "second", "third")}
    print(f"\nfirst run: {STEPS} steps in {first_s:.0f} s (incl. start-up); killed rollout pid {killed}")
    return {"dir": run_dir, "first_rc": first_rc, "second_rc": second_rc, "third_rc": third_rc, "first": first,
            "saved": saved, "all": read_metrics(run_dir), "logs": logs}


def test_run_completes_despite_killed_rollout(runs):
    assert runs["first_rc"] == 0, runs["logs"]["first"][-4000:]
    steps = [m["step"] for m in runs["first"]]
    assert steps == list(range(1, STEPS + 1))
    last = runs["first"][-1]
    assert last["faults/rollouts_died"] == 1
    assert last["rollout/alive_workers"] == 1
    assert runs["first"][KILL_AT - 2]["rollout/alive_workers"] == 2
    assert "rollout1 (pid" in runs["logs"]["first"] and "is dead: connection closed" in runs["logs"]["first"]


def test_reward_rises(runs):
    rewards = np.array([m["reward/mean"] for m in runs["first"]])
    early, late = rewards[:60].mean(), rewards[-60:].mean()
    print(f"\nmean reward: first 60 steps {early:.3f}, last 60 steps {late:.3f}")
    assert late > 2 * early and late > early + 0.05, (early, late)


def test_staleness_bound_and_routing_replay(runs):
    for m in runs["first"]:
        assert m["staleness/lag_max"] <= 1  # rl.buffer.max_policy_lag
        assert m["routing/mismatch_used"] == 0.0  # the trainer used exactly the rollout's experts
    assert max(m["staleness/lag_mean"] for m in runs["first"]) > 0  # asynchrony actually happened
    assert any(m["routing/mismatch_own"] > 0 for m in runs["first"])  # ... and replay had work to do
    assert all(np.isfinite(m["policy/rollout_kl_k3"]) for m in runs["first"])


def test_metrics_reach_tensorboard(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(runs["dir"] / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in ("reward/mean", "reward/arithmetic", "rollout/response_length", "staleness/lag_mean",
                "trainer/idle_fraction", "rollout/tokens_per_s", "weight_sync/seconds", "weight_sync/bytes_per_s",
                "policy/rollout_kl_k3", "routing/mismatch_own", "policy/clip_fraction", "policy/entropy"):
        assert tag in tags, tag
    assert len(acc.Scalars("reward/mean")) >= STEPS


def test_sigusr1_saves_and_exits_for_requeue_then_resumes(runs):
    saved = runs["saved"]
    assert runs["second_rc"] == 75, runs["logs"]["second"][-4000:]
    assert f"controller resumed at policy version {STEPS}" in runs["logs"]["second"]
    assert saved > STEPS + 1 and f"checkpoint of policy version {saved} committed" in runs["logs"]["second"]
    assert runs["third_rc"] == 0, runs["logs"]["third"][-4000:]
    assert f"controller resumed at policy version {saved}" in runs["logs"]["third"]
    assert f"trainer resumed from {runs['dir']}/checkpoints/iter_{saved:07d}" in runs["logs"]["third"]
    assert [m["step"] for m in runs["all"]] == list(range(1, saved + 3))  # no step lost or repeated
    state = json.loads((runs["dir"] / "rl" / "controller" / f"state_{saved + 2:07d}.json").read_text())
    assert state["version"] == saved + 2 and state["prompt_index"] > 0
