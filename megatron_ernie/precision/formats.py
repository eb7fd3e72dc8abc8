"""The two FP8 formats of NVIDIA Hopper/Blackwell and how values are cast to them.

E4M3 (torch.float8_e4m3fn, "fn" = finite + NaN, no infinity): max normal
448 = 1.75 * 2^8, min normal 2^-6, min subnormal 2^-9. E5M2 (IEEE-like, has
infinity): max normal 57344 = 1.75 * 2^15, min normal 2^-14, min subnormal 2^-16.

Two casts exist and they differ only outside the finite range:

* `raw_cast` is torch's `.to(float8)`: round to nearest even. Out-of-range E5M2
  becomes +-inf; out-of-range E4M3 (inf included) saturates to +-448 in torch
  2.13 (ml_dtypes gives NaN there instead; both agree bit for bit in range).
* `saturating_cast` is what Transformer Engine does on the GPU: its cast kernels
  convert with `cvt.rn.satfinite` (PTX), so any |x| > max normal, infinity
  included, becomes the signed max normal, and NaN stays NaN, for both formats.
  We clamp first and then round, which gives the same result because the clamp
  bound is itself representable.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class FP8Format:
    """One FP8 encoding: its torch dtype and the edges of its range."""

    name: str
    dtype: torch.dtype
    max_normal: float
    min_normal: float
    min_subnormal: float
    max_unbiased_exponent: int


E4M3 = FP8Format("e4m3", torch.float8_e4m3fn, 448.0, 2.0**-6, 2.0**-9, 8)
E5M2 = FP8Format("e5m2", torch.float8_e5m2, 57344.0, 2.0**-14, 2.0**-16, 15)


def formats_for(fp8_format: str) -> tuple[FP8Format, FP8Format]:
    """(forward, backward) formats of TE's Format.E4M3 / Format.HYBRID."""
    if fp8_format == "e4m3":
        return E4M3, E4M3
    if fp8_format == "hybrid":
        return E4M3, E5M2
    raise ValueError(f"fp8 format {fp8_format!r} is not one of ['e4m3', 'hybrid']")


def raw_cast(x: torch.Tensor, fmt: FP8Format) -> torch.Tensor:
    """torch's own round-to-nearest-even cast (see the module docstring)."""
    return x.to(fmt.dtype)


def saturating_cast(x: torch.Tensor, fmt: FP8Format) -> torch.Tensor:
    """TE's satfinite cast: clamp to +-max normal (NaN kept), then round."""
    return x.clamp(-fmt.max_normal, fmt.max_normal).to(fmt.dtype)
