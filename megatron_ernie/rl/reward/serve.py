"""The reward role: a CPU process that scores Samples for the controller.

Receives Samples (in SampleBatch messages), scores every sample that has
arrived since the last pass with `RewardWorker` (concurrent sandboxes) and
returns their ScoredSamples as one ScoredBatch. Never
raises on a bad sample (a crashing program, a failing sandbox or a buggy
verifier all become reward 0 with a status), so one poisoned response costs
one sample, not the run. Imports neither torch nor megatron.
"""

from __future__ import annotations

import logging
import os
import socket

from megatron_ernie.rl.control import Heartbeats, Hello, connect, receive_work
from megatron_ernie.rl.protocol import SampleBatch, ScoredBatch
from megatron_ernie.rl.reward.worker import RewardWorker

log = logging.getLogger("megatron_ernie.rl.reward")


def serve(channel, worker: RewardWorker, rank: int = 0) -> int:
    """Score until Shutdown; returns the exit code (75 when the controller asks for a requeue)."""
    while True:
        batches, code = receive_work(channel, SampleBatch, f"reward {rank}", log)
        if code is not None:
            return code
        samples = [sample for batch in batches for sample in batch.samples]
        if samples:
            channel.send(ScoredBatch(tuple(worker.score(samples))))  # one message for the whole pass


def resolve_configured_tasks(tasks) -> None:
    """Import and check every [[rl.tasks]] entry, as the controller does, before scoring anything.

    A user task registers itself when its `module` is imported; a reward
    process that skipped this would score every sample of that task as an
    unknown task (reward 0) while the run looked healthy. A task that cannot
    be resolved here is a ConfigError that ends this process at start-up.
    """
    from megatron_ernie.rl.tasks import resolve_task

    for i, task in enumerate(tasks):
        resolve_task(task, f"rl.tasks[{i}]")


def run_reward(cfg, system, rank: int, address, authkey: bytes) -> int:
    resolve_configured_tasks(cfg.rl.tasks)
    channel = connect(address, authkey, Hello("reward", rank, os.getpid(), socket.gethostname()))
    beats = Heartbeats(channel, "reward", rank, system.heartbeat_s)
    try:
        with RewardWorker(cfg.rl.sandbox, system.reward_concurrency) as worker:
            return serve(channel, worker, rank)
    except EOFError:
        log.error(f"reward {rank}: the controller closed the connection; exiting")
        return 1
    finally:
        beats.stop()
