"""A user's own task, registered in the user's module and named by [[rl.tasks]] module = "...",
is scored by the reward processes too (issue: every sample used to score 0 as an unknown task)."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from harness import ROOT

pytestmark = pytest.mark.slow

USER_MODULE = textwrap.dedent("""
    from megatron_ernie.rl.tasks import TaskExample, register_task

    def make_example(seed, index, options):
        a = (seed + index) % 10
        return TaskExample(f"{a}-0=", str(a))

    # every response earns 1: the mean reward shows who scored the samples
    register_task("always_one", make_example, lambda response, reference, sandbox: 1.0)
""")


def test_reward_workers_score_a_user_task(tmp_path):
    (tmp_path / "my_user_tasks.py").write_text(USER_MODULE)
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "megatron_ernie.rl.main", "--config", str(ROOT / "configs" / "rl_tiny_cpu.toml"),
           "--set", f'run.dir="{run_dir}"', "--set", "train.iters=2",
           "--set", 'rl.tasks=[{name="always_one", module="my_user_tasks"}]',
           "--rollout-workers", "1", "--reward-workers", "1"]
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}:{ROOT}", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    steps = [json.loads(line) for line in (run_dir / "rl" / "metrics.jsonl").read_text().splitlines()]
    assert len(steps) == 2
    for step in steps:
        assert step["reward/always_one"] == 1.0 and step["reward/failed_fraction"] == 0.0, step
