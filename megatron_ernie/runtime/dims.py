"""Parallel dimensions: pure arithmetic, no torch.distributed.

megatron-core lays ranks out as TP x CP x DP x PP for dense parts and
ETP x EP x EDP x PP for expert parts (the two views share PP and the world).
Everything here is checked before a process group exists, so a bad layout
fails in a second with a message naming the setting to change, instead of
minutes later inside ``initialize_model_parallel``.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_ernie.config.errors import ConfigError


@dataclass(frozen=True)
class ParallelDims:
    world: int
    tp: int = 1
    pp: int = 1
    vpp: int = 1
    cp: int = 1
    ep: int = 1
    etp: int = 1

    @property
    def dp(self) -> int:
        return self.world // (self.tp * self.pp * self.cp)

    @property
    def expert_dp(self) -> int:
        return self.world // (self.etp * self.ep * self.pp)

    def validate(self) -> None:
        model = self.tp * self.pp * self.cp
        if self.world % model:
            raise ConfigError("parallel", f"world={self.world}, tensor*pipeline*context={model}",
                              "the number of processes must be a multiple of tensor*pipeline*context")
        expert = self.etp * self.ep * self.pp
        if self.world % expert:
            raise ConfigError("parallel", f"world={self.world}, expert_tensor*expert*pipeline={expert}",
                              "the number of processes must be a multiple of expert_tensor*expert*pipeline")

    def num_microbatches(self, global_batch: int, micro_batch: int) -> int:
        per_step = micro_batch * self.dp
        if global_batch % per_step:
            raise ConfigError("train.global_batch_size", global_batch,
                              f"must be a multiple of micro_batch_size*data_parallel = {micro_batch}*{self.dp}")
        return global_batch // per_step


def dims_from_config(parallel, world: int) -> ParallelDims:
    """Build the dims from a ``ParallelConfig`` and the launched world size."""
    dims = ParallelDims(world=world, tp=parallel.tensor, pp=parallel.pipeline,
                        vpp=parallel.virtual_pipeline, cp=parallel.context,
                        ep=parallel.expert, etp=parallel.expert_tensor_size)
    dims.validate()
    return dims
