"""Trainer -> rollout weight sync: gather sharded weights, broadcast them in versioned buckets.

Addressing: every weight is named by its megatron-core checkpoint key and
lives, whole, in a "global" shape that no layout changes (the same key space
dist_checkpointing uses to reshard checkpoints). A trainer rank contributes
the shards it owns (main replicas only: data-parallel copies are skipped),
trainer rank 0 assembles the global tensors, and a rollout engine copies from
them into its own shards. Trainer and rollout may therefore use different
TP/PP/EP layouts and dtypes (fp32 trainer -> bf16 rollout).

Transport: one gloo process group per membership "generation" spanning trainer
rank 0 (group rank 0, the source) and every live rollout worker. It is built
from a TCPStore that the controller hosts, under the prefix
"wsync/<generation>", so no role's own torch.distributed world is touched.
When a rollout worker dies, a broadcast on the old group fails or times out
(sync_timeout_s) and the controller announces generation + 1 without it.
Buckets: the global tensors are concatenated, in sorted key order, into flat
buffers of at most sync_bucket_mb and broadcast one by one; a `WeightsReady`
message lists each bucket's keys and byte size, and the receiver checks both
against the shapes its own model expects before copying.

On GPUs the same code runs over NCCL (a bucket per broadcast, pinned staging);
the gather to trainer rank 0 would then use per-bucket collectives instead of
point-to-point sends.
"""

from __future__ import annotations

import datetime
import math
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core.dist_checkpointing.mapping import ShardedTensor, is_main_replica
from megatron.core.utils import unwrap_model

from megatron_ernie.model.init import local_shards

from megatron_ernie.rl.protocol import WeightBucket, WeightsReady
from megatron_ernie.runtime.cpu_compat import native_torch

_WIRE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


# ------------------------------------------------------------------ shard views
def shard_views(chunks) -> dict[str, list[ShardedTensor]]:
    """This rank's shards of every weight, by checkpoint key (views into the live parameters).

    The swiglu fc1 weight appears twice per key (its two halves, torch.chunk
    views), so each key maps to a list.
    """
    views: dict[str, list[ShardedTensor]] = {}
    for chunk in chunks:
        module = unwrap_model(chunk)
        for sh in local_shards(module):
            if torch.is_tensor(sh.data) and sh.data.is_floating_point():
                views.setdefault(sh.key, []).append(sh)
    return views


def global_shapes(views: dict[str, list[ShardedTensor]]) -> dict[str, tuple[int, ...]]:
    return {key: tuple(shards[0].global_shape) for key, shards in views.items()}


def load_global(views: dict[str, list[ShardedTensor]], tensors) -> None:
    """Copy global tensors into this rank's shards (dtype converted); every key must be present."""
    missing = sorted(set(views) - set(tensors))
    if missing:
        raise KeyError(f"weight update lacks {len(missing)} tensors, e.g. {missing[:3]}: trainer and rollout "
                       "must build the same model (model/moe sections)")
    with torch.no_grad(), native_torch():
        for key, shards in views.items():
            full = tensors[key]
            for sh in shards:
                if tuple(full.shape) != tuple(sh.global_shape):
                    raise ValueError(f"weight {key}: got shape {tuple(full.shape)}, the model expects "
                                     f"{tuple(sh.global_shape)}")
                sh.data.copy_(full[sh.global_slice()].reshape(sh.data.shape))


# ------------------------------------------------------------ trainer gather
def _shard_meta(views) -> list[tuple]:
    """(key, index in the key's list, global shape, global slice bounds) of this rank's main replicas."""
    meta = []
    for key in sorted(views):
        for i, sh in enumerate(views[key]):
            if is_main_replica(sh.replica_id):
                meta.append((key, i, tuple(sh.global_shape), tuple(sh.global_offset), tuple(sh.local_shape),
                             sh.prepend_axis_num))
    return meta


def _slice_of(offset, local_shape, prepend: int):
    return tuple(offset[:prepend]) + tuple(slice(o, o + n) for o, n in zip(offset[prepend:], local_shape))


def gather_global(views, group=None, dst: int = 0) -> dict[str, torch.Tensor] | None:
    """Assemble every global fp32 tensor on rank `dst` of `group` (None elsewhere).

    Metadata goes by all_gather_object; shard data by point-to-point sends in
    an order every rank derives from that metadata (no pickled tensors).
    """
    size = dist.get_world_size(group) if dist.is_initialized() else 1
    rank = dist.get_rank(group) if dist.is_initialized() else 0
    mine = _shard_meta(views)
    metas = [mine]
    if size > 1:
        metas = [None] * size
        dist.all_gather_object(metas, mine, group=group)
    with native_torch():
        if rank != dst:
            for key, i, *_ in mine:
                dist.send(views[key][i].data.detach().float().contiguous(), dist.get_global_rank(group, dst)
                          if group is not None else dst, group=group)
            return None
        return _assemble(views, metas, rank, group)


def _assemble(views, metas, rank: int, group) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for src, meta in enumerate(metas):
        for key, i, shape, offset, local_shape, prepend in meta:
            if src == rank and _whole(shape, offset, local_shape, prepend):
                tensors[key] = views[key][i].data.detach().to(torch.float32, copy=True).reshape(shape)
                continue  # an unsharded tensor (every tensor at TP1/EP1): one copy, no zeros to fill
            if src == rank:
                part = views[key][i].data.detach()
            else:
                part = torch.empty(local_shape, dtype=torch.float32)
                dist.recv(part, dist.get_global_rank(group, src) if group is not None else src, group=group)
            if key not in tensors:
                tensors[key] = torch.zeros(shape, dtype=torch.float32)
            region = tensors[key][_slice_of(offset, local_shape, prepend)]  # a view: basic indexing only
            region.copy_(part.reshape(region.shape))
    return tensors


def _whole(shape, offset, local_shape, prepend: int) -> bool:
    """True if one shard is the whole global tensor."""
    return prepend == 0 and tuple(local_shape) == tuple(shape) and not any(offset)


# ------------------------------------------------------------------- buckets
def plan_buckets(shapes: dict[str, tuple[int, ...]], wire_dtype: str, bucket_mb: float,
                 first_index: int = 0) -> list[WeightBucket]:
    """Sorted keys packed greedily into buckets of <= bucket_mb (a larger tensor gets its own bucket)."""
    itemsize = torch.tensor([], dtype=_WIRE_DTYPES[wire_dtype]).element_size()
    limit = max(1, int(bucket_mb * 2**20))
    buckets, names, nbytes = [], [], 0
    for key in sorted(shapes):
        size = math.prod(shapes[key]) * itemsize
        if names and nbytes + size > limit:
            buckets.append(WeightBucket(first_index + len(buckets), nbytes, wire_dtype, tuple(names)))
            names, nbytes = [], 0
        names.append(key)
        nbytes += size
    if names:
        buckets.append(WeightBucket(first_index + len(buckets), nbytes, wire_dtype, tuple(names)))
    return buckets


def plan_push(tensors: dict, wire_dtype: str, bucket_mb: float, exact: dict | None = None) -> list[WeightBucket]:
    """Buckets of one weight version: `tensors` in the wire dtype, then `exact` ones (FP8 scales) in fp32."""
    shapes = {k: tuple(t.shape) for k, t in tensors.items()}
    buckets = plan_buckets(shapes, wire_dtype, bucket_mb)
    if exact:
        buckets += plan_buckets({k: tuple(t.shape) for k, t in exact.items()}, "fp32", bucket_mb, len(buckets))
    return buckets


def pack_bucket(bucket: WeightBucket, tensors) -> torch.Tensor:
    dtype = _WIRE_DTYPES[bucket.dtype]
    with native_torch():
        return torch.cat([tensors[k].detach().reshape(-1).to(dtype) for k in bucket.names])


def unpack_bucket(bucket: WeightBucket, flat: torch.Tensor, shapes) -> dict[str, torch.Tensor]:
    unknown = [k for k in bucket.names if k not in shapes]
    if unknown:
        raise ValueError(f"weight bucket {bucket.index} holds {len(unknown)} tensors this rollout model lacks, "
                         f"e.g. {unknown[:2]}: trainer and rollout must use the same model, [fp8] and rl.system")
    expected = sum(math.prod(shapes[k]) for k in bucket.names) * flat.element_size()
    if expected != bucket.nbytes:
        raise ValueError(f"weight bucket {bucket.index}: {bucket.nbytes} bytes announced, the model's shapes "
                         f"need {expected}: trainer and rollout models differ")
    out, start = {}, 0
    for key in bucket.names:
        n = math.prod(shapes[key])
        out[key] = flat[start:start + n].view(shapes[key])
        start += n
    return out


# ------------------------------------------------------------ sync group
@dataclass(frozen=True)
class GroupAddress:
    host: str
    port: int
    generation: int
    rank: int
    size: int


def connect_group(address: GroupAddress, timeout_s: float):
    """The gloo group of one membership generation (a rendezvous: blocks until all members join)."""
    store = dist.TCPStore(address.host, address.port, is_master=False,
                          timeout=datetime.timedelta(seconds=timeout_s))
    prefixed = dist.PrefixStore(f"wsync/{address.generation}", store)
    return dist.ProcessGroupGloo(prefixed, address.rank, address.size, datetime.timedelta(seconds=timeout_s))


def _broadcast(group, tensor: torch.Tensor) -> None:
    opts = dist.BroadcastOptions()
    opts.rootRank, opts.rootTensor = 0, 0
    group.broadcast([tensor], opts).wait()


@dataclass
class SyncStats:
    version: int
    nbytes: int
    seconds: float

    @property
    def bytes_per_s(self) -> float:
        return self.nbytes / max(self.seconds, 1e-9)


def send_weights(group, ready: WeightsReady, tensors) -> SyncStats:
    """Source side (group rank 0): broadcast every bucket of `ready`."""
    start, nbytes = time.perf_counter(), 0
    for bucket in ready.buckets:
        flat = pack_bucket(bucket, tensors)
        _broadcast(group, flat)
        nbytes += bucket.nbytes
    return SyncStats(ready.version, nbytes, time.perf_counter() - start)


def receive_weights(group, ready: WeightsReady, shapes) -> tuple[dict[str, torch.Tensor], SyncStats]:
    """Receiver side: the global tensors of `ready`, checked against this model's `shapes`."""
    start, tensors = time.perf_counter(), {}
    for bucket in ready.buckets:
        dtype = _WIRE_DTYPES[bucket.dtype]
        flat = torch.empty(bucket.nbytes // torch.tensor([], dtype=dtype).element_size(), dtype=dtype)
        _broadcast(group, flat)
        tensors.update(unpack_bucket(bucket, flat, shapes))
    return tensors, SyncStats(ready.version, sum(b.nbytes for b in ready.buckets), time.perf_counter() - start)
