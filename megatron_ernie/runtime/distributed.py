"""Start and stop torch.distributed for one job.

The launcher's environment (torchrun, Slurm's srun, mpirun) is translated
into torch's ``env://`` variables by ``runtime.env``; here we pick the backend
(NCCL with GPUs, gloo without) and apply the CPU compatibility layer before
megatron-core runs.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

from megatron_ernie.runtime import cpu_compat


def backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_distributed(timeout_s: int = 600) -> int:
    """Initialise the default process group from the environment; returns the world size."""
    _export_launcher_env()
    cpu_compat.apply()
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        timeout = datetime.timedelta(seconds=timeout_s)
        if _alone():  # a world of one needs no rendezvous, so no port that another job may hold
            dist.init_process_group(backend(), store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
        else:
            dist.init_process_group(backend(), timeout=timeout)
    return dist.get_world_size()


def _alone() -> bool:
    """One process, not started by torchrun (whose agent serves the store at MASTER_PORT).

    Single-process tools (eval, extract, search, eval-tasks) used to bind
    MASTER_PORT (29500 by default) for a rendezvous nobody else joins, so two
    of them at once, or one beside a training job, failed with EADDRINUSE.
    """
    return os.environ.get("WORLD_SIZE") == "1" and "TORCHELASTIC_RUN_ID" not in os.environ


def _export_launcher_env() -> None:
    """Fill RANK/WORLD_SIZE/MASTER_* from Slurm or MPI when not launched by torchrun."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return
    try:
        from megatron_ernie.runtime import env as launcher_env
    except ImportError:  # pragma: no cover - env.py always ships
        return
    launcher_env.export_torch_env(launcher_env.discover(os.environ))


def shutdown() -> None:
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
