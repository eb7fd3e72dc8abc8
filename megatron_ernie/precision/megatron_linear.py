"""megatron-core linear layers whose GEMMs run in FP8 (emulated, or real with backend "torch").

`fp8_linear_classes(cfg)` returns subclasses of megatron-core's
ColumnParallelLinear / RowParallelLinear. They keep the parents' parameters,
initialisation, sharded_state_dict and tensor-parallel behaviour; only
`_forward_impl` (the parents' GEMM hook) changes: the input goes through the
same megatron-core collectives that the parents' fused GEMM performs
(sequence-parallel all-gather forward / reduce-scatter backward, or the dgrad
all-reduce), then through `emulated_fp8_linear`. Delayed-scaling amaxes are
max-reduced over megatron-core's FP8 amax reduction group (TP x DP x CP), as
megatron-core asks TE to do, so every rank holds the same scales.

The scaling state is saved through `get_extra_state` / `set_extra_state`,
which megatron-core's sharded_state_dict already turns into a ShardedObject
(`<prefix>_extra_state`). It is deliberately not a buffer: Float16Module calls
`.bfloat16()` on the model, which would round fp32 buffers. GPTModel's output
layer is the exception: GPTModel drops that key, so `keep_scaling_state_in_child`
moves the state to `<prefix>fp8_scaling._extra_state`.

Not supported, with a clear error: defer_embedding_wgrad_compute (the output
layer's deferred wgrad). gradient_accumulation_fusion is accepted; the
weight gradient is returned as .grad, which megatron-core's DDP adds to
main_grad.

Known gap: with activation recomputation, delayed scaling counts the
recomputed forward as one more step in its amax history (TE instead replays
the saved forward scales).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional, Tuple

import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
)

from megatron_ernie.config.errors import ConfigError
from megatron_ernie.config.fp8 import FP8Config
from megatron_ernie.precision.gemm import GEMM_ALIGNMENT
from megatron_ernie.precision.linear import emulated_fp8_linear
from megatron_ernie.precision.recipes import build_emulated_recipe


def amax_reduction_group():
    """megatron-core's FP8 amax group, or None when it is absent or a single rank."""
    if not parallel_state.model_parallel_is_initialized():
        return None
    group = parallel_state.get_amax_reduction_group(with_context_parallel=True)
    return group if group is not None and group.size() > 1 else None


class _EmulatedFP8Mixin:
    """Shared by both subclasses; `fp8_config` is set by fp8_linear_classes."""

    fp8_config: FP8Config

    def _init_fp8(self) -> None:
        if self.fp8_config.backend == "torch":
            check_scaled_mm_shape(self._per_rank_weight_shape(), type(self).__name__)
        self.fp8_recipe = build_emulated_recipe(self.fp8_config)
        self.fp8_state = self.fp8_recipe.new_state()

    def _per_rank_weight_shape(self) -> Tuple[int, int]:
        """[out, in] of this rank's weight (also when the weight is passed in, e.g. a tied LM head)."""
        out = getattr(self, "output_size_per_partition", None) or self.output_size
        inp = getattr(self, "input_size_per_partition", None) or self.input_size
        return out, inp

    def _forward_impl(self, input, weight, bias=None, gradient_accumulation_fusion=False,
                      allreduce_dgrad=False, sequence_parallel=False, tp_group=None,
                      grad_output_buffer=None, wgrad_deferral_limit=None, **unused):
        if grad_output_buffer is not None:
            raise ValueError(
                "defer_embedding_wgrad_compute is not supported by the FP8-emulated linear; "
                "keep the output layer in high precision (fp8.output_layer_in_fp8 = false) "
                "or disable defer_embedding_wgrad_compute"
            )
        if sequence_parallel:
            input = gather_from_sequence_parallel_region(
                input, tensor_parallel_output_grad=True, group=tp_group or self.tp_group
            )
        elif allreduce_dgrad:
            input = copy_to_tensor_model_parallel_region(input, group=tp_group or self.tp_group)
        return emulated_fp8_linear(
            input, weight, bias, self.fp8_recipe, self.fp8_state, amax_reduction_group()
        )

    def get_extra_state(self) -> Optional[dict]:
        """Delayed-scaling meta (amax histories, scales); None for stateless recipes."""
        if CHILD_STATE_NAME in self._modules:
            return None
        return _pack_scaling_state(self.fp8_recipe, self.fp8_state)

    def set_extra_state(self, state: Any) -> None:
        """Restore the meta; None (a bf16 or stateless checkpoint) keeps fresh scales."""
        if CHILD_STATE_NAME not in self._modules:
            _load_scaling_state(self.fp8_recipe, self.fp8_state, state)


def check_scaled_mm_shape(shape: Tuple[int, int], layer: str) -> None:
    """backend "torch": cuBLAS FP8 GEMMs need both weight dims to be multiples of 16.

    Both are a K or N of some GEMM (fprop: K = in, N = out; dgrad: K = out,
    N = in). Token counts vary per micro-batch and expert, so gemm.py pads
    those instead; a weight would have to be padded on every call.
    """
    bad = [size for size in shape if size % GEMM_ALIGNMENT]
    if bad:
        raise ConfigError(
            "fp8.backend", "torch",
            f"{layer} has a per-rank weight of shape {list(shape)}; real FP8 GEMMs need both "
            f"dims to be multiples of {GEMM_ALIGNMENT}. Choose model sizes (hidden_size, "
            "ffn_hidden_size, expert_ffn_hidden_size, heads x kv_channels, divided by the tensor "
            "parallel size) that are, keep this layer in bf16, or set backend = \"emulate\"",
        )


def _pack_scaling_state(recipe, state) -> Optional[dict]:
    if state is None:
        return None
    return {"recipe": recipe.name, "scaling": state.state_dict()}


def _load_scaling_state(recipe, state, saved: Any) -> None:
    if saved is None or state is None:
        return
    if not isinstance(saved, dict) or saved.get("recipe") != recipe.name:
        found = saved.get("recipe") if isinstance(saved, dict) else type(saved).__name__
        raise ValueError(
            f"checkpoint holds FP8 state of recipe {found!r}, model uses "
            f"{recipe.name!r}; set fp8.recipe to match the checkpoint"
        )
    state.load_state_dict(saved["scaling"])


CHILD_STATE_NAME = "fp8_scaling"


class FP8ScalingStateHolder(torch.nn.Module):
    """Carries a linear's scaling state as `<linear>.fp8_scaling._extra_state`.

    Needed for GPTModel's output layer: GPTModel.sharded_state_dict drops
    `output_layer._extra_state` (megatron-core keeps that key only for old
    checkpoints and asserts it is empty), so the state travels in this child,
    which megatron-core's linear sharded_state_dict turns into a ShardedObject
    like any other `_extra_state`. Holds the linear's own state object, which
    loading updates in place.
    """

    def __init__(self, recipe, state):
        super().__init__()
        self.recipe, self.state = recipe, state

    @property
    def fp8_state(self):
        """The same name as on the linears, for code that walks scaling-state holders."""
        return self.state

    def get_extra_state(self) -> Optional[dict]:
        return _pack_scaling_state(self.recipe, self.state)

    def set_extra_state(self, state: Any) -> None:
        _load_scaling_state(self.recipe, self.state, state)


class EmulatedFP8ColumnParallelLinear(_EmulatedFP8Mixin, ColumnParallelLinear):
    """ColumnParallelLinear with emulated FP8 GEMMs (bind a config via fp8_linear_classes)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_fp8()


class EmulatedFP8RowParallelLinear(_EmulatedFP8Mixin, RowParallelLinear):
    """RowParallelLinear with emulated FP8 GEMMs (bind a config via fp8_linear_classes)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_fp8()


@functools.lru_cache(maxsize=None)
def fp8_linear_classes(cfg: FP8Config) -> Tuple[type, type]:
    """(ColumnCls, RowCls) bound to `cfg`; the same classes for an equal config.

    cfg.recipe 'off' returns megatron-core's own classes unchanged.
    """
    if not cfg.enabled:
        return ColumnParallelLinear, RowParallelLinear
    suffix = f"{cfg.recipe.capitalize()}{cfg.format.upper()}" + ("Torch" if cfg.backend == "torch" else "")
    column = type(f"FP8{suffix}ColumnParallelLinear",
                  (EmulatedFP8ColumnParallelLinear,), {"fp8_config": cfg})
    row = type(f"FP8{suffix}RowParallelLinear",
               (EmulatedFP8RowParallelLinear,), {"fp8_config": cfg})
    return column, row


def convert_linear_to_fp8(linear, cfg: FP8Config):
    """Turn an already built Column/RowParallelLinear into its FP8 class, in place.

    For layers that megatron-core builds outside the spec tree, e.g. GPTModel's
    output_layer when fp8.output_layer_in_fp8 is set. Weights are kept.
    """
    column, row = fp8_linear_classes(cfg)
    target = {ColumnParallelLinear: column, RowParallelLinear: row}.get(type(linear))
    if target is None:
        raise TypeError(f"expected a plain Column/RowParallelLinear, got {type(linear).__name__}")
    if cfg.enabled:
        linear.__class__ = target
        linear._init_fp8()
    return linear


def keep_scaling_state_in_child(linear) -> None:
    """Checkpoint an FP8 linear's scaling state through a child module (see FP8ScalingStateHolder).

    For GPTModel's output layer; a checkpoint saved without it lacks the
    `output_layer.fp8_scaling._extra_state` object and cannot be loaded into a
    model that has it (dist_checkpointing reports the missing key). Stateless
    recipes have nothing to carry and get no child.
    """
    if linear.fp8_state is not None:
        linear.add_module(CHILD_STATE_NAME, FP8ScalingStateHolder(linear.fp8_recipe, linear.fp8_state))


def is_emulated_fp8_linear(module) -> bool:
    """Whether `module` (or a class) is one of the FP8-emulating linears."""
    cls = module if isinstance(module, type) else type(module)
    return issubclass(cls, _EmulatedFP8Mixin)


def layer_uses_fp8(cfg: FP8Config, layer_index: int, num_layers: int) -> bool:
    """Whether transformer layer `layer_index` (0-based, global) runs in FP8.

    Same rule as megatron-core's is_first_last_bf16_layer.
    """
    if not cfg.enabled:
        return False
    in_first = layer_index < cfg.bf16_layers_at_start
    in_last = layer_index >= num_layers - cfg.bf16_layers_at_end
    return not (in_first or in_last)


def apply_fp8_to_spec(spec, cfg: FP8Config):
    """A copy of a local-backend ModuleSpec tree with the linears swapped for FP8 ones.

    Replaces every ColumnParallelLinear / RowParallelLinear class in the tree
    (attention, dense MLP, shared experts, SequentialMLP experts). With
    cfg.experts_in_fp8 False the `experts` subtree is left in high precision.
    Returns `spec` itself when FP8 is off.
    """
    if not cfg.enabled:
        return spec
    column, row = fp8_linear_classes(cfg)
    swap = {ColumnParallelLinear: column, RowParallelLinear: row}
    return _swap_classes(spec, swap, keep_experts=not cfg.experts_in_fp8)


def _check_emulatable(cls: type) -> None:
    """GEMMs that bypass Column/RowParallelLinear would silently stay in bf16."""
    if cls.__name__ == "GroupedMLP" or cls.__module__.endswith("extensions.transformer_engine"):
        raise ValueError(
            f"{cls.__module__}.{cls.__name__} is a Transformer Engine or grouped-GEMM module "
            "that FP8 emulation cannot reach (it swaps Column/RowParallelLinear only); "
            "build the local spec with "
            "moe_grouped_gemm=False (SequentialMLP experts) and without Transformer Engine, "
            "or set fp8.experts_in_fp8 = false"
        )


def _swap_classes(node, swap: dict, keep_experts: bool):
    if isinstance(node, type):
        _check_emulatable(node)
        return swap.get(node, node)
    if isinstance(node, (list, tuple)):
        return type(node)(_swap_classes(item, swap, keep_experts) for item in node)
    if not dataclasses.is_dataclass(node) or isinstance(node, type):
        return node
    changes = {}
    for field in dataclasses.fields(node):
        if keep_experts and field.name == "experts":
            continue
        value = getattr(node, field.name)
        new_value = _swap_classes(value, swap, keep_experts)
        if new_value is not value:
            changes[field.name] = new_value
    return dataclasses.replace(node, **changes) if changes else node


__all__ = [
    "EmulatedFP8ColumnParallelLinear",
    "EmulatedFP8RowParallelLinear",
    "apply_fp8_to_spec",
    "convert_linear_to_fp8",
    "fp8_linear_classes",
    "is_emulated_fp8_linear",
    "keep_scaling_state_in_child",
    "layer_uses_fp8",
]
