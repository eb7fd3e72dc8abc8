"""Print the relative error of the emulated FP8 linear against fp64, per recipe.

    python -m megatron_ernie.precision.report [--tokens 256] [--in 512] [--out 256]

x ~ N(0, 1) [tokens, in], W ~ N(0, 1/in) [out, in], dy ~ N(0, 1). Errors are
||approx - exact|| / ||exact|| (Frobenius) for y, dx and dW. Delayed scaling is
measured on its second step, once the history holds an amax (its first step
runs with the initial scale 1). bf16 is a plain bf16 GEMM, for reference.
"""

from __future__ import annotations

import argparse
from typing import Dict

import torch

from megatron_ernie.config.fp8 import FP8Config
from megatron_ernie.precision.linear import emulated_fp8_linear
from megatron_ernie.precision.recipes import build_emulated_recipe

RECIPES = ("delayed", "current", "blockwise", "mxfp8")


def _relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    return ((approx.double() - exact).norm() / exact.norm()).item()


def _problem(tokens: int, d_in: int, d_out: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, d_in, generator=gen, dtype=torch.float64)
    w = torch.randn(d_out, d_in, generator=gen, dtype=torch.float64) / d_in**0.5
    dy = torch.randn(tokens, d_out, generator=gen, dtype=torch.float64)
    return x, w, dy


def _errors(y, dx, dw, x, w, dy) -> Dict[str, float]:
    return {"y": _relative_error(y, x @ w.t()),
            "dx": _relative_error(dx, dy @ w),
            "dw": _relative_error(dw, dy.t() @ x)}


def measure_recipe(recipe: str, fp8_format: str = "hybrid", tokens=256, d_in=512, d_out=256,
                   seed=0) -> Dict[str, float]:
    """Relative errors of one emulated FP8 linear step (forward and backward)."""
    x, w, dy = _problem(tokens, d_in, d_out, seed)
    emulated = build_emulated_recipe(FP8Config(recipe=recipe, format=fp8_format, backend="emulate"))
    state = emulated.new_state()
    for _ in range(2 if emulated.stateful else 1):
        xs = x.float().requires_grad_()
        ws = w.float().requires_grad_()
        y = emulated_fp8_linear(xs, ws, None, emulated, state)
        y.backward(dy.float())
    return _errors(y.detach(), xs.grad, ws.grad, x, w, dy)


def measure_bf16(tokens=256, d_in=512, d_out=256, seed=0) -> Dict[str, float]:
    """The same three GEMMs in bf16, for reference."""
    x, w, dy = _problem(tokens, d_in, d_out, seed)
    xb, wb, dyb = x.bfloat16(), w.bfloat16(), dy.bfloat16()
    return _errors(xb @ wb.t(), dyb @ wb, dyb.t() @ xb, x, w, dy)


def format_table(rows: Dict[str, Dict[str, float]]) -> str:
    lines = [f"{'recipe':<12}{'y':>11}{'dx':>11}{'dw':>11}"]
    for name, errs in rows.items():
        lines.append(f"{name:<12}{errs['y']:>11.3e}{errs['dx']:>11.3e}{errs['dw']:>11.3e}")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--in", dest="d_in", type=int, default=512)
    parser.add_argument("--out", dest="d_out", type=int, default=256)
    parser.add_argument("--format", default="hybrid", choices=("hybrid", "e4m3"))
    args = parser.parse_args(argv)
    shape = dict(tokens=args.tokens, d_in=args.d_in, d_out=args.d_out)
    rows = {r: measure_recipe(r, args.format, **shape) for r in RECIPES}
    rows["bf16"] = measure_bf16(**shape)
    print(f"relative error vs fp64, x[{args.tokens}x{args.d_in}] @ W^T[{args.d_in}x{args.d_out}], "
          f"format {args.format}")
    print(format_table(rows))


if __name__ == "__main__":
    main()
