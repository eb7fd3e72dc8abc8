"""A run whose reward scorer fails on every sample stops with the reasons, instead of training on zeros
(issue 14: a task the reward role could not score gave reward 0 at every step and the run exited 0)."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from harness import ROOT
from megatron_ernie import config as C
from megatron_ernie.config.errors import ConfigError
from megatron_ernie.rl.failure_watch import FailureWatch
from megatron_ernie.rl.protocol import Sample, ScoredSample


def _scored(status: str, detail: str = "", task: str = "t") -> ScoredSample:
    sample = Sample("0:t", 0, task, np.array([1, 2], dtype=np.int32), np.array([3], dtype=np.int32),
                    np.array([-0.5], dtype=np.float32), 0)
    return ScoredSample(sample, 0.0, status, detail)


def test_watch_stops_after_the_configured_steps_of_scorer_failures_and_names_the_reasons():
    watch = FailureWatch(steps=2, samples_per_step=4)
    broken = [_scored("error", "RuntimeError: boom")] * 2
    assert [watch.observe(broken) for _ in range(3)] == ["", "", ""]  # 6 of 8 failed samples
    message = watch.observe([_scored("sandbox_error", "no namespaces", task="code"), _scored("error", "KeyError: x")])
    assert "the last 8 samples (2 training steps of 4)" in message
    assert "6 x task 't' error: RuntimeError: boom" in message  # the most frequent reason first
    assert "task 'code' sandbox_error: no namespaces" in message and "KeyError: x" in message
    assert "rl.stop_on_failures = 0" in message


def test_one_scored_sample_resets_the_count_and_policy_failures_never_count():
    watch = FailureWatch(steps=1, samples_per_step=4)
    assert watch.observe([_scored("error")] * 3 + [_scored("wrong")]) == ""
    assert watch.observe([_scored("error")] * 3) == ""  # 3 in a row after the reset: below 4
    # a crashing or timed-out program is a verdict on the policy's output, not a scorer failure
    assert watch.observe([_scored(s) for s in ("crash", "timeout", "memory", "output_limit")] * 3) == ""
    assert watch.run_length == 0


def test_zero_disables_the_watch_and_a_negative_value_is_a_config_error():
    watch = FailureWatch(steps=0, samples_per_step=1)
    assert watch.observe([_scored("error")] * 100) == ""
    assert C.load(None, []).rl.stop_on_failures == 3
    with pytest.raises(ConfigError, match="rl.stop_on_failures"):
        C.validate(C.load(None, ["rl.stop_on_failures=-1"]))


BROKEN_TASK = textwrap.dedent("""
    from megatron_ernie.rl.tasks import TaskExample, register_task

    def make_example(seed, index, options):
        return TaskExample(f"{index % 10}-0=", str(index % 10))

    def verify(response, reference, sandbox):
        raise RuntimeError("the verifier is broken")

    register_task("broken_verifier", make_example, verify)
""")


@pytest.mark.slow
def test_a_run_whose_verifier_always_fails_stops_with_the_reason(tmp_path):
    (tmp_path / "broken_tasks.py").write_text(BROKEN_TASK)
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "megatron_ernie.rl.main", "--config", str(ROOT / "configs" / "rl_tiny_cpu.toml"),
           "--set", f'run.dir="{run_dir}"', "--set", "train.iters=30", "--set", "checkpoint.save_on_exit=false",
           "--set", 'rl.tasks=[{name="broken_verifier", module="broken_tasks"}]',
           "--rollout-workers", "1", "--reward-workers", "1"]  # the default rl.stop_on_failures (3 steps)
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}:{ROOT}", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    output = done.stdout + done.stderr
    assert done.returncode != 0, output[-3000:]
    assert "all failed in the reward scorer" in output, output[-3000:]
    assert "task 'broken_verifier' error: RuntimeError: the verifier is broken" in output
    metrics = run_dir / "rl" / "metrics.jsonl"
    steps = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
    assert len(steps) <= 2, [s["step"] for s in steps]  # the third batch of zeros is never trained
    assert all(s["reward/scorer_failed_fraction"] == 1.0 and s["reward/mean"] == 0.0 for s in steps)
