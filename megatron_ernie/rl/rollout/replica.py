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
* load_weights(tensors, version): the leader's received global tensors are
  broadcast as one flat buffer per dtype; each member copies out its shard.

A follower runs `serve_replica` until the leader says "stop". A member that
dies breaks its replica's collectives (gloo reports the closed peer), so the
whole replica exits, and the controller reissues the leader's prompts as for
any dead rollout process; the other replicas are unaffected (separate groups).
"""

from __future__ import annotations

import contextlib
import logging
from typing import Mapping, Sequence

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from megatron_ernie.rl.rollout.engine import Generation, GenerationEngine, SamplingParams

log = logging.getLogger("megatron_ernie.rl.rollout")

IDLE_TIMEOUT_S = 7 * 24 * 3600  # followers wait for the leader's next call for as long as the run lasts


def init_replica_world(system, seed: int):
    """The rollout processes as one torch world whose megatron-core TP groups are the replicas."""
    from megatron_ernie.runtime import distributed, groups as G
    from megatron_ernie.runtime.dims import ParallelDims

    world = distributed.init_distributed(timeout_s=IDLE_TIMEOUT_S)
    system.rollout_replicas(world, "rl.system")  # a clear error, not megatron-core's assertion
    tensor = system.rollout_tensor
    groups = G.build_groups(ParallelDims(world=world, tp=tensor, etp=tensor))
    G.model_parallel_seed(seed)
    return groups


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


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


class _Channel:
    """Leader -> followers broadcasts over the replica's TP group."""

    def __init__(self, group):
        self.group = group

    def send_call(self, call: tuple) -> None:
        dist.broadcast_object_list([call], group=self.group, group_src=0)

    def recv_call(self) -> tuple:
        box = [None]
        dist.broadcast_object_list(box, group=self.group, group_src=0)
        return box[0]

    def tensors(self, flat: torch.Tensor) -> torch.Tensor:
        flat = flat.to(_device())
        dist.broadcast(flat, group=self.group, group_src=0)
        return flat


def _layout(tensors: Mapping[str, torch.Tensor]) -> list[tuple[torch.dtype, list[tuple[str, tuple[int, ...]]]]]:
    """Names and shapes grouped by dtype, in a fixed order: what followers need to receive them."""
    by_dtype: dict[torch.dtype, list] = {}
    for name in sorted(tensors):
        by_dtype.setdefault(tensors[name].dtype, []).append((name, tuple(tensors[name].shape)))
    return sorted(by_dtype.items(), key=lambda item: str(item[0]))


def _exchange_weights(channel: _Channel, layout, tensors: Mapping[str, torch.Tensor] | None) -> dict:
    """Broadcast one flat buffer per dtype; every member returns the same name -> tensor dict."""
    out = {}
    for dtype, entries in layout:
        if tensors is not None:
            flat = _flatten_dense_tensors([tensors[name].contiguous() for name, _ in entries])
        else:
            flat = torch.empty(sum(torch.Size(shape).numel() for _, shape in entries), dtype=dtype)
        flat = channel.tensors(flat)
        views = _unflatten_dense_tensors(flat, [torch.empty(shape, dtype=dtype, device="meta")
                                                for _, shape in entries])
        out.update({name: view for (name, _), view in zip(entries, views)})
    return out


class ReplicaEngine(GenerationEngine):
    """The leader's view of the replica: each call runs on every member, the leader's result is used."""

    def __init__(self, engine: GenerationEngine, group):
        self.engine, self.channel = engine, _Channel(group)

    @property
    def policy_version(self) -> int:
        return self.engine.policy_version

    def weight_shapes(self) -> dict[str, tuple[int, ...]]:
        return self.engine.weight_shapes()

    def load_weights(self, tensors: Mapping[str, torch.Tensor], version: int) -> None:
        layout = _layout(tensors)
        with _replica_call():
            self.channel.send_call(("load", version, layout))
            received = _exchange_weights(self.channel, layout, tensors)
        self.engine.load_weights(received, version)  # local copies: a shape error is the sync's to report

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[Generation]:
        prompts = [list(map(int, p)) for p in prompts]
        with _replica_call():
            self.channel.send_call(("generate", prompts, params))
            return self.engine.generate(prompts, params)

    def close(self) -> None:
        """Release the followers (they exit serve_replica)."""
        with _replica_call():
            self.channel.send_call(("stop",))


def serve_replica(engine: GenerationEngine, group) -> int:
    """A follower's main loop: run each call the leader broadcasts, until "stop" (0) or the leader is lost (1)."""
    try:
        with _replica_call():
            return _follow(engine, _Channel(group))
    except ReplicaLost as exc:
        log.error(f"rollout replica follower: lost the replica ({exc}); exiting")
        return 1


def _follow(engine: GenerationEngine, channel: _Channel) -> int:
    while True:
        call = channel.recv_call()
        if call[0] == "stop":
            return 0
        if call[0] == "load":
            _, version, layout = call
            tensors = _exchange_weights(channel, layout, None)
            try:
                engine.load_weights(tensors, version)
            except (KeyError, ValueError) as exc:  # the leader fails the same way and reports it
                log.error(f"rollout replica follower: weights of version {version} not loaded: {exc}")
        elif call[0] == "generate":
            engine.generate(call[1], call[2])
        else:
            raise ValueError(f"rollout replica: unknown call {call[0]!r} from the leader")
