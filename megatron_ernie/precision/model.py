"""How the `[fp8]` section changes the model: one `Extensions` value per backend.

backend "emulate": the FP8 layers are megatron-core Column/RowParallelLinear
subclasses (megatron_linear.py). Each transformer layer that runs in FP8 (all
but the `bf16_layers_at_start/end`, megatron-core's first/last-layers rule)
gets its spec rewritten to use them; the output layer, which GPTModel builds
outside the spec tree, is converted in place after the build when
`output_layer_in_fp8` is set (its scaling state is checkpointed through a
child module, see megatron_linear.keep_scaling_state_in_child). megatron-core
itself is told nothing (fp8=None), so it never looks for Transformer Engine.
The rewrite needs megatron-core's local spec: where the build would use the
TE spec (TE and a GPU present), "emulate" is refused with a ConfigError.

backend "torch": the same layers and spec rewrite as "emulate"; their GEMMs
are real FP8 GEMMs (torch._scaled_mm, precision/gemm.py). Before the build we
prove that this torch runs them on this device (a tiny GEMM per format pair),
else a ConfigError names fp8.backend; layer widths that cuBLAS cannot take are
refused when the layer is built (megatron_linear.py).

backend "te": Transformer Engine does the FP8 GEMMs. megatron-core gets its
FP8 TransformerConfig fields (precision/te.py) and builds the TE spec; no spec
is rewritten. Both steps first prove that TE imports and a GPU exists, and
raise a ConfigError otherwise: without TE, megatron-core would accept
fp8="hybrid" and quietly train in bf16.
"""

from __future__ import annotations

import functools

from megatron_ernie.config.errors import ConfigError
from megatron_ernie.config.fp8 import FP8Config
from megatron_ernie.model.extensions import Extensions


def fp8_extensions(fp8: FP8Config, num_layers: int) -> Extensions:
    """The model changes for `fp8`; empty when the recipe is "off"."""
    if not fp8.enabled:
        return Extensions()
    if fp8.backend == "te":
        return _te_extensions(fp8)
    return _emulated_extensions(fp8, num_layers)


def _te_extensions(fp8: FP8Config) -> Extensions:
    """TransformerConfig FP8 fields; raises unless TE and a GPU really run the recipe."""
    from megatron_ernie.model.specs import transformer_engine_usable
    from megatron_ernie.precision.te import transformer_config_kwargs

    fields = transformer_config_kwargs(fp8, "fp8")
    if not transformer_engine_usable():  # same probe as te.validate_runtime; never bf16 silently
        raise ConfigError("fp8.backend", fp8.backend,
                          "the model build would not use Transformer Engine here; "
                          "set backend = \"emulate\"")
    from megatron_ernie.precision.te import ddp_config_kwargs

    return Extensions(tconfig=fields, ddp=ddp_config_kwargs(fp8))


def _emulated_extensions(fp8: FP8Config, num_layers: int) -> Extensions:
    from megatron_ernie.model.specs import transformer_engine_usable

    if transformer_engine_usable():  # the build picks TE layers, which emulation cannot reach
        raise ConfigError("fp8.backend", fp8.backend,
                          "Transformer Engine is usable here, so the model is built from TE layers "
                          "that the emulation cannot replace; set backend = \"te\"")
    if fp8.backend == "torch":
        validate_scaled_mm_runtime(fp8)
    post_build = (functools.partial(_convert_output_layer, fp8),) if fp8.output_layer_in_fp8 else ()
    return Extensions(layer_spec=(functools.partial(_rewrite_layer, fp8, num_layers),),
                      post_build=post_build)


def validate_scaled_mm_runtime(fp8: FP8Config, device=None) -> None:
    """backend "torch": this torch must run FP8 GEMMs on the training device, or a ConfigError."""
    import torch

    from megatron_ernie.precision.gemm import scaled_mm_unavailable_reason

    reason = scaled_mm_unavailable_reason(device)
    if reason is not None:
        raise ConfigError("fp8.backend", fp8.backend,
                          f"real FP8 GEMMs cannot run here with torch {torch.__version__}: {reason}; "
                          "set backend = \"emulate\" (same numerics, fp32 GEMMs) or run on a "
                          "Hopper/Ada GPU")


def _rewrite_layer(fp8: FP8Config, num_layers: int, index: int, spec):
    """Swap the layer's linears for FP8 ones unless it is one of the bf16 layers."""
    from megatron_ernie.precision.megatron_linear import apply_fp8_to_spec, layer_uses_fp8

    return apply_fp8_to_spec(spec, fp8) if layer_uses_fp8(fp8, index, num_layers) else spec


def _convert_output_layer(fp8: FP8Config, chunk) -> None:
    """The LM head of the last pipeline stage (GPTModel builds it outside the spec)."""
    from megatron_ernie.precision.megatron_linear import convert_linear_to_fp8, keep_scaling_state_in_child

    output_layer = getattr(chunk, "output_layer", None)
    if getattr(chunk, "post_process", False) and output_layer is not None:
        convert_linear_to_fp8(output_layer, fp8)
        keep_scaling_state_in_child(output_layer)  # GPTModel drops output_layer._extra_state


def fp8_linears(module) -> dict:
    """{qualified name: layer} of every FP8-emulating linear in `module`, in module order."""
    from megatron_ernie.precision.megatron_linear import is_emulated_fp8_linear

    return {name: sub for name, sub in module.named_modules() if is_emulated_fp8_linear(sub)}


def fp8_scaling_state(module) -> dict:
    """{linear name: {role: {"amax_history", "scale"}}} of the delayed-scaling layers.

    What a checkpoint must carry; used to compare a resumed model with the saved one.
    """
    return {name: layer.fp8_state.state_dict()
            for name, layer in fp8_linears(module).items() if layer.fp8_state is not None}


def set_scaling_mode(chunks, mode: str) -> int:
    """Put every delayed-scaling state of `chunks` in `mode` (recipes.LinearScalingState); returns how many."""
    states = [layer.fp8_state for chunk in chunks for layer in fp8_linears(chunk).values()
              if layer.fp8_state is not None]
    for state in states:
        state.set_mode(mode)
    return len(states)


def commit_step_scaling(chunks) -> None:
    """End of an optimizer step in "per_step" mode: one amax-history step per layer.

    Every rank of megatron-core's amax reduction group reaches the same layers
    in the same order (same pipeline stage, same module tree), so the
    max-reductions pair up as they do in the forward.
    """
    from megatron_ernie.precision.megatron_linear import amax_reduction_group

    group = amax_reduction_group()
    for chunk in chunks:
        for layer in fp8_linears(chunk).values():
            if layer.fp8_state is not None and layer.fp8_state.mode == "per_step":
                layer.fp8_state.commit(group)
