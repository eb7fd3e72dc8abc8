"""The trainer role: RL steps on megatron-core, checkpoints, and the source side of weight sync.

All trainer ranks form their own torch.distributed world (TP/PP/EP/DP as in
pretraining). Rank 0 alone talks to the controller: it receives a message and
broadcasts its bytes to the other ranks, so every rank takes the same branch
(train, save, stop). After each step every rank contributes its shards to the
global weights on rank 0 (weight_sync.gather_global), which stages them as
the next version and sends WeightsReady; broadcasting to the rollout workers
runs when the controller's SyncPlan arrives: at once in a synchronous run
with nothing else waiting, else in rank 0's background thread while training
goes on (an asynchronous trainer never waits for rollouts).

Idle time: how long rank 0 waited for the next batch since the previous step
ended; the controller reports idle / (idle + step) as the trainer's idle
fraction, the number asynchronous RL exists to drive down.
"""

from __future__ import annotations

import json
import logging
import math
import os
import queue
import socket
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_ernie import config as C
from megatron_ernie.config.checks import check_all
from megatron_ernie.checkpoint import store
from megatron_ernie.rl.batch import build_batch
from megatron_ernie.rl.control import (Failure, Heartbeats, Hello, Saved, SaveCheckpoint, Start, StepDone, SyncDone, SyncPlan,
                                       TrainBatch, connect)
from megatron_ernie.rl.policy import PolicyTrainer
from megatron_ernie.rl.protocol import Shutdown, WeightsReady, decode
from megatron_ernie.precision.sharing import gather_scales, scaling_holders
from megatron_ernie.rl.weight_sync import GroupAddress, connect_group, gather_global, plan_push, send_weights

log = logging.getLogger("megatron_ernie.rl.trainer")
MAX_STAGED = 4  # weight versions kept for pushes the controller may still request


class WeightPublisher:
    """Rank 0's staged weight versions, and the pushes the controller's SyncPlans ask for.

    A synchronous run's plan is pushed by the caller itself when nothing else
    waits for rank 0 (`push_or_queue`), else by a background thread, so
    training goes on while the rollouts receive. Why not always the thread:
    handing a plan to it cost ~0.8 ms of wake-up on a busy host before the
    broadcast began, on the critical path of every synchronous step (issue
    14). Plans are pushed in the order they came, whoever pushes them.
    """

    def __init__(self, channel, wire_dtype: str, bucket_mb: float, timeout_s: float):
        self.channel, self.wire_dtype, self.bucket_mb, self.timeout_s = channel, wire_dtype, bucket_mb, timeout_s
        self._snapshots: dict[int, tuple[WeightsReady, dict]] = {}
        self._lock = threading.Lock()
        self._pushing = threading.Lock()  # one push at a time, in plan order
        self._plans: queue.Queue = queue.Queue()
        self._group, self._generation = None, -1
        self._thread = threading.Thread(target=self._serve, name="weight-sync", daemon=True)
        self._thread.start()

    def stage(self, version: int, tensors: dict, scales: dict | None = None) -> WeightsReady:
        """Keep one version for later pushes; FP8 scales (if shared) travel in exact fp32 buckets."""
        ready = WeightsReady(version, tuple(plan_push(tensors, self.wire_dtype, self.bucket_mb, scales)))
        with self._lock:
            self._snapshots[version] = (ready, {**tensors, **(scales or {})})
            for old in sorted(self._snapshots)[:-MAX_STAGED]:
                del self._snapshots[old]  # bounded even if no push is ever requested
        return ready

    def submit(self, plan: SyncPlan) -> None:
        """Push in the background thread."""
        self._plans.put(plan)

    def push_or_queue(self, plan: SyncPlan) -> None:
        """Push now, in the caller, unless earlier plans are still queued or being pushed (then after them)."""
        with self._pushing:
            if self._plans.unfinished_tasks == 0:
                self._push(plan)
                return
        self._plans.put(plan)

    def close(self) -> None:
        self._plans.put(None)
        self._thread.join(timeout=5)

    def _take(self, version: int):
        with self._lock:
            for old in [v for v in self._snapshots if v < version]:
                del self._snapshots[old]  # the controller never asks for an older version again
            return self._snapshots.get(version)

    def _serve(self) -> None:
        while (plan := self._plans.get()) is not None:
            with self._pushing:
                self._push(plan)
            self._plans.task_done()

    def _push(self, plan: SyncPlan) -> None:
        snapshot = self._take(plan.ready.version)
        try:
            if snapshot is None:
                raise ValueError(f"version {plan.ready.version} is no longer staged")
            if plan.generation != self._generation:
                self._group = None
                self._group = connect_group(GroupAddress(plan.host, plan.port, plan.generation, 0, plan.size),
                                            self.timeout_s)
                self._generation = plan.generation
            stats = send_weights(self._group, snapshot[0], snapshot[1])
            self.channel.send(SyncDone(plan.ready.version, plan.generation, True, stats.nbytes, stats.seconds))
        except (RuntimeError, ValueError) as exc:
            self._group, self._generation = None, -1
            log.warning(f"weight broadcast of version {plan.ready.version} failed: {exc}")
            self.channel.send(SyncDone(plan.ready.version, plan.generation, False, detail=str(exc)[:300]))


class TrainerRole:
    def __init__(self, cfg, system, groups, vocab_size: int, channel=None):
        self.cfg, self.system, self.groups, self.channel = cfg, system, groups, channel
        # unified FP8 with delayed scaling: scales change once per step, and every weight push
        # carries them to the rollout engines (precision/sharing.py)
        shares = system.shares_fp8_scales(cfg.fp8)
        self.trainer = PolicyTrainer(cfg, groups, vocab_size, system.routing_replay,
                                     fp8=system.role_fp8(cfg.fp8, "trainer"), fp8_per_step=shares)
        self.scale_holders = scaling_holders(self.trainer.model) if shares else None
        self.rank = dist.get_rank()
        self.publisher = None
        if self.rank == 0:
            self.publisher = WeightPublisher(channel, system.rollout_dtype, system.sync_bucket_mb,
                                             system.sync_timeout_s)
        self.idle_s = 0.0
        self.synchronous = cfg.rl.buffer.max_policy_lag == 0

    @property
    def ckpt_root(self) -> Path:
        return Path(self.cfg.run.dir) / "checkpoints"

    # ------------------------------------------------------------ messages
    def _next_message(self):
        """Rank 0 receives (serving SyncPlans on the way); every rank gets the same message.

        Rank 0 keeps the message it decoded; only the other ranks decode the
        broadcast copy (a TrainBatch's encoding and decoding are milliseconds
        on the step's critical path, issue 14)."""
        message, payload = None, [None]
        if self.rank == 0:
            start = time.perf_counter()
            message = self.channel.recv()
            while isinstance(message, SyncPlan):
                self._serve_plan(message)
                message = self.channel.recv()
            self.idle_s += time.perf_counter() - start
        if dist.get_world_size() == 1:
            return message
        if self.rank == 0:
            payload = [message.to_bytes()]
        dist.broadcast_object_list(payload, src=0)
        return message if self.rank == 0 else decode(payload[0])

    def _serve_plan(self, plan: SyncPlan) -> None:
        """In a synchronous run (max_policy_lag 0) with no message behind the plan, push at once: the next
        batch needs these weights, so this rank would only wait. Else let the background thread push while
        the next message (a batch to train on) is handled; also, a broadcast stuck on a hung rollout (up to
        rl.system.sync_timeout_s) then never holds up training."""
        if self.synchronous and not self.channel.poll(0):
            self.publisher.push_or_queue(plan)
        else:
            self.publisher.submit(plan)

    def run(self) -> int:
        start = self._next_message()
        if not isinstance(start, Start):
            raise RuntimeError(f"trainer expected Start first, got {type(start).__name__}")
        self._resume(start.resume_version)
        self._publish()
        while True:
            message = self._next_message()
            if isinstance(message, TrainBatch):
                self._train(message)
            elif isinstance(message, SaveCheckpoint):
                self._save(message.version)
            elif isinstance(message, Shutdown):
                return 75 if message.reason == "requeue" else 0

    # --------------------------------------------------------------- work
    def _train(self, message: TrainBatch) -> None:
        if message.step != self.trainer.version:
            raise RuntimeError(f"controller sent the batch for step {message.step}, trainer is at "
                               f"version {self.trainer.version}: restart both from the same checkpoint")
        start = time.perf_counter()
        batch = build_batch(message.groups(), self.cfg.rl.algorithm, self.cfg.model.seq_length,
                            multiple=math.lcm(8, self.groups.dims.tp),  # sequence parallel splits s by TP
                            distill=self.cfg.rl.distill)
        metrics = self.trainer.train_step(batch)
        step_s = time.perf_counter() - start
        self._publish()  # before StepDone: the controller plans the weight sync while it logs the step
        if self.rank == 0:
            self.channel.send(StepDone(self.trainer.version, json.dumps(metrics), step_s, self.idle_s))
            self.idle_s = 0.0

    def _publish(self) -> None:
        tensors = gather_global(self.trainer.views)
        scales = gather_scales(self.scale_holders) if self.scale_holders is not None else None
        if self.rank == 0:
            self.channel.send(self.publisher.stage(self.trainer.version, tensors, scales))

    def _resume(self, version: int) -> None:
        start = Path(self.cfg.checkpoint.load) if self.cfg.checkpoint.load else None
        log.info(restore_policy(self.trainer, self.ckpt_root, version, start))

    def _save(self, version: int) -> None:
        t = self.trainer
        meta = store.Meta(iteration=version, consumed_samples=0, consumed_tokens=0,
                          layout=_layout(), extra={"scheduler": t.scheduler.state_dict(),
                                                   "config": C.loader.to_dict(self.cfg)})
        files = {name: Path(self.cfg.run.dir) / name for name in ("config.toml", "tokenizer.json")}
        path = store.save(self.ckpt_root, meta, t.model, t.optimizer, self.cfg.checkpoint.keep_last,
                          {k: v for k, v in files.items() if v.exists()})
        if self.rank == 0:
            self.channel.send(Saved(version, str(path)))

    def close(self) -> None:
        if self.publisher is not None:
            self.publisher.close()


def restore_policy(trainer: PolicyTrainer, ckpt_root: Path, version: int, start: Path | None) -> str:
    """Load the policy a run continues from, and anchor the KL reference where the run began.

    The reference of the K3 penalty (GRPO's pi_ref) is the policy the stage
    started from: checkpoint.load (the SFT or OPD model a stage continues),
    also after a resume from one of the run's own checkpoints, or the seeded
    initialisation when there is none. PolicyTrainer copies its weights into
    the reference when it is built, before anything is loaded, so the copy is
    redone here once the starting weights are known. Returns what to log.
    """
    if version >= 0:
        path = store.iteration_dir(ckpt_root, version)
        meta = store.load(path, trainer.model, trainer.optimizer)
        trainer.scheduler.load_state_dict(meta.extra["scheduler"])
        trainer.version = meta.iteration
        if start is not None and trainer.reference is not None:
            store.load(start, trainer.reference[0], None, restore_rng=False)
        return f"trainer resumed from {path} (policy version {trainer.version})"
    if start is None:
        return "trainer starts from the initial weights"
    store.load(start, trainer.model, None)
    trainer.reset_reference()
    return f"trainer initialised from {start}"


def _layout() -> dict:
    from megatron_ernie.runtime.groups import current_layout

    return current_layout()


def run_trainer(cfg, system, address, authkey: bytes) -> int:
    """The trainer role's main (every trainer rank calls it; env:// gives the trainer world)."""
    from megatron_ernie.rl.task_tokenizer import tokenizer_for
    from megatron_ernie.runtime import distributed, groups as G
    from megatron_ernie.runtime.dims import dims_from_config

    world = distributed.init_distributed()
    channel = beats = role = None
    if dist.get_rank() == 0:  # connect first, so a failing setup can still tell the controller why
        channel = connect(address, authkey, Hello("trainer", 0, os.getpid(), socket.gethostname()))
        beats = Heartbeats(channel, "trainer", 0, system.heartbeat_s)
    try:
        check_all(cfg, world)
        groups = G.build_groups(dims_from_config(cfg.parallel, world))
        torch.manual_seed(cfg.run.seed)
        G.model_parallel_seed(cfg.run.seed)
        vocab_size = tokenizer_for(cfg, agent=system.agent_max_turns > 1).vocab_size
        role = TrainerRole(cfg, system, groups, vocab_size, channel)
        code = role.run()
    except EOFError:
        log.error("trainer: the controller closed the connection; exiting")
        return 1
    except Exception as exc:
        if channel is not None:
            channel.send(Failure("trainer", f"{type(exc).__name__}: {exc}"[:2000]))
        raise  # no barrier on the way out: the other ranks may be waiting elsewhere
    finally:
        if role is not None:
            role.close()
        if beats is not None:
            beats.stop()
    distributed.shutdown()
    return code
