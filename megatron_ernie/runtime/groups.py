"""Process groups, built once and passed around explicitly.

This module is the only caller of megatron-core's ``parallel_state``.  It
initialises megatron's groups (megatron-core modules still read some of them
globally) and hands back a ``ProcessGroupCollection`` plus our ranks, which
the model, optimizer, data loader and logger receive as arguments.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.process_groups_config import ProcessGroupCollection

from megatron_ernie.runtime.dims import ParallelDims


@dataclass(frozen=True)
class Groups:
    dims: ParallelDims
    pgs: ProcessGroupCollection
    tp_rank: int
    pp_rank: int
    dp_rank: int
    ep_rank: int

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.dims.pp - 1

    @property
    def is_logging_rank(self) -> bool:
        """The last pipeline stage's first TP/DP rank sees the loss: it writes logs."""
        return self.is_last_stage and self.tp_rank == 0 and self.dp_rank == 0

    def stage_has(self, chunk: int) -> tuple[bool, bool]:
        """(pre_process, post_process) for virtual-pipeline chunk ``chunk`` on this rank."""
        first = self.pp_rank == 0 and chunk == 0
        last = self.pp_rank == self.dims.pp - 1 and chunk == self.dims.vpp - 1
        return first, last


def build_groups(dims: ParallelDims) -> Groups:
    """Initialise megatron-core model parallelism for ``dims`` on the default world."""
    ps.destroy_model_parallel()
    ps.initialize_model_parallel(
        tensor_model_parallel_size=dims.tp,
        pipeline_model_parallel_size=dims.pp,
        virtual_pipeline_model_parallel_size=dims.vpp if dims.vpp > 1 else None,
        context_parallel_size=dims.cp,
        expert_model_parallel_size=dims.ep,
        expert_tensor_parallel_size=dims.etp,
    )
    return Groups(
        dims=dims,
        pgs=ProcessGroupCollection.use_mpu_process_groups(),
        tp_rank=ps.get_tensor_model_parallel_rank(),
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        dp_rank=ps.get_data_parallel_rank(),
        ep_rank=ps.get_expert_model_parallel_rank(),
    )


def destroy_groups() -> None:
    ps.destroy_model_parallel()


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def global_rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def model_parallel_seed(seed: int) -> None:
    """megatron-core's per-TP/EP RNG streams (dropout in TP regions, experts)."""
    from megatron.core import tensor_parallel

    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def set_virtual_pipeline_rank(chunk: int | None) -> None:
    """megatron-core reads the virtual-pipeline rank globally while building chunks."""
    ps.set_virtual_pipeline_model_parallel_rank(chunk)


def current_layout() -> dict:
    """The layout as a plain dict (stored in checkpoints, compared on resume)."""
    return {"world": world_size(), "tp": ps.get_tensor_model_parallel_world_size(),
            "pp": ps.get_pipeline_model_parallel_world_size(),
            "vpp": ps.get_virtual_pipeline_model_parallel_world_size() or 1,
            "ep": ps.get_expert_model_parallel_world_size(),
            "etp": ps.get_expert_tensor_parallel_world_size()}
