"""The one place where FP8Config meets Transformer Engine and megatron-core.

Recipe names, TE classes and the TE releases that first ship them (the same
thresholds megatron-core 0.16.1 checks in fp8_utils.get_fp8_recipe):

  ours        TE class (common.recipe)   megatron fp8_recipe   TE >=
  delayed     DelayedScaling             "delayed"             1.7.0 (MoE FP8)
  current     Float8CurrentScaling       "tensorwise"          2.2.0
  blockwise   Float8BlockScaling         "blockwise"           2.3.0 (+ Hopper or newer)
  mxfp8       MXFP8BlockScaling          "mxfp8"               2.1.0 (+ Blackwell)

Why a runtime check at all: without an importable TE, megatron-core accepts
`fp8="hybrid"` and silently trains in bf16 (its TE classes become stand-ins).
Every function here that hands FP8 settings to TE or megatron-core first
proves that TE imports and a GPU exists, so FP8 can never quietly become bf16.
Importing TE without CUDA can raise RuntimeError or OSError, not only
ImportError, hence the broad `except Exception` in the probe.

With backend "emulate" or "torch", megatron-core gets `fp8=None` (it must not look for TE)
and FP8 comes from the layer specs instead (megatron_linear.apply_fp8_to_spec).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch
from packaging.version import Version

from megatron_ernie.config.errors import ConfigError
from megatron_ernie.config.fp8 import FP8Config

TE_CLASS = {"delayed": "DelayedScaling", "current": "Float8CurrentScaling",
            "blockwise": "Float8BlockScaling", "mxfp8": "MXFP8BlockScaling"}
TE_MIN_VERSION = {"delayed": "1.7.0", "current": "2.2.0.dev0",
                  "blockwise": "2.3.0.dev0", "mxfp8": "2.1.0"}
MEGATRON_RECIPE = {"delayed": "delayed", "current": "tensorwise",
                   "blockwise": "blockwise", "mxfp8": "mxfp8"}
# TE's hardware probes, by recipe; they moved from pytorch.fp8 to pytorch.quantization.
TE_SUPPORT_CHECK = {"delayed": "check_fp8_support", "current": "check_fp8_support",
                    "blockwise": "check_fp8_block_scaling_support", "mxfp8": "check_mxfp8_support"}


@dataclass(frozen=True)
class TEStatus:
    """Whether Transformer Engine can run FP8 here, and why not."""

    usable: bool
    version: Optional[str]
    reason: str


def probe_transformer_engine() -> TEStatus:
    """Import TE and look for a CUDA device; never raises."""
    try:
        import transformer_engine
        import transformer_engine.pytorch  # noqa: F401  (the part that needs CUDA)
    except Exception as error:  # ImportError, or RuntimeError/OSError from a partial install
        why = f"transformer_engine does not import ({type(error).__name__}: {error})"
        return TEStatus(False, None, why)
    version = str(getattr(transformer_engine, "__version__", "0"))
    if not torch.cuda.is_available():
        return TEStatus(False, version, "no CUDA GPU is visible to torch")
    return TEStatus(True, version, "")


def validate_runtime(cfg: FP8Config, path: str = "fp8") -> None:
    """For backend 'te': TE imports, a GPU exists, and this TE and GPU run the recipe.

    For backend 'torch': this torch runs FP8 GEMMs on this device (precision/model.py).
    """
    if cfg.enabled and cfg.backend == "torch":
        from megatron_ernie.precision.model import validate_scaled_mm_runtime

        validate_scaled_mm_runtime(cfg)
    if not cfg.enabled or cfg.backend != "te":
        return
    status = probe_transformer_engine()
    if not status.usable:
        raise ConfigError(
            f"{path}.backend", cfg.backend,
            f"Transformer Engine cannot run here: {status.reason}. Install "
            "transformer-engine[pytorch] on a CUDA machine, or set backend = \"emulate\" "
            "to emulate FP8 exactly (slowly) without it",
        )
    _check_te_version(cfg, path, status.version)
    _check_te_hardware(cfg, path)


def _check_te_version(cfg: FP8Config, path: str, version: str) -> None:
    needed = TE_MIN_VERSION[cfg.recipe]
    if Version(version) < Version(needed):
        raise ConfigError(
            f"{path}.recipe", cfg.recipe,
            f"{TE_CLASS[cfg.recipe]} needs transformer-engine >= {needed.replace('.dev0', '')}, "
            f"installed is {version}; upgrade TE or choose another recipe",
        )


def _check_te_hardware(cfg: FP8Config, path: str) -> None:
    check = _te_function(TE_SUPPORT_CHECK[cfg.recipe])
    if check is None:
        return
    supported, reason = check()
    if not supported:
        raise ConfigError(
            f"{path}.recipe", cfg.recipe,
            f"this GPU cannot run {TE_CLASS[cfg.recipe]} ({reason}); choose another recipe "
            "(mxfp8 needs Blackwell, blockwise needs Hopper or newer)",
        )


def _te_function(name: str):
    """A TE probe function from whichever module this TE version keeps it in."""
    import importlib

    for module in ("transformer_engine.pytorch.quantization", "transformer_engine.pytorch.fp8"):
        try:
            return getattr(importlib.import_module(module), name)
        except Exception:
            continue
    return None


def te_recipe(cfg: FP8Config, path: str = "fp8"):
    """The transformer_engine.common.recipe object for cfg (backend 'te')."""
    if not cfg.enabled:
        raise ConfigError(f"{path}.recipe", cfg.recipe, "FP8 is off; there is no TE recipe")
    validate_runtime(cfg, path)
    from transformer_engine.common import recipe as te_recipes

    recipe_cls = getattr(te_recipes, TE_CLASS[cfg.recipe])
    return recipe_cls(**te_recipe_kwargs(cfg, _field_names(recipe_cls)))


def _field_names(cls) -> set:
    if dataclasses.is_dataclass(cls):
        return {field.name for field in dataclasses.fields(cls)}
    import inspect

    return set(inspect.signature(cls).parameters)


def te_recipe_kwargs(cfg: FP8Config, accepted: set) -> dict:
    """Keyword arguments for the TE recipe class; `accepted` = that class's fields."""
    from transformer_engine.common.recipe import Format

    kwargs = {"fp8_format": Format.HYBRID if cfg.format == "hybrid" else Format.E4M3}
    if cfg.recipe == "delayed":
        kwargs.update(margin=cfg.margin, amax_history_len=cfg.amax_history_len,
                      amax_compute_algo=cfg.amax_compute_algo)
        if not cfg.wgrad_in_fp8:
            if "override_linear_precision" not in accepted:
                raise ConfigError("fp8.wgrad_in_fp8", False,
                                  "this TE version has no override_linear_precision; set it to true")
            kwargs["override_linear_precision"] = (False, False, True)
    return kwargs


def megatron_fp8_fields(cfg: FP8Config) -> dict:
    """megatron-core TransformerConfig FP8 fields for cfg, without any runtime check."""
    if not cfg.enabled or cfg.backend != "te":  # "emulate"/"torch": FP8 comes from the layer specs
        return {"fp8": None, "fp8_param": False}
    bf16_layers = cfg.bf16_layers_at_start > 0 or cfg.bf16_layers_at_end > 0
    return {
        "fp8": cfg.format,
        "fp8_recipe": MEGATRON_RECIPE[cfg.recipe],
        "fp8_margin": cfg.margin,
        "fp8_amax_history_len": cfg.amax_history_len,
        "fp8_amax_compute_algo": cfg.amax_compute_algo,
        "fp8_wgrad": cfg.wgrad_in_fp8,
        "fp8_param": cfg.param_gather,
        "first_last_layers_bf16": bf16_layers,
        "num_layers_at_start_in_bf16": cfg.bf16_layers_at_start,
        "num_layers_at_end_in_bf16": cfg.bf16_layers_at_end,
    }


def transformer_config_kwargs(cfg: FP8Config, path: str = "fp8") -> dict:
    """TransformerConfig FP8 fields; raises unless backend 'te' really runs here."""
    validate_runtime(cfg, path)
    return megatron_fp8_fields(cfg)


def ddp_config_kwargs(cfg: FP8Config) -> dict:
    """DistributedDataParallelConfig FP8 fields (FP8 parameter all-gather)."""
    gather = cfg.enabled and cfg.backend == "te" and cfg.param_gather
    return {"fp8_param_gather": gather}
