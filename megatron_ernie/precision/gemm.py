"""The three GEMMs of an FP8 linear layer, run two ways: emulated, or as real FP8 GEMMs.

A linear layer y = x W^T needs fprop (y = x W^T), dgrad (dx = dy W) and wgrad
(dW = dy^T x). The recipes (recipes.py) decide how each operand is quantised;
this module decides how the quantised operands are multiplied:

* `EmulatedGemms` (fp8.backend = "emulate"): dequantise to fp32 and multiply in
  fp32. An FP8 tensor-core GEMM accumulates in fp32 too, so this is the same
  arithmetic up to the order of the sums.
* `ScaledMMGemms` (fp8.backend = "torch"): the FP8 data go to `torch._scaled_mm`
  (cuBLASLt FP8 GEMMs on Hopper/Ada; a reference kernel on CPU), as torchao's
  float8 training does for torchtitan. Both backends quantise identically, so
  they differ only in accumulation order.

`torch._scaled_mm(a, b)` wants `a` row-major [M, K], `b` column-major [K, N],
fp32 scales that are singletons (tensor-wise) or per row / column, and on CUDA
K and N multiples of 16 (we pad M, K and N with zeros to multiples of 16, which
adds nothing to any sum). cuBLAS has no E5M2 x E5M2 kernel; no recipe asks for
one (the backward format only ever meets a forward operand).

Block-scaled recipes (blockwise: 1x128 / 128x128 tiles, mxfp8: 32-element
blocks) have one scale per K-block of each row (or row tile), which no single
tensor-wise call can apply. We split K at the block boundaries, run one FP8 GEMM
per K-block with unit scales, and apply the outer product of that block's row
scales in fp32 while accumulating: DeepSeek-V3's "promotion" of FP8 partial sums
into an fp32 accumulator every 128 elements of K, written with torch calls. It is
exact FP8 arithmetic on any FP8 GPU (mxfp8 on Hopper too), but slower than a
native block-scaled kernel (cuBLAS 12.9+ on Hopper, Blackwell's MX GEMMs).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from megatron_ernie.precision.quantize import QuantizedTensor

GEMM_ALIGNMENT = 16  # cuBLASLt FP8: K and N multiples of 16


class EmulatedGemms:
    """fp32 GEMMs on dequantised operands (fp8.backend = "emulate")."""

    name = "emulate"

    @staticmethod
    def fprop(x: QuantizedTensor, w: QuantizedTensor) -> torch.Tensor:
        return x.dequantize() @ w.dequantize().t()

    @staticmethod
    def dgrad(g: QuantizedTensor, w: QuantizedTensor) -> torch.Tensor:
        return g.dequantize() @ w.dequantize()

    @staticmethod
    def wgrad(g: QuantizedTensor, x: QuantizedTensor) -> torch.Tensor:
        return g.dequantize().t() @ x.dequantize()


class ScaledMMGemms:
    """Real FP8 GEMMs through torch._scaled_mm (fp8.backend = "torch").

    Every product is `fp8_matmul_nt(a, b)` = a @ b^T with both operands
    quantised along K; dgrad and wgrad transpose their operands' FP8 data
    (as TE keeps a transposed FP8 copy), never requantising them.
    """

    name = "torch"

    @staticmethod
    def fprop(x: QuantizedTensor, w: QuantizedTensor) -> torch.Tensor:
        return fp8_matmul_nt(x, w)

    @staticmethod
    def dgrad(g: QuantizedTensor, w: QuantizedTensor) -> torch.Tensor:
        return fp8_matmul_nt(g, w.transposed())

    @staticmethod
    def wgrad(g: QuantizedTensor, x: QuantizedTensor) -> torch.Tensor:
        return fp8_matmul_nt(g.transposed(), x.transposed())


def gemms_for_backend(backend: str):
    """The GEMM implementation of an fp8.backend ("torch": real FP8, anything else: emulated)."""
    return ScaledMMGemms if backend == "torch" else EmulatedGemms


def scaled_mm_fp32(a: torch.Tensor, b_t: torch.Tensor, scale_a: torch.Tensor,
                   scale_b: torch.Tensor) -> torch.Tensor:
    """The one call into torch's FP8 GEMM: (a @ b_t.t()) * scale_a * scale_b in fp32.

    a: FP8 [M, K] (made row-major), b_t: FP8 [N, K] (its transpose is column-major
    without a copy when b_t is contiguous), scales: fp32 singletons.
    """
    return torch._scaled_mm(a.contiguous(), b_t.contiguous().t(), scale_a=scale_a.float(),
                            scale_b=scale_b.float(), out_dtype=torch.float32)


def fp8_matmul_nt(a: QuantizedTensor, b: QuantizedTensor) -> torch.Tensor:
    """a @ b^T in fp32 from FP8 operands [M, K] and [N, K] quantised along K."""
    m, n = a.shape[0], b.shape[0]
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"FP8 GEMM operands disagree on K: {tuple(a.shape)} x {tuple(b.shape)}^T")
    if m == 0 or n == 0 or a.shape[1] == 0:  # an expert that got no tokens
        return torch.zeros(m, n, dtype=torch.float32, device=a.data.device)
    if a.block is None and b.block is None:
        return _tensorwise(a, b)
    return _blockwise(a, b)


def _pad_to(data: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Zero-pad FP8 data to [rows, cols] (a zero of either format is exactly 0)."""
    if (rows, cols) == tuple(data.shape):
        return data
    padded = data.new_zeros(rows, cols)
    padded[: data.shape[0], : data.shape[1]] = data
    return padded


def _aligned(size: int, alignment: int = GEMM_ALIGNMENT) -> int:
    return -(-size // alignment) * alignment


def _tensorwise(a: QuantizedTensor, b: QuantizedTensor) -> torch.Tensor:
    """One GEMM with per-tensor scales (delayed and current scaling)."""
    if a.block is not None or b.block is not None:
        raise ValueError("a per-tensor FP8 GEMM needs per-tensor scales on both operands")
    m, n, k = a.shape[0], b.shape[0], a.shape[1]
    m_pad, n_pad, k_pad = _aligned(m), _aligned(n), _aligned(k)
    out = scaled_mm_fp32(_pad_to(a.data, m_pad, k_pad), _pad_to(b.data, n_pad, k_pad),
                         a.scale_inv, b.scale_inv)
    return out[:m, :n]


def _blockwise(a: QuantizedTensor, b: QuantizedTensor) -> torch.Tensor:
    """One FP8 GEMM per K-block, its partial sum scaled per (row, column) and added in fp32."""
    k_block = _k_block(a, b)
    rows_a, rows_b = _row_scales(a), _row_scales(b)  # [M_pad, blocks], [N_pad, blocks]
    a_data, b_data = _pad_rows(a.data), _pad_rows(b.data)
    one = torch.ones((), dtype=torch.float32, device=a.data.device)
    out = torch.zeros(a_data.shape[0], b_data.shape[0], dtype=torch.float32, device=a.data.device)
    for j in range(rows_a.shape[1]):
        cols = slice(j * k_block, (j + 1) * k_block)
        partial = scaled_mm_fp32(a_data[:, cols], b_data[:, cols], one, one)
        out += partial * rows_a[:, j, None] * rows_b[None, :, j]
    return out[: a.shape[0], : b.shape[0]]


def _k_block(a: QuantizedTensor, b: QuantizedTensor) -> int:
    """The common block length along K; both operands' K-blocks must line up."""
    k_a = a.block[1] if a.block is not None else None
    k_b = b.block[1] if b.block is not None else None
    if k_a is None or k_a != k_b or k_a % GEMM_ALIGNMENT:
        raise ValueError(f"FP8 operands with K-blocks {a.block} and {b.block} cannot share one GEMM")
    return k_a


def _row_scales(q: QuantizedTensor) -> torch.Tensor:
    """scale_inv expanded to one row per data row: [rows of the padded data, K-blocks]."""
    rows = q.block[0]
    expanded = q.scale_inv.float().repeat_interleave(rows, dim=0)
    return _pad_rows_fp32(expanded, _aligned(expanded.shape[0]))


def _pad_rows(data: torch.Tensor) -> torch.Tensor:
    return _pad_to(data, _aligned(data.shape[0]), data.shape[1])


def _pad_rows_fp32(values: torch.Tensor, rows: int) -> torch.Tensor:
    extra = rows - values.shape[0]
    return F.pad(values, (0, 0, 0, extra)) if extra else values


def scaled_mm_unavailable_reason(device: Optional[torch.device] = None) -> Optional[str]:
    """Why torch cannot run the FP8 GEMMs here (None when it can): a tiny GEMM per format pair."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if not hasattr(torch, "_scaled_mm"):
        return f"torch {torch.__version__} has no torch._scaled_mm"
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        name = torch.cuda.get_device_name(device)
        return f"{name} has no FP8 tensor cores (needs compute capability 8.9 or newer)"
    one = torch.ones((), dtype=torch.float32, device=device)
    pairs = ((torch.float8_e4m3fn, torch.float8_e4m3fn), (torch.float8_e5m2, torch.float8_e4m3fn))
    for dtype_a, dtype_b in pairs:
        a = torch.ones(16, 16, device=device).to(dtype_a)
        b = torch.ones(16, 16, device=device).to(dtype_b)
        try:
            result = scaled_mm_fp32(a, b, one, one)
        except (RuntimeError, NotImplementedError) as error:
            return f"torch._scaled_mm({dtype_a}, {dtype_b}) fails on {device}: {error}".splitlines()[0]
        if not bool(torch.all(result == 16.0)):
            return f"torch._scaled_mm({dtype_a}, {dtype_b}) on {device} returned wrong values"
    return None
