"""FP8 quantise / dequantise with per-tensor or per-block scales.

A `QuantizedTensor` is what a TE FP8 tensor holds: FP8 data plus the fp32
`scale_inv` that the GEMM multiplies back in. Dequantising and running the GEMM
in fp32 gives the same numbers as an FP8 tensor-core GEMM with fp32
accumulation, up to the order of the fp32 sums.

Blocks are (rows, cols) tiles of a 2-D tensor: (1, 128) for TE's 1-D block
scaling, (128, 128) for its 2-D weight scaling, (1, 32) / (32, 1) for MXFP8.
A dimension that is not a multiple of the block gets a partial last block,
like TE's scale tensors of ceil(n / block) entries; we implement it by padding
with zeros, which cannot change any block's amax and is cut off again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F

from megatron_ernie.precision.formats import FP8Format, saturating_cast
from megatron_ernie.precision.scaling import abs_max

Block = Tuple[int, int]


@dataclass
class QuantizedTensor:
    """FP8 data and fp32 inverse scales; `block` None means one per-tensor scale."""

    data: torch.Tensor
    scale_inv: torch.Tensor
    fmt: FP8Format
    shape: torch.Size
    block: Optional[Block] = None

    def dequantize(self) -> torch.Tensor:
        """fp32 values the FP8 GEMM sees: data * scale_inv, padding removed."""
        values = self.data.float()
        if self.block is None:
            return values * self.scale_inv
        rows, cols = self.block
        grid_r, grid_c = self.scale_inv.shape
        tiled = values.reshape(grid_r, rows, grid_c, cols) * self.scale_inv[:, None, :, None]
        full = tiled.reshape(grid_r * rows, grid_c * cols)
        return full[: self.shape[0], : self.shape[1]]

    def transposed(self) -> "QuantizedTensor":
        """The same FP8 values as the transposed tensor (a view of the data, no requantisation).

        A per-tensor scale is unchanged; a block layout swaps its tile shape and
        its scale grid. This is how a GEMM takes an operand along its other
        dimension (e.g. W [out, in] as W^T for dgrad) without quantising again.
        """
        block = None if self.block is None else (self.block[1], self.block[0])
        scale_inv = self.scale_inv if self.block is None else self.scale_inv.t()
        shape = torch.Size((self.shape[1], self.shape[0]))
        return QuantizedTensor(self.data.t(), scale_inv, self.fmt, shape, block)


def quantize_tensorwise(x: torch.Tensor, fmt: FP8Format, scale: torch.Tensor) -> QuantizedTensor:
    """Per-tensor quantisation with a given fp32 scale (delayed or current scaling)."""
    scale = scale.float().reshape(()).to(x.device)
    data = saturating_cast(x.float() * scale, fmt)
    return QuantizedTensor(data, torch.reciprocal(scale), fmt, x.shape)


def quantize_current(x: torch.Tensor, fmt: FP8Format, scale_fn: Callable) -> QuantizedTensor:
    """Per-tensor quantisation with the scale computed from this tensor's amax."""
    return quantize_tensorwise(x, fmt, scale_fn(abs_max(x)))


def quantize_blockwise(
    x: torch.Tensor, fmt: FP8Format, block: Block, scale_fn: Callable
) -> QuantizedTensor:
    """One scale per (rows, cols) tile of a 2-D tensor; scale_fn maps tile amax to scale."""
    if x.dim() != 2:
        raise ValueError(f"blockwise quantisation needs a 2-D tensor, got shape {tuple(x.shape)}")
    tiles = _pad_to_tiles(x.float(), block)
    scale = scale_fn(abs_max(tiles, dims=(1, 3)))
    scaled = tiles * scale[:, None, :, None]
    grid_r, rows, grid_c, cols = tiles.shape
    data = saturating_cast(scaled, fmt).reshape(grid_r * rows, grid_c * cols)
    return QuantizedTensor(data, torch.reciprocal(scale), fmt, x.shape, block)


def _pad_to_tiles(x: torch.Tensor, block: Block) -> torch.Tensor:
    """Zero-pad x to whole tiles and view it as (grid_rows, rows, grid_cols, cols)."""
    rows, cols = block
    pad_r, pad_c = -x.shape[0] % rows, -x.shape[1] % cols
    padded = F.pad(x, (0, pad_c, 0, pad_r)) if (pad_r or pad_c) else x
    return padded.reshape(padded.shape[0] // rows, rows, padded.shape[1] // cols, cols)

