"""A save interrupted by kill -9 leaves the previous checkpoint loadable and
`latest` pointing at it; the next job resumes from there."""

import os
import signal
import subprocess
import sys
import time

import pytest

from harness import ROOT, free_port

pytestmark = pytest.mark.slow


def _start(run_dir, iters, extra=()):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env["MASTER_PORT"] = str(free_port())
    # one plain process (no torchrun), so killing its process group kills the trainer itself
    cmd = [sys.executable, "-m", "megatron_ernie.cli", "pretrain",
           "--config", str(ROOT / "configs/tiny_cpu.toml"), "--set", "parallel.expert=1",
           "--set", f"run.dir=\"{run_dir}\"", "--set", f"train.iters={iters}", "--set", "train.eval_interval=0",
           "--set", "checkpoint.save_interval=2", "--set", "checkpoint.keep_last=0", *extra]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def _kill_during_save(proc, ckpts, name, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (ckpts / name).is_dir():
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    return False


def test_kill_during_save_keeps_previous_checkpoint(tmp_path, data_cache):
    run_dir = tmp_path / "run"
    ckpts = run_dir / "checkpoints"
    proc = _start(run_dir, iters=8)
    assert _kill_during_save(proc, ckpts, "iter_0000004.tmp"), "the save of iteration 4 was never observed"
    assert (ckpts / "latest").read_text().strip() == "iter_0000002"
    assert not (ckpts / "iter_0000004").exists()
    from megatron_ernie.checkpoint import store

    assert store.find_latest(ckpts) == ckpts / "iter_0000002"
    resumed = _start(run_dir, iters=6, extra=["--resume", "auto"])
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out
    assert "resumed from" in out and "at iteration 2" in out
    assert "iteration      3/6" in out and "iteration      2/6" not in out
    assert (ckpts / "latest").read_text().strip() == "iter_0000006"
    assert not (ckpts / "iter_0000004.tmp").exists()  # the torn save was replaced by a complete one
