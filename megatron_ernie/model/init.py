"""Layout-invariant weight initialisation.

megatron-core initialises each rank's shard from whatever RNG position that
rank happens to be at, so the same seed gives different models at TP2 vs PP2
vs EP2.  We instead derive every tensor from (seed, its checkpoint key, its
layer/expert index): the full tensor is drawn from a generator seeded by that
triple and each rank copies its own slice.  The same seed then gives the same
model at any layout, which is what makes cross-layout equivalence testable and
lets a user change the layout of a run without changing its initial weights.

Standard deviations follow megatron-core: N(0, std) for every matrix, with
output projections (attention ``linear_proj`` and MLP ``linear_fc2``) scaled
by 1/sqrt(2*num_layers) (GPT-2); norm weights keep their ones.
"""

from __future__ import annotations

import hashlib
import math

import torch
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

_SCALED = ("linear_proj.weight", "linear_fc2.weight")


def local_shards(chunk) -> list[ShardedTensor]:
    """This rank's ShardedTensors of a model chunk (views into its parameters).

    megatron-core's own helpers: factories (e.g. the swiglu fc1 split) are
    built in place, then the nested state dict is flattened.
    """
    state = chunk.sharded_state_dict()
    apply_factories(state)
    return [v for v in nested_values(state) if isinstance(v, ShardedTensor)]


def _seed_for(seed: int, key: str, index: tuple) -> int:
    digest = hashlib.sha256(f"{seed}|{key}|{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _is_matrix_weight(sh: ShardedTensor) -> bool:
    return sh.key.endswith("weight") and "norm" not in sh.key and len(sh.local_shape) >= 2


def _init_one(sh: ShardedTensor, seed: int, std: float) -> None:
    k = sh.prepend_axis_num
    index = tuple(sh.global_offset[:k])
    gen = torch.Generator().manual_seed(_seed_for(seed, sh.key, index))
    full = torch.randn(tuple(sh.global_shape[k:]), generator=gen, dtype=torch.float32) * std
    local = full[tuple(sh.global_slice()[k:])]
    with torch.no_grad():
        sh.data.copy_(local.reshape(sh.data.shape).to(sh.data.dtype))


def init_layout_invariant(chunks, seed: int, std: float, num_layers: int) -> int:
    """Re-initialise all matrix weights of ``chunks``; returns how many tensors were set."""
    scaled_std = std / math.sqrt(2.0 * num_layers)
    count = 0
    for chunk in chunks:
        for sh in local_shards(chunk):
            if sh.data is None or not _is_matrix_weight(sh):
                continue
            _init_one(sh, seed, scaled_std if sh.key.endswith(_SCALED) else std)
            count += 1
    return count
