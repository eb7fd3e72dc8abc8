"""A tensor-parallel rollout replica: one model split over `rl.system.rollout_tensor` processes.

A model too large for one device is generated from by a group of processes
that each hold a megatron-core tensor-parallel shard, as in the trainer. The
rollout processes form one torch world (their het group on Slurm, or the
local launcher's rollout processes) whose megatron-core TP groups are the
replicas: ranks [k*t, (k+1)*t) make replica k.

Only the replica's leader (TP rank 0) talks to the controller and joins the
trainer's weight broadcast; it runs the ordinary RolloutWorker over a
`ReplicaEngine`, which replays every engine call on the followers first:

* generate(prompts, params): the call is broadcast, then every member runs
  the same static-batch generation. TP forward passes end in an all-gather of
  the vocabulary shards (`runtime_gather_output`), so every member sees the
  same logits, and the members' samplers share a seed, so they draw the same
  tokens and stop at the same step without exchanging them.
* load_weights(tensors, version): the leader forwards the received global
  tensors with the trainer's own bucketed broadcast (weight_sync.send_weights
  / receive_weights, so a transient buffer is one bucket); each member copies
  out its shard.

Calls and weights travel over a gloo group per replica (CPU tensors and
pickled calls, like the trainer's weight push), whatever the TP backend.

A follower runs `serve_replica` until the leader says "stop". A member that
dies breaks its replica's collectives (gloo reports the closed peer), so the
whole replica exits, and the controller reissues the leader's prompts as for
any dead rollout process; the other replicas are unaffected (separate groups).
"""

from __future__ import annotations

import contextlib
import datetime
import logging
from typing import Mapping, Sequence

import torch
import torch.distributed as dist

from megatron_ernie.precision.sharing import split_scales
from megatron_ernie.rl.protocol import WeightsReady
from megatron_ernie.rl.rollout.engine import Generation, GenerationEngine, SamplingParams
from megatron_ernie.rl.weight_sync import plan_push, receive_weights, send_weights

log = logging.getLogger("megatron_ernie.rl.rollout")

IDLE_TIMEOUT_S = 7 * 24 * 3600  # followers wait for the leader's next call for as long as the run lasts


def init_replica_world(system, seed: int):
    """The rollout processes as one torch world whose megatron-core TP groups are the replicas.

    Returns (megatron groups, this replica's gloo group for calls and weights).
    """
    from megatron_ernie.runtime import distributed, groups as G
    from megatron_ernie.runtime.dims import ParallelDims

    world = distributed.init_distributed(timeout_s=IDLE_TIMEOUT_S)
    replicas = system.rollout_replicas(world, "rl.system")  # a clear error, not megatron-core's assertion
    tensor = system.rollout_tensor
    groups = G.build_groups(ParallelDims(world=world, tp=tensor, etp=tensor))
    G.model_parallel_seed(seed)
    control, _ = dist.new_subgroups_by_enumeration(  # a subgroup's own timeout is not the world's: set it
        [list(range(r * tensor, (r + 1) * tensor)) for r in range(replicas)],
        timeout=datetime.timedelta(seconds=IDLE_TIMEOUT_S), backend="gloo")
    return groups, control


class ReplicaLost(Exception):
    """The replica can no longer work in lock step (a member is gone, or a call failed on one) and must end.

    Any RuntimeError inside a replica-wide call becomes this: torch.distributed
    reports a closed peer or a timeout as a plain RuntimeError, wherever it
    surfaces (a broadcast here, or a TP all-reduce inside the model), and
    after any failure the members may be out of step. Deliberately not a
    RuntimeError itself: the rollout worker retries a failed weight sync with
    the trainer, while a broken replica can only exit so that the controller
    reissues its prompts.
    """


@contextlib.contextmanager
def _replica_call():
    try:
        yield
    except RuntimeError as exc:
        raise ReplicaLost(str(exc)[:300]) from exc


def _send_call(group, call: tuple) -> None:
    dist.broadcast_object_list([call], group=group, group_src=0)


def _recv_call(group) -> tuple:
    box = [None]
    dist.broadcast_object_list(box, group=group, group_src=0)
    return box[0]


class ReplicaEngine(GenerationEngine):
    """The leader's view of the replica: each call runs on every member, the leader's result is used."""

    def __init__(self, engine: GenerationEngine, group, wire_dtype: str, bucket_mb: float):
        self.engine, self.group = engine, group
        self.wire_dtype, self.bucket_mb = wire_dtype, bucket_mb  # as the trainer's push (rl.system)

    @property
    def policy_version(self) -> int:
        return self.engine.policy_version

    def weight_shapes(self) -> dict[str, tuple[int, ...]]:
        return self.engine.weight_shapes()

    def load_weights(self, tensors: Mapping[str, torch.Tensor], version: int) -> None:
        weights, scales = split_scales(tensors)
        ready = WeightsReady(version, tuple(plan_push(weights, self.wire_dtype, self.bucket_mb, scales)))
        with _replica_call():
            _send_call(self.group, ("load", ready))
            send_weights(self.group, ready, tensors)
        self.engine.load_weights(tensors, version)  # a shape error is the sync's to report, as without TP

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[Generation]:
        prompts = [list(map(int, p)) for p in prompts]
        with _replica_call():
            _send_call(self.group, ("generate", prompts, params))
            return self.engine.generate(prompts, params)

    def close(self) -> None:
        """Release the followers (they leave serve_replica); nothing to do once a member is gone."""
        try:
            with _replica_call():
                _send_call(self.group, ("stop",))
        except ReplicaLost as exc:
            log.warning(f"rollout replica: could not release the followers: {exc}")


def serve_replica(engine: GenerationEngine, group) -> int:
    """A follower's main loop: run each call the leader broadcasts, until "stop" (0) or the replica is lost (1)."""
    try:
        with _replica_call():
            return _follow(engine, group)
    except ReplicaLost as exc:
        log.error(f"rollout replica follower: lost the replica ({exc}); exiting")
        return 1


def _follow(engine: GenerationEngine, group) -> int:
    while True:
        call = _recv_call(group)
        if call[0] == "stop":
            return 0
        if call[0] == "load":
            ready = call[1]
            tensors, _ = receive_weights(group, ready, engine.weight_shapes())
            try:
                engine.load_weights(tensors, ready.version)
            except (KeyError, ValueError) as exc:  # the leader fails the same way and reports it
                log.error(f"rollout replica follower: weights of version {ready.version} not loaded: {exc}")
        elif call[0] == "generate":
            engine.generate(call[1], call[2])
        else:
            raise ValueError(f"rollout replica: unknown call {call[0]!r} from the leader")
