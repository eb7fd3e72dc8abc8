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

import numpy as np


@dataclass(frozen=True, eq=False)
class BufferLayout:
    numel: int  # elements of the buffer, padding included
    buckets: tuple[tuple[int, int], ...]  # (start, end) of each bucket
    ranges: np.ndarray  # (n, 2): (start, end) of each parameter, in the order given


def _round_up(n, k):
    return -(-n // k) * k


def default_bucket_size(overlap_grad_reduce: bool, dp: int, pp_rank: int, chunk: int) -> int | None:
    """DDP's bucket size: max(4e7, 1e6 * DP) with overlap; unbucketed otherwise and off the first chunk/stage."""
    if not overlap_grad_reduce or pp_rank > 0 or chunk > 0:
        return None
    return max(40_000_000, 1_000_000 * dp)


def _segment(sizes, start_pad: int, end_pad: int, pos: int, bucket_size):
    """Lay out a run of parameters (no shared embedding among them) from buffer offset ``pos``.

    Relative offsets inside the run never change (every step is a multiple of
    64, every bucket end a multiple of 128), so one cumulative sum serves all
    buckets: bucket b shifts its parameters by its own start."""
    rel = np.concatenate([[0], np.cumsum(_round_up(sizes, start_pad))[:-1]])
    rel_end = rel + sizes
    starts = np.empty_like(sizes)
    buckets, i, n = [], 0, len(sizes)
    while i < n:
        j = n if bucket_size is None else min(n, int(np.searchsorted(rel_end, rel[i] + bucket_size)) + 1)
        starts[i:j] = rel[i:j] - rel[i] + pos
        end = int(_round_up(int(starts[j - 1] + sizes[j - 1]), end_pad))
        buckets.append((pos, end))
        pos, i = end, j
    return starts, buckets, pos


def grad_buffer_layout(params, dp: int, distopt: bool, bucket_size: int | None) -> BufferLayout:
    """The buffer DDP allocates for ``params`` (module order); see the module docstring.

    Parameters are laid out in reverse order, each starting at a multiple of 64
    (distributed optimizer); a bucket closes once it holds ``bucket_size``
    elements, before and after a shared embedding, and at the end, and its end
    is padded to lcm(DP, 128) (distributed optimizer)."""
    rev = params[::-1]
    sizes = np.array([p.numel for p in rev], dtype=np.int64)
    alone = [i for i, p in enumerate(rev) if p.shared_embedding and distopt]
    start_pad, end_pad = (64, math.lcm(dp, 128)) if distopt else (1, 1)
    starts, buckets, pos = np.zeros_like(sizes), [], 0
    cuts = sorted({0, len(rev), *alone, *(i + 1 for i in alone)})
    for a, b in zip(cuts, cuts[1:]):
        starts[a:b], seg_buckets, pos = _segment(sizes[a:b], start_pad, end_pad, pos, bucket_size)
        buckets += seg_buckets
    ranges = np.stack([starts, starts + sizes], axis=1)[::-1]
    return BufferLayout(pos, tuple(buckets), ranges)


def owned_by_rank(layout: BufferLayout, dp: int) -> list[tuple[int, int]]:
    """(elements, parameter tensors) whose optimizer state each DP rank keeps.

    With the parameters sorted by position, "elements below offset x" and
    "tensors starting before x" are prefix sums; every rank's range [lo, hi)
    in every bucket is then a handful of binary searches (vectorised)."""
    spans = layout.ranges[np.argsort(layout.ranges[:, 0], kind="stable")]
    starts, ends = spans[:, 0], spans[:, 1]
    below = np.concatenate([[0], np.cumsum(ends - starts)])
    buckets = np.array(layout.buckets, dtype=np.int64).reshape(-1, 2)
    size = (buckets[:, 1] - buckets[:, 0]) // dp
    lo = buckets[:, :1] + size[:, None] * np.arange(dp)[None, :]  # (buckets, dp)
    hi = lo + size[:, None]

    def elements_below(x):
        i = np.searchsorted(starts, x, side="right")
        j = np.maximum(i - 1, 0)
        inside = np.minimum(ends[j], x) - starts[j]
        return np.where(i > 0, below[j] + inside, 0)

    elements = (elements_below(hi) - elements_below(lo)).sum(axis=0)
    tensors = (np.searchsorted(starts, hi, side="left") - np.searchsorted(np.sort(ends), lo, side="right")).sum(axis=0)
    return [(int(e), int(t)) for e, t in zip(elements, tensors)]


def owned_shard(layout: BufferLayout, dp: int, dp_rank: int) -> tuple[int, int]:
    """(elements, parameter tensors) whose optimizer state DP rank ``dp_rank`` keeps."""
    return owned_by_rank(layout, dp)[dp_rank]
