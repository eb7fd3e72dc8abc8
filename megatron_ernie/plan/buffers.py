"""megatron-core DDP's gradient buffers and the distributed optimizer's shards, by arithmetic.

Source: megatron-core 0.16.1 ``distributed/param_and_grad_buffer.py``
(``_ParamAndGradBuffer.__init__``) and ``optimizer/distrib_optimizer.py``
(``_build_model_gbuf_range``), re-derived here so that the planner needs
neither torch nor a process group.

* DDP puts the parameters of one model chunk with one (param dtype, grad dtype)
  into one contiguous buffer, dense parameters and expert parameters
  (``allreduce = False``) separately; it walks them in reverse module order.
* Without the distributed optimizer the buffer is exactly the sum of the
  parameter sizes.  With it, every parameter starts at a multiple of 64
  elements and every bucket ends at a multiple of lcm(DP, 128), so the bucket
  splits evenly into DP shards.
* Buckets: one per buffer unless ``overlap_grad_reduce`` (then a new bucket
  once it holds >= max(4e7, 1e6 * DP) elements), and only on the first chunk of
  pipeline rank 0; a tied embedding with PP > 1 gets a bucket of its own.
* Distributed optimizer (docs: megatron-core "Distributed Optimizer"): DP rank
  r owns elements [r * n / DP, (r + 1) * n / DP) of each bucket of n elements and
  keeps optimizer state only for the parameter elements inside its range.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from megatron_ernie.plan.inventory import Param


@dataclass(frozen=True)
class BufferLayout:
    numel: int  # elements of the buffer, padding included
    buckets: tuple[tuple[int, int], ...]  # (start, end) of each bucket
    ranges: tuple[tuple[int, int], ...]  # (start, end) of each parameter, in the order given


def _round_up(n: int, k: int) -> int:
    return -(-n // k) * k


def default_bucket_size(overlap_grad_reduce: bool, dp: int, pp_rank: int, chunk: int) -> int | None:
    """DDP's bucket size: max(4e7, 1e6 * DP) with overlap; unbucketed otherwise and off the first chunk/stage."""
    if not overlap_grad_reduce or pp_rank > 0 or chunk > 0:
        return None
    return max(40_000_000, 1_000_000 * dp)


def grad_buffer_layout(params: list[Param], dp: int, distopt: bool, bucket_size: int | None) -> BufferLayout:
    """The buffer DDP allocates for ``params`` (module order); see the module docstring."""
    end_pad = math.lcm(dp, 128) if distopt else 1
    start_pad = 64 if distopt else 1
    ranges: dict[int, tuple[int, int]] = {}
    buckets: list[tuple[int, int]] = []
    bucket_start = pos = 0
    open_bucket = False
    for i in reversed(range(len(params))):
        p = params[i]
        pos = _round_up(pos, start_pad)
        own_bucket = p.shared_embedding and distopt
        if own_bucket and open_bucket:
            pos = _round_up(pos, end_pad)
            buckets.append((bucket_start, pos))
            bucket_start = pos
        ranges[i] = (pos, pos + p.numel)
        pos, open_bucket = pos + p.numel, True
        if (bucket_size is not None and pos - bucket_start >= bucket_size) or own_bucket:
            pos = _round_up(pos, end_pad)
            buckets.append((bucket_start, pos))
            bucket_start, open_bucket = pos, False
    if open_bucket:
        pos = _round_up(pos, end_pad)
        buckets.append((bucket_start, pos))
    return BufferLayout(pos, tuple(buckets), tuple(ranges[i] for i in range(len(params))))


def owned_shard(layout: BufferLayout, dp: int, dp_rank: int) -> tuple[int, int]:
    """(elements, parameter tensors) whose optimizer state DP rank ``dp_rank`` keeps."""
    elements = tensors = 0
    for start, end in layout.buckets:
        size = (end - start) // dp
        lo, hi = start + dp_rank * size, start + (dp_rank + 1) * size
        for p_start, p_end in layout.ranges:
            n = min(hi, p_end) - max(lo, p_start)
            if n > 0:
                elements, tensors = elements + n, tensors + 1
    return elements, tensors
