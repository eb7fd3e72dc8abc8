"""Configuration of FP8 training (the `[fp8]` table).

ERNIE 5.1 trains its GEMMs in FP8 through NVIDIA Transformer Engine (TE). The
same numerics are available on CPU through our exact emulation
(`megatron_ernie.precision`), which the tests and the RL rollout path use.

recipe            "off", or how scaling factors are chosen (TE recipe in brackets):
                  "delayed"   per-tensor scale from an amax history (DelayedScaling)
                  "current"   per-tensor scale from this tensor's amax (Float8CurrentScaling)
                  "blockwise" 1x128 activation/grad tiles, 128x128 weight tiles,
                              power-of-two scales, DeepSeek-V3 style (Float8BlockScaling)
                  "mxfp8"     32-element blocks with E8M0 scales (MXFP8BlockScaling, Blackwell)
format            "hybrid": E4M3 forward, E5M2 gradients; "e4m3": E4M3 everywhere.
backend           "te": Transformer Engine on a GPU; "emulate": our CPU/GPU emulation
                  (dequantise, fp32 GEMMs); "torch": the same recipes and layers as
                  "emulate", but real FP8 GEMMs through torch._scaled_mm (Hopper/Ada
                  GPUs, and torch's CPU kernel), for containers without TE. Its
                  per-rank linear widths must be multiples of 16 (cuBLAS FP8).
amax_history_len, amax_compute_algo ("max" | "most_recent"), margin:
                  delayed-scaling knobs (TE's defaults: 1024, "max", 0). The history
                  knobs are read by "delayed" only; a non-zero margin with any other
                  recipe is an error because TE has no margin there.
bf16_layers_at_start / bf16_layers_at_end:
                  transformer layers kept in bf16 (megatron-core first_last_layers_bf16).
experts_in_fp8    run the MoE expert GEMMs (grouped or sequential) in FP8.
output_layer_in_fp8
                  "emulate"/"torch" only: the LM head in FP8. megatron-core builds its output
                  layer outside TE, so with "te" it is always high precision. With
                  "delayed" its scaling state is checkpointed as
                  output_layer.fp8_scaling._extra_state, so a checkpoint saved without
                  this option (or another recipe) cannot be loaded with it.
param_gather      keep weights in FP8 and all-gather them in FP8 (megatron-core
                  fp8_param + DDP fp8_param_gather; needs the distributed optimizer).
wgrad_in_fp8      False computes the weight-gradient GEMM in high precision
                  (megatron-core fp8_wgrad).

Always high precision, in both backends, whatever the config: the router GEMM
(megatron-core computes it in torch, optionally in fp32), the embeddings (a
lookup, not a GEMM), layer norms, softmax and attention's core.

`validate` checks the values alone and is safe on a login node; `validate_runtime`
(in megatron_ernie.precision.te) checks that the chosen backend really runs here.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_ernie.config.errors import ConfigError

RECIPES = ("off", "delayed", "current", "blockwise", "mxfp8")
FORMATS = ("hybrid", "e4m3")
BACKENDS = ("te", "emulate", "torch")
AMAX_COMPUTE_ALGOS = ("max", "most_recent")


def _require_choice(path: str, name: str, value, choices) -> None:
    if value not in choices:
        raise ConfigError(f"{path}.{name}", value, f"choose one of {list(choices)}")


def _require_int(path: str, name: str, value, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"{path}.{name}", value, f"must be an integer >= {minimum}")


@dataclass(frozen=True)
class FP8Config:
    """FP8 settings; one place maps them to TE and megatron-core (precision/te.py)."""

    recipe: str = "off"
    format: str = "hybrid"
    backend: str = "te"
    amax_history_len: int = 1024
    amax_compute_algo: str = "max"
    margin: int = 0
    bf16_layers_at_start: int = 0
    bf16_layers_at_end: int = 0
    experts_in_fp8: bool = True
    output_layer_in_fp8: bool = False
    param_gather: bool = False
    wgrad_in_fp8: bool = True

    @property
    def enabled(self) -> bool:
        return self.recipe != "off"

    def validate(self, path: str) -> None:
        _require_choice(path, "recipe", self.recipe, RECIPES)
        _require_choice(path, "format", self.format, FORMATS)
        _require_choice(path, "backend", self.backend, BACKENDS)
        _require_choice(path, "amax_compute_algo", self.amax_compute_algo, AMAX_COMPUTE_ALGOS)
        _require_int(path, "amax_history_len", self.amax_history_len, 1)
        _require_int(path, "margin", self.margin, 0)
        _require_int(path, "bf16_layers_at_start", self.bf16_layers_at_start, 0)
        _require_int(path, "bf16_layers_at_end", self.bf16_layers_at_end, 0)
        if self.enabled:
            self._validate_combination(path)

    def _validate_combination(self, path: str) -> None:
        """Reject combinations that TE or megatron-core would ignore or refuse."""
        if self.margin != 0 and self.recipe != "delayed":
            raise ConfigError(
                f"{path}.margin", self.margin,
                f"only recipe 'delayed' has a margin; set margin = 0 for '{self.recipe}'",
            )
        if self.backend == "te":
            self._validate_te(path)
        else:  # "emulate" and "torch" share the layers, so they share the rules
            self._validate_emulate(path)

    def _validate_te(self, path: str) -> None:
        bf16_layers = self.bf16_layers_at_start + self.bf16_layers_at_end
        if bf16_layers and self.recipe == "delayed":
            raise ConfigError(
                f"{path}.bf16_layers_at_start", self.bf16_layers_at_start,
                "megatron-core cannot keep first/last layers in bf16 with delayed scaling "
                "(the amax reduction would break); use recipe 'current' or 'blockwise', "
                "or set bf16_layers_at_start = bf16_layers_at_end = 0",
            )
        if not self.wgrad_in_fp8 and self.recipe != "delayed":
            raise ConfigError(
                f"{path}.wgrad_in_fp8", False,
                f"megatron-core applies fp8_wgrad only to delayed scaling; with "
                f"'{self.recipe}' set wgrad_in_fp8 = true, or use backend 'emulate'",
            )
        if self.output_layer_in_fp8:
            raise ConfigError(
                f"{path}.output_layer_in_fp8", True,
                "megatron-core runs the output layer outside Transformer Engine, so it "
                "cannot be FP8 with backend 'te'; set it to false",
            )

    def _validate_emulate(self, path: str) -> None:
        if self.param_gather:
            raise ConfigError(
                f"{path}.param_gather", True,
                "FP8 parameter all-gather needs Transformer Engine's FP8 tensors; use "
                f"backend 'te' (not '{self.backend}') or set param_gather = false",
            )


def validate_layer_counts(cfg: FP8Config, path: str, num_layers: int, pipeline_size: int) -> None:
    """The bf16 layer counts must fit in one pipeline stage (megatron-core's rule)."""
    per_stage = num_layers // max(pipeline_size, 1)
    for name in ("bf16_layers_at_start", "bf16_layers_at_end"):
        value = getattr(cfg, name)
        if cfg.enabled and value > per_stage:
            raise ConfigError(
                f"{path}.{name}", value,
                f"must be <= num_layers // pipeline size = {per_stage}",
            )
