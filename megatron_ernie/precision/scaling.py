"""How Transformer Engine turns an amax into a scale, for each recipe.

A quantiser multiplies by `scale` before the FP8 cast and the GEMM multiplies
by `scale_inv = 1 / scale` afterwards, so the tensor's largest magnitude lands
near the format's max normal. We follow TE's kernels (read from the TE sources,
common/recipe/*.cu and recipe_common.cuh), all in fp32:

* delayed (`delayed_scaling.cu`): scale = (fmax * 2^-margin) / amax, where amax is
  the max of the amax history ("max") or its newest entry ("most_recent"). An amax
  that is 0, inf or NaN keeps the previous scale; a scale that overflows fp32
  becomes FLT_MAX. The amax is that of the unscaled input; NaNs are ignored.
* current and blockwise (`compute_scale_from_amax`): scale = fmax / amax; amax of
  0, inf or NaN gives scale 1; an overflowing scale becomes the input type's max
  (we compute in fp32, so FLT_MAX). Blockwise truncates the scale to a power of
  two (TE's default, NVTE_FP8_BLOCK_SCALING_FP32_SCALES=0); current scaling does
  not (NVTE_FP8_CURRENT_SCALING_POWER_2_SCALES=0).
* mxfp8: an E8M0 exponent = ceil(log2(amax / fmax)) (TE's `float_to_e8m0` rounds
  up, so no element saturates), scale = 2^-exponent.
"""

from __future__ import annotations

from typing import Optional

import torch

FP32_MAX = torch.finfo(torch.float32).max


def abs_max(x: torch.Tensor, dims=None) -> torch.Tensor:
    """max |x| over `dims` (all if None) with NaN ignored, like TE's fmaxf reduction."""
    magnitude = x.detach().abs().float().nan_to_num(nan=0.0, posinf=float("inf"))
    if dims is not None:
        return magnitude.amax(dim=dims)
    return magnitude.amax() if magnitude.numel() else torch.zeros((), device=x.device)


def scale_from_amax(amax: torch.Tensor, fmax: float, power_of_two: bool) -> torch.Tensor:
    """TE's compute_scale_from_amax (current and blockwise scaling), elementwise."""
    amax = amax.float()
    scale = fmax / amax  # fp32 (fmax is exact in fp32); no host-to-device copy of a constant
    scale = torch.where(torch.isinf(scale), torch.full_like(scale, FP32_MAX), scale)
    degenerate = (amax == 0) | torch.isinf(amax) | torch.isnan(amax)
    scale = torch.where(degenerate, torch.ones_like(scale), scale)
    return _truncate_to_power_of_two(scale) if power_of_two else scale


def _truncate_to_power_of_two(scale: torch.Tensor) -> torch.Tensor:
    """Clear the fp32 mantissa bits: 2^floor(log2(scale)) for positive normals."""
    bits = scale.contiguous().view(torch.int32) & torch.tensor(-8388608, dtype=torch.int32)
    return bits.view(torch.float32)


def e8m0_exponent(amax: torch.Tensor, fmax: float) -> torch.Tensor:
    """Biased E8M0 exponent of TE's float_to_e8m0(amax / fmax), rounding up.

    Mirrors the bit logic of TE's non-Blackwell path: take the fp32 exponent of
    amax * (1 / fmax) and add one if any mantissa bit is set, except at the top
    (0xFE) and for the smallest subnormals; NaN gives 0xFF and inf 0xFE.
    """
    value = amax.float() * torch.tensor(1.0 / fmax, dtype=torch.float32)
    bits = value.contiguous().view(torch.int32)
    exponent = (bits >> 23) & 0xFF
    mantissa = bits & 0x7FFFFF
    round_up = (mantissa > 0) & (exponent != 0xFE) & ~((exponent == 0) & (mantissa <= 0x400000))
    exponent = exponent + round_up.to(torch.int32)
    exponent = torch.where(torch.isinf(value), torch.full_like(exponent, 0xFE), exponent)
    return torch.where(torch.isnan(value), torch.full_like(exponent, 0xFF), exponent)


def e8m0_scale(exponent: torch.Tensor) -> torch.Tensor:
    """Quantisation multiplier 2^(127 - e) (TE's exp2f_rcp); exponent 0 means 1."""
    multiplier = ((254 - exponent).clamp(min=0) << 23).view(torch.float32)
    return torch.where(exponent == 0, torch.ones_like(multiplier), multiplier)


class DelayedScalingState:
    """The FP8 meta of one quantised tensor under delayed scaling.

    Layout and update follow TE's `amax_and_scale_update` kernel: slot 0 of the
    history holds the amax of the step just run; the update takes the amax to
    use (max over the window or the newest), computes the next scale, then rolls
    the history by -1 and zeroes slot 0. As in TE's bulk update, a step whose
    amax is 0 (e.g. an expert that got no tokens) changes nothing.
    """

    def __init__(self, history_len: int, compute_algo: str, margin: int, fmax: float):
        if compute_algo not in ("max", "most_recent"):
            raise ValueError(f"amax_compute_algo {compute_algo!r}: use 'max' or 'most_recent'")
        self.compute_algo = compute_algo
        self.scaled_max = fmax * 2.0 ** (-margin)
        self.amax_history = torch.zeros(history_len, dtype=torch.float32)
        self.scale = torch.ones((), dtype=torch.float32)
        self.pending = torch.zeros((), dtype=torch.float32)  # largest amax recorded since the last commit

    def to(self, device: torch.device) -> "DelayedScalingState":
        if self.scale.device != device:
            self.amax_history = self.amax_history.to(device)
            self.scale = self.scale.to(device)
            self.pending = self.pending.to(device)
        return self

    def update(self, amax: torch.Tensor, group: Optional[object] = None) -> None:
        """Record this step's amax (max-reduced over `group`) and compute the next scale."""
        amax = amax.detach().float().reshape(()).to(self.scale.device).clone()
        if group is not None and torch.distributed.get_world_size(group) > 1:
            torch.distributed.all_reduce(amax, op=torch.distributed.ReduceOp.MAX, group=group)
        # Written without host syncs (no .item()), so a GPU never waits on it: every
        # branch is a torch.where on device tensors.
        seen = amax != 0
        history = self.amax_history.clone()
        history[0] = amax
        chosen = history.max() if self.compute_algo == "max" else amax
        scale = self._next_scale(chosen)
        rolled = torch.roll(history, -1)
        rolled[0] = 0.0
        self.amax_history = torch.where(seen, rolled, self.amax_history)
        self.scale = torch.where(seen, scale, self.scale)

    def record(self, amax: torch.Tensor) -> None:
        """Keep the largest amax until commit() (NaN ignored by abs_max, inf kept as TE does)."""
        self.pending = torch.maximum(self.pending, amax.detach().float().reshape(()).to(self.pending.device))

    def commit(self, group: Optional[object] = None) -> None:
        """update() with the recorded amax, as one history step; every rank of `group` must call it."""
        pending, self.pending = self.pending, torch.zeros_like(self.pending)
        self.update(pending, group)

    def _next_scale(self, amax: torch.Tensor) -> torch.Tensor:
        """(fmax * 2^-margin) / amax, FLT_MAX on overflow; an inf/NaN/non-positive amax keeps the scale."""
        scale = self.scaled_max / amax  # scaled_max is exact in fp32 (a power of two times fmax)
        scale = torch.where(torch.isinf(scale), torch.full_like(scale, FP32_MAX), scale)
        usable = torch.isfinite(amax) & (amax > 0)
        return torch.where(usable, scale, self.scale)

    def state_dict(self) -> dict:
        return {"amax_history": self.amax_history.detach().cpu().clone(),
                "scale": self.scale.detach().cpu().clone()}

    def load_state_dict(self, state: dict) -> None:
        history = state["amax_history"]
        if history.shape != self.amax_history.shape:
            raise ValueError(
                f"checkpointed FP8 amax history has length {history.shape[0]} but "
                f"fp8.amax_history_len is {self.amax_history.shape[0]}; set it to "
                f"{history.shape[0]} to resume this checkpoint"
            )
        device = self.scale.device
        self.amax_history = history.detach().float().clone().to(device)
        self.scale = state["scale"].detach().float().clone().reshape(()).to(device)
        self.pending = torch.zeros((), dtype=torch.float32, device=device)  # uncommitted amaxes are dropped
