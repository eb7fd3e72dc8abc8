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
