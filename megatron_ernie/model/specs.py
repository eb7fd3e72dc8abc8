"""Layer specs: which module implements each part of a decoder layer.

megatron-core describes a layer as a ``ModuleSpec`` tree; swapping a
submodule (TE vs local linear, our RMSNorm, an FP8-emulating linear, an
elastic expert) is done here, once, so layer code never branches on backend.
The Transformer Engine spec is used when TE imports and a GPU is present;
otherwise megatron-core's local spec with our sequence-parallel-aware norms.
"""

from __future__ import annotations

import dataclasses
from functools import lru_cache

import torch
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_ernie.model import norm
from megatron_ernie.model.router import ErnieTopKRouter


@lru_cache(maxsize=1)
def transformer_engine_usable() -> bool:
    """TE needs CUDA; a partial install raises RuntimeError/OSError, not ImportError."""
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:
        return False
    return True


def substitute(obj, replacements: dict):
    """Return the spec tree with module classes replaced according to ``replacements``."""
    if isinstance(obj, type):
        return replacements.get(obj, obj)
    if isinstance(obj, ModuleSpec):
        return dataclasses.replace(obj, module=substitute(obj.module, replacements),
                                   submodules=substitute(obj.submodules, replacements))
    if isinstance(obj, (list, tuple)):
        return type(obj)(substitute(o, replacements) for o in obj)
    if dataclasses.is_dataclass(obj):
        changes = {f.name: substitute(getattr(obj, f.name), replacements) for f in dataclasses.fields(obj)}
        return dataclasses.replace(obj, **changes)
    return obj


def local_replacements(normalization: str) -> dict:
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    return {WrappedTorchNorm: norm.RMSNorm if normalization == "RMSNorm" else norm.LayerNorm}


def decoder_block_spec(tconfig, use_te: bool, vp_stage: int | None):
    """The decoder block spec for this rank's layers (and virtual chunk)."""
    spec = get_gpt_decoder_block_spec(tconfig, use_transformer_engine=use_te,
                                      normalization=tconfig.normalization, vp_stage=vp_stage)
    from megatron.core.transformer.moe.router import TopKRouter

    replacements = {TopKRouter: ErnieTopKRouter}
    if not use_te:
        replacements.update(local_replacements(tconfig.normalization))
    return substitute(spec, replacements)
