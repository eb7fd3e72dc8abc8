"""`ernie rl` fails fast on start-up errors (issue: a task module importable only from the current
directory was found missing by the controller after every child had started, and the launcher then
waited 60 s per child: 276 s to a config error).

The config is resolved before any child starts (tasks with their user modules, the tokenizer, teacher
checkpoints), and when the run fails the launcher stops the children at once. The subprocess timeout
below is a hang guard, not a speed claim: the old launcher needed more than 60 s here."""

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from harness import ROOT
from megatron_ernie.rl.main import _reap, _watch_children

USER_MODULE = """
from megatron_ernie.rl.tasks import TaskExample, register_task

register_task("cwd_only", lambda seed, index, options: TaskExample("1+1=", "2"),
              lambda response, reference, sandbox: float(response == reference))
"""


def test_a_task_module_the_launcher_cannot_import_fails_before_any_child_starts(tmp_path):
    """`ernie` (a console script: its sys.path has no cwd) cannot import a module that sits in the cwd;
    children started with `python -m` could. The error must come from the launcher, once, with exit 2."""
    (tmp_path / "cwd_only_tasks.py").write_text(USER_MODULE)
    command = [os.path.join(os.path.dirname(sys.executable), "ernie"), "rl",
               "--config", str(ROOT / "configs" / "rl_tiny_cpu.toml"), "--set", f'run.dir="{tmp_path / "run"}"',
               "--set", 'rl.tasks=[{name="cwd_only", module="cwd_only_tasks"}]', "--set", "train.iters=2"]
    if not os.path.exists(command[0]):
        command[:1] = [sys.executable, "-P", "-m", "megatron_ernie.cli"]  # -P: no cwd on sys.path either
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # this checkout; the module's folder is not on the path
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=90)
    output = done.stdout + done.stderr
    assert done.returncode == 2, output[-3000:]
    assert output.count("rl.tasks[0].module") == 1, output[-3000:]
    assert "cwd_only_tasks" in output
    assert not (tmp_path / "run" / "rl").exists()  # no controller ran: nothing was written


def _sleeper(ignore_term: bool = False) -> subprocess.Popen:
    code = ("import signal, time\n" + ("signal.signal(signal.SIGTERM, signal.SIG_IGN)\n" if ignore_term else "")
            + "print('ready', flush=True)\ntime.sleep(600)")
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "ready"  # its signal handler is in place
    return child


def test_reap_stops_every_child_that_outlives_the_grace():
    children = [_sleeper(), _sleeper(), _sleeper(ignore_term=True)]
    done = threading.Event()
    thread = threading.Thread(target=lambda: (_reap(children, grace_s=0.5), done.set()))
    thread.start()
    thread.join(timeout=60)  # hang guard: the old _reap waited 60 s per child
    assert done.is_set()
    assert [c.returncode for c in children] == [-signal.SIGTERM, -signal.SIGTERM, -signal.SIGKILL]


def test_reap_leaves_children_that_exit_by_themselves_alone():
    children = [subprocess.Popen([sys.executable, "-c", f"raise SystemExit({code})"]) for code in (0, 3)]
    _reap(children, grace_s=60)
    assert [c.returncode for c in children] == [0, 3]


class _Run:
    """What _watch_children sees of the controller: `finished` and `fail(reason)`."""

    def __init__(self):
        self.finished, self.reasons = False, []

    def fail(self, reason):
        self.reasons.append(reason)
        self.finished = True


@pytest.mark.parametrize("codes, trainer_procs, fails", [
    ((0, None, None), 1, "trainer"),  # a trainer that exits early, even with 0
    ((None, 2, None), 1, "role"),  # a rollout/reward/teacher with a config error at start-up
    ((None, 1, None), 1, None),  # a rollout that crashes: the controller's fault tolerance handles it
])
def test_watch_children_fails_the_run_on_a_start_up_failure(codes, trainer_procs, fails):
    children = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)" if code is None
                                  else f"raise SystemExit({code})"]) for code in codes]
    try:
        run = _Run()
        _watch_children(children, trainer_procs, run)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not run.reasons:
            time.sleep(0.1)
        if fails is None:
            assert run.reasons == []
        else:
            assert len(run.reasons) == 1 and run.reasons[0].startswith(f"{fails} process"), run.reasons
    finally:
        run.finished = True
        for child in children:
            child.kill()
            child.wait()
