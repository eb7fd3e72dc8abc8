"""FP8 recipes: how each GEMM operand of a linear layer is quantised.

A linear layer y = x W^T runs three GEMMs, and TE quantises every operand of
each along that GEMM's reduction dimension (x: [tokens, in], W: [out, in],
dy: [tokens, out]):

  fprop  y  = x  W^T   x rowwise (blocks along `in`),   W rowwise (along `in`)
  dgrad  dx = dy W     dy rowwise (along `out`),         W columnwise (along `out`)
  wgrad  dW = dy^T x   dy columnwise (along tokens),     x columnwise (along tokens)

Forward operands use the forward format (E4M3); dy uses the backward format
(E5M2 for "hybrid"). Per-tensor recipes (delayed, current) quantise each tensor
once and reuse the same FP8 values for both usages, as TE's Float8Tensor does
(the transpose of a per-tensor FP8 tensor is exact). Block recipes quantise the
rowwise and the columnwise copies separately from the high-precision tensor, as
TE's Float8BlockScaling and MXFP8BlockScaling do, because a transposed block
layout is not the same quantisation; the 128x128 weight tiles are symmetric, so
one copy serves both. Bias gradients come from the unquantised dy, as in TE.

The quantisation is the same for fp8.backend "emulate" and "torch"; a recipe's
`gemms` (gemm.py) then multiplies the operands, dequantised in fp32 or as real
FP8 GEMMs.
"""

from __future__ import annotations

from typing import Optional, Tuple

from megatron_ernie.config.fp8 import FP8Config
from megatron_ernie.precision.formats import FP8Format, formats_for
from megatron_ernie.precision.gemm import gemms_for_backend
from megatron_ernie.precision.quantize import (
    Block,
    QuantizedTensor,
    quantize_blockwise,
    quantize_current,
    quantize_tensorwise,
)
from megatron_ernie.precision.scaling import (
    DelayedScalingState,
    abs_max,
    e8m0_exponent,
    e8m0_scale,
    scale_from_amax,
)

Pair = Tuple[Optional[QuantizedTensor], Optional[QuantizedTensor]]


class LinearScalingState:
    """Delayed-scaling meta of one linear layer: input and weight (forward), grad (backward).

    `mode` says when a quantisation's amax reaches the history:
      "live"      at once, after every quantisation (TE: every forward/backward);
      "per_step"  recorded, folded in by commit() once per optimizer step, so every
                  micro-batch of a step quantises with the same scales (the RL trainer
                  under unified FP8, whose rollouts used exactly those scales);
      "frozen"    never (a rollout engine running on the trainer's scales).
    """

    ROLES = ("input", "weight", "grad_output")
    MODES = ("live", "per_step", "frozen")

    def __init__(self, cfg: FP8Config):
        self.mode = "live"
        fwd, bwd = formats_for(cfg.format)
        fmax = {"input": fwd.max_normal, "weight": fwd.max_normal, "grad_output": bwd.max_normal}
        self.metas = {
            role: DelayedScalingState(
                cfg.amax_history_len, cfg.amax_compute_algo, cfg.margin, fmax[role]
            )
            for role in self.ROLES
        }

    def set_mode(self, mode: str) -> None:
        if mode not in self.MODES:
            raise ValueError(f"scaling mode {mode!r}: use one of {self.MODES}")
        self.mode = mode

    def commit(self, group=None) -> None:
        """per_step mode: fold the step's largest amaxes (max-reduced over `group`) into the history."""
        for meta in self.metas.values():
            meta.commit(group)

    def state_dict(self) -> dict:
        return {role: meta.state_dict() for role, meta in self.metas.items()}

    def load_state_dict(self, state: dict) -> None:
        missing = set(self.ROLES) - set(state)
        if missing:
            raise ValueError(f"FP8 scaling state lacks {sorted(missing)}; got keys {sorted(state)}")
        for role, meta in self.metas.items():
            meta.load_state_dict(state[role])


class EmulatedRecipe:
    """Base class: the formats, and one method per operand group of a linear layer."""

    name = "base"
    stateful = False

    def __init__(self, cfg: FP8Config):
        self.fwd, self.bwd = formats_for(cfg.format)
        self.wgrad_in_fp8 = cfg.wgrad_in_fp8
        self.gemms = gemms_for_backend(cfg.backend)  # how quantised operands are multiplied

    def new_state(self) -> Optional[LinearScalingState]:
        return None

    def quantize_input(self, x, state, group, need_wgrad: bool) -> Pair:
        raise NotImplementedError

    def quantize_weight(self, w, state, group, need_dgrad: bool = True) -> Pair:
        raise NotImplementedError

    def quantize_grad(self, g, state, group, need_dgrad: bool, need_wgrad: bool) -> Pair:
        raise NotImplementedError


class _PerTensorRecipe(EmulatedRecipe):
    """One FP8 copy per tensor serves both of its GEMMs."""

    def _quantize(self, x, fmt: FP8Format, state, role: str, group) -> QuantizedTensor:
        raise NotImplementedError

    def quantize_input(self, x, state, group, need_wgrad):
        qt = self._quantize(x, self.fwd, state, "input", group)
        return qt, qt

    def quantize_weight(self, w, state, group, need_dgrad=True):
        qt = self._quantize(w, self.fwd, state, "weight", group)
        return qt, qt

    def quantize_grad(self, g, state, group, need_dgrad, need_wgrad):
        qt = self._quantize(g, self.bwd, state, "grad_output", group)
        return qt, qt


class DelayedRecipe(_PerTensorRecipe):
    """TE DelayedScaling: quantise with the scale from history, then record the amax."""

    name = "delayed"
    stateful = True

    def __init__(self, cfg: FP8Config):
        super().__init__(cfg)
        self._cfg = cfg

    def new_state(self) -> LinearScalingState:
        return LinearScalingState(self._cfg)

    def _quantize(self, x, fmt, state, role, group):
        meta = state.metas[role].to(x.device)
        qt = quantize_tensorwise(x, fmt, meta.scale)
        if state.mode == "live":
            meta.update(abs_max(x), group)
        elif state.mode == "per_step":
            meta.record(abs_max(x))
        return qt


class CurrentRecipe(_PerTensorRecipe):
    """TE Float8CurrentScaling: scale = fmax / amax of this very tensor."""

    name = "current"

    def _quantize(self, x, fmt, state, role, group):
        return quantize_current(x, fmt, lambda amax: scale_from_amax(amax, fmt.max_normal, False))


class _BlockRecipe(EmulatedRecipe):
    """Separate rowwise / columnwise block quantisations (see the module docstring)."""

    input_blocks: Tuple[Block, Block]
    weight_blocks: Tuple[Block, Block]
    grad_blocks: Tuple[Block, Block]

    def _scale_fn(self, fmt: FP8Format):
        raise NotImplementedError

    def _pair(self, x, fmt, blocks, need_row=True, need_col=True) -> Pair:
        fn = self._scale_fn(fmt)
        row = quantize_blockwise(x, fmt, blocks[0], fn) if need_row else None
        if blocks[0] == blocks[1] and row is not None:
            return row, row
        col = quantize_blockwise(x, fmt, blocks[1], fn) if need_col else None
        return row, col

    def quantize_input(self, x, state, group, need_wgrad):
        return self._pair(x, self.fwd, self.input_blocks, need_col=need_wgrad)

    def quantize_weight(self, w, state, group, need_dgrad=True):
        return self._pair(w, self.fwd, self.weight_blocks, need_col=need_dgrad)

    def quantize_grad(self, g, state, group, need_dgrad, need_wgrad):
        return self._pair(g, self.bwd, self.grad_blocks, need_dgrad, need_wgrad)


class BlockwiseRecipe(_BlockRecipe):
    """TE Float8BlockScaling (DeepSeek-V3): 1x128 activations/grads, 128x128 weights."""

    name = "blockwise"
    input_blocks = ((1, 128), (128, 1))
    weight_blocks = ((128, 128), (128, 128))
    grad_blocks = ((1, 128), (128, 1))

    def _scale_fn(self, fmt):
        return lambda amax: scale_from_amax(amax, fmt.max_normal, power_of_two=True)


class MXFP8Recipe(_BlockRecipe):
    """TE MXFP8BlockScaling (OCP MX): 32-element blocks, E8M0 power-of-two scales."""

    name = "mxfp8"
    input_blocks = ((1, 32), (32, 1))
    weight_blocks = ((1, 32), (32, 1))
    grad_blocks = ((1, 32), (32, 1))

    def _scale_fn(self, fmt):
        return lambda amax: e8m0_scale(e8m0_exponent(amax, fmt.max_normal))


_RECIPES = {"delayed": DelayedRecipe, "current": CurrentRecipe,
            "blockwise": BlockwiseRecipe, "mxfp8": MXFP8Recipe}


def build_emulated_recipe(cfg: FP8Config) -> EmulatedRecipe:
    """The emulated recipe for cfg.recipe (which must not be 'off')."""
    if cfg.recipe not in _RECIPES:
        raise ValueError(f"fp8.recipe {cfg.recipe!r} has no emulation; use one of {list(_RECIPES)}")
    return _RECIPES[cfg.recipe](cfg)
