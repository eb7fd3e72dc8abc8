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


class StopFlag:
    def __init__(self, signals=(signal.SIGUSR1, signal.SIGTERM)):
        self.received: int | None = None
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
