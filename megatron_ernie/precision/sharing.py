"""Unified FP8: the trainer's delayed-scaling scales travel with its weights to the rollout engines.

ERNIE 5.1 runs training and rollout through one FP8 operator library so that
the policy that generates and the policy that learns compute the same numbers.
With a stateless recipe (current, blockwise, mxfp8) sharing the FP8 modules is
enough: every scale is derived from the tensor being quantised. Delayed scaling
is different: a linear quantises with a scale derived from its amax *history*,
and that history lives in the trainer. A rollout engine that kept its own
history would quantise the same weights and activations with other scales. So
the trainer publishes, with every weight version, the forward scales (input
and weight) of each FP8 linear; the rollout engine installs them and freezes
its state, and generation quantises exactly as the trainer's next forward will.

Names: each linear's scaling state is a megatron-core ShardedObject
(`<linear>._extra_state`, see megatron_linear.py) whose `unique_key` carries
global layer and expert indices, so a trainer at any TP/PP/EP/DP layout and an
unsharded rollout engine agree on them. Scales travel as fp32 in their own
weight-sync bucket: rounded to bf16 they would change the quantisation.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core.dist_checkpointing.mapping import ShardedObject, is_main_replica
from megatron.core.utils import unwrap_model

PREFIX = "fp8_scale/"
FORWARD_ROLES = ("input", "weight")  # the backward (grad_output) scale never runs in a rollout
EXTRA_STATE = "._extra_state"


def scaling_holders(chunks) -> dict[str, tuple[torch.nn.Module, bool]]:
    """{ShardedObject unique_key: (module holding the delayed-scaling state, main replica?)}.

    Read once from megatron-core's sharded_state_dict, whose keys are the
    local module paths (`<module>._extra_state`) and whose ShardedObjects carry
    the layout-independent key. A module without a saved extra state (the
    output layer, whose state travels in its `fp8_scaling` child) is skipped.
    """
    holders = {}
    for chunk in chunks:
        model = unwrap_model(chunk)
        sharded = model.sharded_state_dict()
        for name, module in model.named_modules():
            obj = sharded.get(f"{name}{EXTRA_STATE}")
            if getattr(module, "fp8_state", None) is not None and isinstance(obj, ShardedObject) \
                    and obj.data is not None:
                holders[obj.unique_key] = (module, is_main_replica(obj.replica_id))
    return holders


def scale_names(holders) -> list[str]:
    """The weight-sync names of every forward scale, sorted."""
    return sorted(f"{PREFIX}{key}/{role}" for key in holders for role in FORWARD_ROLES)


def local_scales(holders) -> dict[str, float]:
    """This rank's forward scales (main replicas only: the amax reduction made replicas equal)."""
    return {f"{PREFIX}{key}/{role}": float(module.fp8_state.metas[role].scale)
            for key, (module, main) in holders.items() if main for role in FORWARD_ROLES}


def gather_scales(holders, group=None, dst: int = 0) -> dict[str, torch.Tensor] | None:
    """Every forward scale of the model as fp32 [1] tensors on rank `dst` of `group` (None elsewhere).

    A handful of floats per linear, so one all_gather_object suffices; fp32 ->
    Python float -> fp32 is exact.
    """
    mine = local_scales(holders)
    parts = [mine]
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        parts = [None] * dist.get_world_size(group)
        dist.all_gather_object(parts, mine, group=group)
        if dist.get_rank(group) != dst:
            return None
    merged = {name: value for part in parts for name, value in part.items()}
    return {name: torch.tensor([value], dtype=torch.float32) for name, value in sorted(merged.items())}


def install_scales(holders, tensors) -> None:
    """Quantise with the trainer's scales from now on: set them and freeze the amax history."""
    missing = sorted(set(scale_names(holders)) - set(tensors))
    if missing:
        raise KeyError(f"weight update lacks {len(missing)} FP8 scales, e.g. {missing[:2]}: trainer and rollout "
                       "must use the same [fp8] recipe and rl.system.fp8_roles")
    for key, (module, _) in holders.items():
        state = module.fp8_state
        for role in FORWARD_ROLES:
            state.metas[role].scale = tensors[f"{PREFIX}{key}/{role}"].detach().float().reshape(()).clone()
        state.set_mode("frozen")


def split_scales(tensors) -> tuple[dict, dict]:
    """(weights, scales) of one received weight update."""
    weights = {k: v for k, v in tensors.items() if not k.startswith(PREFIX)}
    return weights, {k: v for k, v in tensors.items() if k.startswith(PREFIX)}


__all__ = ["PREFIX", "gather_scales", "install_scales", "local_scales", "scale_names", "scaling_holders",
           "split_scales"]
