"""The FP8 linear layer: y = x W^T + b with TE's FP8 numerics, on any device.

Forward quantises x and W with the recipe's forward format, multiplies them
with the recipe's GEMMs (gemm.py: dequantised in fp32 for backend "emulate",
real FP8 GEMMs through torch._scaled_mm for "torch"; both accumulate in fp32),
adds the bias and returns the activation dtype. Backward quantises dy with the backward
format and computes dgrad from (dy, W) and wgrad from (dy, x), each operand in
the layout TE uses for that GEMM (see recipes.py). With wgrad_in_fp8 = False the
wgrad GEMM uses the unquantised x and dy (TE's override_linear_precision).

This function does no communication; megatron_linear.py wraps it with
megatron-core's tensor-parallel collectives.
"""

from __future__ import annotations

from typing import Optional

import torch

from megatron_ernie.precision.recipes import EmulatedRecipe, LinearScalingState


def _wgrad(recipe: EmulatedRecipe, g_quantized, g2d, x_wgrad) -> torch.Tensor:
    """dW = dy^T x: an FP8 GEMM, or fp32 on the unquantised operands when wgrad_in_fp8 is off."""
    if recipe.wgrad_in_fp8:
        return recipe.gemms.wgrad(g_quantized, x_wgrad)
    return g2d.float().t() @ x_wgrad.float()


def _fprop(x2d, weight, bias, recipe: EmulatedRecipe, state, amax_group, need_dgrad, need_wgrad):
    """Forward GEMM of a 2-D input; also returns the operands backward needs (TE saves the same)."""
    x_fprop, x_wgrad = recipe.quantize_input(x2d, state, amax_group, need_wgrad)
    w_fprop, w_dgrad = recipe.quantize_weight(weight, state, amax_group, need_dgrad)
    out = recipe.gemms.fprop(x_fprop, w_fprop)
    if bias is not None:
        out = out + bias.float()
    if need_wgrad and not recipe.wgrad_in_fp8:
        x_wgrad = x2d.detach()
    return out.to(x2d.dtype), w_dgrad, x_wgrad if need_wgrad else None


class EmulatedFP8LinearFunction(torch.autograd.Function):
    """autograd.Function for y = x W^T + b with FP8-quantised GEMM operands.

    Works on 2-D x ([tokens, in]) so that its output is a fresh tensor, never a
    view: megatron-core's vocab-parallel cross-entropy edits the logits in place,
    which autograd forbids on a view returned by a custom Function.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, recipe: EmulatedRecipe, state, amax_group):
        need_dgrad, need_wgrad = ctx.needs_input_grad[:2]
        out, ctx.w_dgrad, ctx.x_wgrad = _fprop(
            x, weight, bias, recipe, state, amax_group, need_dgrad, need_wgrad
        )
        ctx.recipe, ctx.state, ctx.amax_group = recipe, state, amax_group
        ctx.x_meta = (x.shape, x.dtype, weight.dtype, None if bias is None else bias.dtype)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x_shape, x_dtype, w_dtype, b_dtype = ctx.x_meta
        recipe = ctx.recipe
        g2d = grad_out.reshape(-1, grad_out.shape[-1])
        need_dgrad, need_wgrad, need_bgrad = ctx.needs_input_grad[:3]
        g_dgrad, g_wgrad = recipe.quantize_grad(
            g2d, ctx.state, ctx.amax_group, need_dgrad, need_wgrad and recipe.wgrad_in_fp8
        )
        dx = dw = db = None
        if need_dgrad:
            dx = recipe.gemms.dgrad(g_dgrad, ctx.w_dgrad).to(x_dtype).reshape(x_shape)
        if need_wgrad:
            dw = _wgrad(recipe, g_wgrad, g2d, ctx.x_wgrad).to(w_dtype)
        if need_bgrad:
            db = g2d.float().sum(dim=0).to(b_dtype)
        ctx.w_dgrad = ctx.x_wgrad = None
        return dx, dw, db, None, None, None


def emulated_fp8_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    recipe: EmulatedRecipe,
    state: Optional[LinearScalingState] = None,
    amax_group=None,
) -> torch.Tensor:
    """y = x W^T + b through the emulated FP8 GEMMs of `recipe`.

    state: the layer's delayed-scaling meta (recipe.new_state()); None for
    stateless recipes. amax_group: process group over which delayed scaling
    max-reduces each amax (TE's fp8_group); None keeps amaxes local.
    """
    if state is None and recipe.stateful:
        raise ValueError(f"recipe {recipe.name!r} keeps scaling state: pass state=recipe.new_state()")
    x2d = x.reshape(-1, x.shape[-1])
    if not torch.is_grad_enabled():  # inference (e.g. RL rollout): no backward operands
        out = _fprop(x2d, weight, bias, recipe, state, amax_group, False, False)[0]
    else:
        out = EmulatedFP8LinearFunction.apply(x2d, weight, bias, recipe, state, amax_group)
    return out.reshape(*x.shape[:-1], weight.shape[0])
