"""Helpers for the tests: the repo root, free ports, torchrun launches of workers.

(Not in conftest.py: tests/slurm has its own conftest, and two modules named
``conftest`` on sys.path would shadow each other when tests import from them.)
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int, args, timeout: int = 600, env=None) -> subprocess.CompletedProcess:
    """Run ``python -m torch.distributed.run`` on this host; raises with the output on failure."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}", *map(str, args)]
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}")
    return proc


def run_worker(scenario: str, tmp_path: Path, case: dict, nproc: int, timeout: int = 900) -> dict:
    out = tmp_path / "result.json"
    torchrun(nproc, [ROOT / "tests" / "dist" / "worker.py", scenario, out, json.dumps(case)], timeout)
    return json.loads(out.read_text())
