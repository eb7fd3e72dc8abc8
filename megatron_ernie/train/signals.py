"""Stop requests from the scheduler (Slurm's pre-timeout USR1, preemption TERM).

A handler only sets a flag; the loop checks it between iterations, agrees on
it across all ranks (a signal may reach only some of them), saves a
checkpoint and exits with ``EXIT_PREEMPTED`` so an sbatch script can requeue
the job, which then resumes from ``latest``.
"""

from __future__ import annotations

import signal

import torch
import torch.distributed as dist

from megatron_ernie.runtime.env import EXIT_REQUEUE as EXIT_PREEMPTED  # 75, EX_TEMPFAIL


def start_checkpoint_helpers(signals=(signal.SIGUSR1, signal.SIGTERM)) -> None:
    """Start dist_checkpointing's writer-results Manager with the stop signals blocked.

    Slurm delivers USR1/TERM to every process of a job step, not only to the
    task; the Manager (a spawned process without our handler) would die and
    the very save the signal asks for fails with BrokenPipeError.  A blocked
    signal mask survives fork and exec, so the helper never receives them.
    """
    from multiprocessing import resource_tracker

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    previous = signal.pthread_sigmask(signal.SIG_BLOCK, set(signals))
    try:
        resource_tracker.ensure_running()  # spawn's helper; starting, it unblocks SIGTERM ...
        signal.pthread_sigmask(signal.SIG_BLOCK, set(signals))  # ... so block again
        filesystem_async._get_write_results_queue()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


class StopFlag:
    def __init__(self, signals=(signal.SIGUSR1, signal.SIGTERM)):
        self.received: int | None = None
        start_checkpoint_helpers(signals)
        for sig in signals:
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.received = signum

    def agreed(self) -> bool:
        """True on every rank if any rank got a stop signal."""
        flag = torch.tensor([1.0 if self.received is not None else 0.0])
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())
