"""Per-rank memory of one layout, term by term, from the config alone.

Static terms (exact; tests/test_plan_dist.py counts them on built models):

* parameters: each local parameter in the model dtype (bf16: 2 B, fp32: 4 B;
  FP8 parameters with ``fp8.param_gather``: 1 B).  With the distributed
  optimizer megatron-core moves them into DDP's padded parameter buffer, so
  the padding counts too (buffers.py).
* main-grad buffers: DDP accumulates gradients in fp32 (``grad_reduce_in_fp32``,
  model/build.py), 4 B per buffer element, padding included.
* optimizer state (AdamW, megatron-core ``get_megatron_optimizer``): two fp32
  moments per owned element, a 4-byte ``step`` tensor per owned parameter
  tensor (torch.optim), and for a bf16 model an fp32 master copy per owned
  element.  Without the distributed optimizer a rank owns every local element;
  with it, its shard of each bucket (megatron-core distributed optimizer docs:
  "optimizer state is sharded across data-parallel ranks"), i.e.
  ``(8 + 4 * bf16) / DP`` bytes per element instead of ``8 + 4 * bf16``.

Activation terms (estimates) are in activations.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from megatron_ernie.plan.buffers import default_bucket_size, grad_buffer_layout, owned_by_rank
from megatron_ernie.plan.inventory import rank_chunks

GRAD_BYTES = 4  # grad_reduce_in_fp32 = True
MOMENT_BYTES = 8  # exp_avg + exp_avg_sq in fp32
STEP_BYTES = 4  # torch.optim's per-parameter float32 "step" tensor
MASTER_BYTES = 4  # fp32 master copy of a bf16 parameter


@dataclass(frozen=True)
class StaticMemory:
    params: int
    grads: int
    optimizer: int

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer


@dataclass(frozen=True)
class RankPosition:
    """Where a rank sits: its pipeline rank and its rank in the dense and expert DP groups."""

    pp_rank: int = 0
    dp_rank: int | None = 0  # None: the DP rank that owns the most optimizer state
    expert_dp_rank: int | None = 0


def param_bytes_per_element(model, fp8=None) -> int:
    if fp8 is not None and fp8.recipe != "off" and fp8.param_gather:
        return 1
    return 2 if model.dtype == "bf16" else 4


def dp_sizes(par, world: int) -> tuple[int, int]:
    """(dense data-parallel size, expert data-parallel size) — runtime/dims.py."""
    dp = world // (par.tensor * par.pipeline * par.context)
    edp = world // (par.expert_tensor_size * par.expert * par.pipeline)
    return dp, edp


def _optimizer_bytes(elements: int, tensors: int, bf16: bool) -> int:
    return elements * (MOMENT_BYTES + MASTER_BYTES * bf16) + tensors * STEP_BYTES


@dataclass(frozen=True, eq=False)
class Buffer:
    """One DDP buffer of one chunk: its parameters, DP group size and layout."""

    params: tuple
    dp: int
    layout: object  # buffers.BufferLayout
    expert: bool


@lru_cache(maxsize=4096)
def rank_buffers(model, moe, par, vocab_size: int, world: int, pp_rank: int) -> tuple[Buffer, ...]:
    """The dense and expert gradient buffers of every chunk of one pipeline rank."""
    dp, edp = dp_sizes(par, world)
    out = []
    for chunk, params in enumerate(rank_chunks(model, moe, par, vocab_size, pp_rank)):
        bucket = default_bucket_size(par.overlap_grad_reduce, dp, pp_rank, chunk)
        for expert, size in ((False, dp), (True, edp)):
            group = tuple(p for p in params if p.expert == expert)
            if group:
                layout = grad_buffer_layout(group, size, par.distributed_optimizer, bucket)
                out.append(Buffer(group, size, layout, expert))
    return tuple(out)


def _buffer_terms(buf: Buffer, dp_rank, distopt: bool, pbytes: int, bf16: bool):
    if distopt:
        owned = owned_by_rank(buf.layout, buf.dp)
        elements, tensors = max(owned) if dp_rank is None else owned[dp_rank]
        param_storage = buf.layout.numel * pbytes
    else:
        elements, tensors = buf.layout.numel, len(buf.params)  # unpadded without the distributed optimizer
        param_storage = elements * pbytes
    return param_storage, buf.layout.numel * GRAD_BYTES, _optimizer_bytes(elements, tensors, bf16)


def static_memory(model, moe, par, vocab_size: int, world: int, where: RankPosition = RankPosition(),
                  fp8=None) -> StaticMemory:
    """Bytes of parameters, main-grad buffers and optimizer state on one rank."""
    pbytes, bf16 = param_bytes_per_element(model, fp8), model.dtype == "bf16"
    totals = [0, 0, 0]
    for buf in rank_buffers(model, moe, par, vocab_size, world, where.pp_rank):
        rank = where.expert_dp_rank if buf.expert else where.dp_rank
        terms = _buffer_terms(buf, rank, par.distributed_optimizer, pbytes, bf16)
        totals = [a + b for a, b in zip(totals, terms)]
    return StaticMemory(*totals)
