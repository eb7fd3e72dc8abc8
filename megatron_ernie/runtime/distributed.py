"""Start and stop torch.distributed for one job.

The launcher's environment (torchrun, Slurm's srun, mpirun) is translated
into torch's ``env://`` variables by ``runtime.env``; here we pick the backend
(NCCL with GPUs, gloo without) and apply the CPU compatibility layer before
megatron-core runs.
"""

from __future__ import annotations

import atexit
import contextlib
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
            init_world_of_one(timeout)
        else:
            dist.init_process_group(backend(), timeout=timeout)
            _destroy_gloo_at_exit()
    return dist.get_world_size()


def init_world_of_one(timeout: datetime.timedelta = datetime.timedelta(seconds=600)) -> None:
    """This process alone as the default group (single-process tools, and the RL roles' own models)."""
    dist.init_process_group(backend(), store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    _destroy_gloo_at_exit()


def _destroy_gloo_at_exit() -> None:
    """Gloo only: NCCL's teardown is collective-sensitive (a rank whose peers died can hang in it)."""
    if backend() == "gloo":
        atexit.register(_destroy_before_finalization)


def _destroy_before_finalization() -> None:
    """Destroy a group still alive at exit while Python still runs (an atexit hook).

    Gloo's worker threads can hold finished work whose tensors keep Python
    references; left to interpreter finalization, freeing them aborts the
    process (SIGABRT, "terminate called without an active exception"), so a
    command that had already printed its error and chosen exit status 2 died
    with -6 instead. torch does not do this itself (pytorch PR 179291 tried).
    """
    if dist.is_initialized():
        with contextlib.suppress(RuntimeError, ValueError):  # exiting anyway: never a second error
            dist.destroy_process_group()


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
