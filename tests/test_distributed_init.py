"""A single-process tool (eval, extract, eval-tasks) starts even when the rendezvous port is taken:
a world of one needs no port (two such tools at once used to fail with EADDRINUSE)."""

import os
import subprocess
import sys
import textwrap

from harness import ROOT

SCRIPT = textwrap.dedent("""
    import socket
    held = socket.socket()
    held.bind(("127.0.0.1", int(PORT)))
    held.listen()  # another job holds the port this process was told to use
    from megatron_ernie.runtime import distributed
    import torch, torch.distributed as dist
    print("world", distributed.init_distributed())
    t = torch.ones(2)
    dist.all_reduce(t)
    print("sum", t.tolist())
    distributed.shutdown()
""")


def _run(port: str, extra_env: dict) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env.update({"PYTHONPATH": str(ROOT), **extra_env})
    return subprocess.run([sys.executable, "-c", SCRIPT.replace("PORT", port)], env=env, capture_output=True,
                          text=True, timeout=300)


def test_a_world_of_one_starts_although_its_port_is_taken():
    for port, env in (("29500", {}), ("29513", {"MASTER_PORT": "29513"})):
        done = _run(port, env)
        assert done.returncode == 0, done.stderr[-2000:]
        assert "world 1" in done.stdout and "sum [1.0, 1.0]" in done.stdout


EXIT_SCRIPT = textwrap.dedent("""
    import atexit
    import torch, torch.distributed as dist
    # atexit runs last-registered first: this hook runs after the one init registers
    atexit.register(lambda: print("alive at exit", dist.is_initialized(), flush=True))
    from megatron_ernie.rl.rollout.worker import init_solo_world
    init_solo_world(0)
    work = dist.all_reduce(torch.ones(4), async_op=True)  # gloo work that holds a tensor
    work.wait()
    print("initialized", dist.is_initialized(), flush=True)
    raise SystemExit(2)  # as a CLI leaves after printing a config error, without shutdown()
""")


def test_a_group_left_alive_is_destroyed_before_the_interpreter_finalizes():
    """A command that exits with its process group alive used to die with SIGABRT now and then
    ("terminate called without an active exception") after printing its error: gloo's threads freed
    tensors during interpreter finalization. The group is destroyed by an atexit hook instead."""
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "WORLD_SIZE", "RANK")}
    done = subprocess.run([sys.executable, "-c", EXIT_SCRIPT], env={**env, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "initialized True" in done.stdout and "alive at exit False" in done.stdout, done.stdout
