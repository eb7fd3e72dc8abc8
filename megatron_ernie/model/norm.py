"""Normalisation layers for the local (non Transformer Engine) layer spec.

megatron-core's local spec wraps ``torch.nn.RMSNorm`` but refuses sequence
parallelism, which megatron-core requires whenever MoE is combined with TP.
With sequence parallelism each TP rank normalises a different slice of the
sequence with the *same* weight, so the weight's gradient is a partial sum
that must be all-reduced over the TP group.  megatron-core already does that
for every parameter tagged ``sequence_parallel=True`` (see
``finalize_model_grads``); tagging the weight is all this module adds.
"""

import torch


class RMSNorm(torch.nn.RMSNorm):
    """torch RMSNorm with megatron-core's constructor and SP tagging."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **_unused):
        super().__init__(hidden_size, eps=eps, dtype=config.params_dtype)
        self.weight.sequence_parallel = bool(config.sequence_parallel)


class LayerNorm(torch.nn.LayerNorm):
    """torch LayerNorm with megatron-core's constructor and SP tagging."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **_unused):
        super().__init__(hidden_size, eps=eps, dtype=config.params_dtype)
        for p in self.parameters():
            p.sequence_parallel = bool(config.sequence_parallel)
