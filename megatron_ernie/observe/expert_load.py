"""Per-layer expert load from megatron-core's routers.

A forward hook on every ``TopKRouter`` reads its routing map (tokens x
experts, True where a token is sent) and accumulates tokens per expert.  The
imbalance we report is max/mean load (1.0 = perfectly balanced), the usual
MoE diagnostic: the busiest expert bounds the step time under expert
parallelism.  Counts are summed over the data-parallel, tensor and expert
groups so the logging rank sees the whole batch for the layers it owns;
layers on other pipeline stages are logged by their own stage's logging rank.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class ExpertLoadTracker:
    def __init__(self, model_chunks):
        from megatron.core.transformer.moe.router import TopKRouter

        self.counts: dict[int, torch.Tensor] = {}
        self._handles = []
        for chunk in model_chunks:
            for module in chunk.modules():
                if isinstance(module, TopKRouter):
                    self._handles.append(module.register_forward_hook(self._hook))

    def _hook(self, module, inputs, output):
        routing_map = output[1]
        per_expert = routing_map.detach().sum(dim=0).to(torch.float64)
        layer = int(module.layer_number)
        self.counts[layer] = self.counts.get(layer, 0) + per_expert

    def reduce_and_reset(self, groups=()) -> dict[str, float]:
        """Scalars 'expert_load/layer_{i}/imbalance' and per-expert fractions; clears counts."""
        out = {}
        for layer in sorted(self.counts):
            counts = self.counts[layer].clone()
            for group in groups if dist.is_initialized() else ():
                if group is not None and dist.get_world_size(group) > 1:
                    dist.all_reduce(counts, group=group)
            total = counts.sum().clamp(min=1)
            out[f"expert_load/layer_{layer}/imbalance"] = (counts.max() / counts.mean().clamp(min=1e-9)).item()
            for e, c in enumerate(counts.tolist()):
                out[f"expert_load/layer_{layer}/expert_{e}"] = c / total.item()
        self.counts.clear()
        return out

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
