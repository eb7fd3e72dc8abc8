"""FP8: formats, scaling, emulated GEMMs, megatron-core linears, config and TE mapping.

All single-process and CPU-only. The megatron-core tests initialise
torch.distributed (gloo, world size 1) and megatron-core's model parallel state
once for this module, unless a previous test module already did.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import io
import os
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_ernie.config.errors import ConfigError
from megatron_ernie.config.fp8 import FP8Config, validate_layer_counts
from megatron_ernie.precision.formats import E4M3, E5M2, raw_cast, saturating_cast
from megatron_ernie.precision.linear import emulated_fp8_linear
from megatron_ernie.precision.quantize import quantize_blockwise, quantize_tensorwise
from megatron_ernie.precision.recipes import build_emulated_recipe
from megatron_ernie.precision.scaling import (
    FP32_MAX,
    DelayedScalingState,
    e8m0_exponent,
    e8m0_scale,
    scale_from_amax,
)

REPO = Path(__file__).resolve().parents[1]


def emulate(recipe: str, **kw) -> FP8Config:
    return FP8Config(recipe=recipe, backend="emulate", **kw)


def rel_err(approx, exact) -> float:
    return ((approx.double() - exact).norm() / exact.norm()).item()


# ------------------------------------------------------------------ formats


def _all_finite_codes(fmt):
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(fmt.dtype).float()
    return torch.unique(codes[torch.isfinite(codes)])


@pytest.mark.parametrize("fmt", [E4M3, E5M2], ids=["e4m3", "e5m2"])
def test_raw_cast_is_bit_identical_to_ml_dtypes_in_range(fmt):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    values = _all_finite_codes(fmt)
    mids = (values[1:] + values[:-1]) / 2  # every round-to-nearest-even tie
    gen = torch.Generator().manual_seed(0)
    rand = torch.empty(20000).uniform_(-fmt.max_normal, fmt.max_normal, generator=gen)
    probe = torch.cat([values, mids, rand, rand * 1e-4])
    ours = raw_cast(probe, fmt).view(torch.uint8).numpy()
    theirs = probe.numpy().astype(getattr(ml_dtypes, fmt.dtype.__str__().split(".")[1])).view(np.uint8)
    assert np.array_equal(ours, theirs)
    assert len(values) == (253 if fmt is E4M3 else 247)  # finite codes incl. +-0 collapsed to one


@pytest.mark.parametrize(
    "fmt, inputs, expected",
    [
        (E4M3, [448.0, 464.0, 500.0, 1e6, float("inf"), -float("inf")], [448, 448, 448, 448, 448, -448]),
        (E4M3, [2.0**-9, 2.0**-10, 1.5 * 2.0**-9, 2.0**-6, 0.75 * 2.0**-9],
         [2.0**-9, 0, 2.0**-8, 2.0**-6, 2.0**-9]),
        (E4M3, [1.0625, 1.1875, 240.0, 232.0], [1.0, 1.25, 240.0, 224.0]),  # RNE: ties go to even
        (E5M2, [57344.0, 61439.0, 70000.0, float("inf"), -1e9], [57344, 57344, 57344, 57344, -57344]),
        (E5M2, [2.0**-16, 2.0**-17, 1.5 * 2.0**-16, 2.0**-14], [2.0**-16, 0, 2.0**-15, 2.0**-14]),
    ],
)
def test_saturating_quantisation_edges(fmt, inputs, expected):
    qt = quantize_tensorwise(torch.tensor(inputs), fmt, torch.tensor(1.0))
    assert qt.dequantize().tolist() == [float(v) for v in expected]


def test_nan_stays_nan_and_e5m2_raw_cast_overflows_to_inf():
    for fmt in (E4M3, E5M2):
        assert torch.isnan(saturating_cast(torch.tensor([float("nan")]), fmt).float()).all()
    assert raw_cast(torch.tensor([61440.0]), E5M2).float().item() == float("inf")
    assert saturating_cast(torch.tensor([61440.0]), E5M2).float().item() == 57344.0


# ------------------------------------------------------------------ scaling


def test_scale_from_amax_follows_te_rules():
    amax = torch.tensor([2.0, 3.0, 0.0, float("inf"), float("nan"), 1e-40])
    plain = scale_from_amax(amax, 448.0, power_of_two=False)
    assert plain.tolist()[:5] == [224.0, pytest.approx(448 / 3), 1.0, 1.0, 1.0]
    assert plain[5].item() == FP32_MAX  # 448 / 1e-40 overflows fp32
    pow2 = scale_from_amax(amax[:2], 448.0, power_of_two=True)
    assert pow2.tolist() == [128.0, 128.0]  # 2^floor(log2(224)), 2^floor(log2(149.3))


def test_e8m0_scale_rounds_the_exponent_up():
    amax = torch.tensor([448.0, 449.0, 1.0, 0.0, 896.0])
    exponent = e8m0_exponent(amax, 448.0)
    assert exponent.tolist() == [127, 128, 119, 0, 128]
    assert e8m0_scale(exponent).tolist() == [1.0, 0.5, 256.0, 1.0, 0.5]
    assert ((amax * e8m0_scale(exponent)) <= 448).all()  # rounding up never saturates


def test_delayed_scaling_history_matches_te_kernel():
    state = DelayedScalingState(history_len=3, compute_algo="max", margin=0, fmax=448.0)
    seen = []
    for amax in [1.0, 4.0, 2.0, 0.0, 3.0, 1.0]:
        state.update(torch.tensor(amax))
        seen.append((state.amax_history.tolist(), state.scale.item()))
    assert seen == [
        ([0, 0, 1], 448.0),
        ([0, 1, 4], 112.0),
        ([0, 4, 2], 112.0),
        ([0, 4, 2], 112.0),  # amax 0 (no tokens): nothing changes
        ([0, 2, 3], 112.0),  # window: 4, 2, 3
        ([0, 3, 1], pytest.approx(448 / 3)),  # 4 left the window
    ]


def test_delayed_scaling_most_recent_margin_and_bad_amax():
    state = DelayedScalingState(history_len=4, compute_algo="most_recent", margin=1, fmax=448.0)
    state.update(torch.tensor(8.0))
    state.update(torch.tensor(2.0))
    assert state.scale.item() == 112.0  # (448 * 2^-1) / 2
    state.update(torch.tensor(float("inf")))
    assert state.scale.item() == 112.0  # an inf amax keeps the previous scale
    state.update(torch.tensor(1e-40))
    assert state.scale.item() == FP32_MAX


def test_delayed_state_dict_round_trip_is_exact():
    state = DelayedScalingState(5, "max", 0, 57344.0)
    for amax in [0.3, 7.0, 0.01]:
        state.update(torch.tensor(amax))
    buffer = io.BytesIO()
    torch.save(state.state_dict(), buffer)
    restored = DelayedScalingState(5, "max", 0, 57344.0)
    restored.load_state_dict(torch.load(io.BytesIO(buffer.getvalue())))
    assert torch.equal(restored.amax_history, state.amax_history)
    assert torch.equal(restored.scale, state.scale)
    for s in (state, restored):
        s.update(torch.tensor(0.5))
    assert torch.equal(restored.scale, state.scale)
    assert torch.equal(restored.amax_history, state.amax_history)
    with pytest.raises(ValueError, match="amax_history_len"):
        DelayedScalingState(4, "max", 0, 448.0).load_state_dict(state.state_dict())


# ------------------------------------------------------------------ quantisation


def test_blockwise_partial_blocks_scale_from_their_own_elements():
    x = torch.randn(3, 200, generator=torch.Generator().manual_seed(1))
    x[1, 150] = 50.0  # only the second (partial, 72-wide) block of row 1 sees it
    fn = lambda amax: scale_from_amax(amax, 448.0, power_of_two=True)  # noqa: E731
    qt = quantize_blockwise(x, E4M3, (1, 128), fn)
    assert qt.scale_inv.shape == (3, 2) and qt.dequantize().shape == (3, 200)
    expected = 1.0 / scale_from_amax(x[1, 128:].abs().max(), 448.0, True)
    assert qt.scale_inv[1, 1].item() == expected.item() == 0.125  # 448/50 -> 8
    assert qt.scale_inv[1, 0].item() != qt.scale_inv[1, 1].item()
    assert rel_err(qt.dequantize(), x.double()) < 0.05


def test_weight_tiles_are_128x128_and_mxfp8_blocks_are_32():
    w = torch.randn(130, 260)
    cfg = emulate("blockwise")
    w_fprop, w_dgrad = build_emulated_recipe(cfg).quantize_weight(w, None, None)
    assert w_fprop is w_dgrad and w_fprop.scale_inv.shape == (2, 3)
    m_row, m_col = build_emulated_recipe(emulate("mxfp8")).quantize_weight(w, None, None)
    assert m_row.scale_inv.shape == (130, 9) and m_col.scale_inv.shape == (5, 260)
    scale_inv = m_row.scale_inv
    assert torch.equal(scale_inv, torch.exp2(torch.log2(scale_inv).round()))  # powers of two


# ------------------------------------------------------------------ emulated linear

BANDS = {  # relative error vs fp64 on 256x512 @ 512x256, format hybrid (measured ~3.75e-2 / ~5.9e-2)
    "delayed": ((0.030, 0.045), (0.050, 0.070)),
    "current": ((0.030, 0.045), (0.050, 0.070)),
    "blockwise": ((0.030, 0.045), (0.050, 0.070)),
    "mxfp8": ((0.030, 0.045), (0.050, 0.070)),
}


@pytest.mark.parametrize("recipe", sorted(BANDS))
def test_emulated_linear_error_lies_in_band(recipe):
    from megatron_ernie.precision.report import measure_bf16, measure_recipe

    errs = measure_recipe(recipe)
    (lo_fwd, hi_fwd), (lo_bwd, hi_bwd) = BANDS[recipe]
    assert lo_fwd < errs["y"] < hi_fwd
    assert lo_bwd < errs["dx"] < hi_bwd and lo_bwd < errs["dw"] < hi_bwd
    assert measure_bf16()["y"] < 4e-3


def test_per_tensor_forward_equals_torch_scaled_mm():
    gen = torch.Generator().manual_seed(3)
    x, w = torch.randn(16, 32, generator=gen), torch.randn(8, 32, generator=gen)
    recipe = build_emulated_recipe(emulate("current"))
    y = emulated_fp8_linear(x, w, None, recipe)
    xq, _ = recipe.quantize_input(x, None, None, False)
    wq, _ = recipe.quantize_weight(w, None, None)
    ref = torch._scaled_mm(xq.data, wq.data.t(), scale_a=xq.scale_inv, scale_b=wq.scale_inv,
                           out_dtype=torch.float32)
    torch.testing.assert_close(y, ref, rtol=1e-6, atol=1e-5)


def test_backward_quantises_grad_e5m2_and_uses_columnwise_blocks_for_wgrad():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(256, 128, generator=gen)
    x[0] *= 2.0**16  # one outlier token: only blocks along tokens (columnwise) see it
    x.requires_grad_()
    w = torch.randn(64, 128, generator=gen, requires_grad=True)
    g = torch.randn(256, 64, generator=gen)
    g[0] = 0.0  # ...and adds nothing to dW, yet coarsens x's token-wise blocks
    recipe = build_emulated_recipe(emulate("blockwise"))
    emulated_fp8_linear(x, w, None, recipe).backward(g)
    fn = lambda fmt: lambda amax: scale_from_amax(amax, fmt.max_normal, True)  # noqa: E731
    qdq = lambda t, fmt, block: quantize_blockwise(t.detach(), fmt, block, fn(fmt)).dequantize()  # noqa: E731
    dx = qdq(g, E5M2, (1, 128)) @ qdq(w, E4M3, (128, 128))
    dw_col = qdq(g, E5M2, (128, 1)).t() @ qdq(x, E4M3, (128, 1))
    dw_row = qdq(g, E5M2, (1, 128)).t() @ qdq(x, E4M3, (1, 128))
    torch.testing.assert_close(x.grad, dx, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w.grad, dw_col, rtol=1e-5, atol=1e-5)
    assert rel_err(dw_row, w.grad.double()) > 0.05  # the rowwise copy would give another result


def test_hybrid_and_e4m3_differ_only_in_backward():
    gen = torch.Generator().manual_seed(5)
    x0, w0 = torch.randn(32, 64, generator=gen), torch.randn(16, 64, generator=gen)
    g = torch.randn(32, 16, generator=gen)
    outs = {}
    for fmt in ("hybrid", "e4m3"):
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        y = emulated_fp8_linear(x, w, None, build_emulated_recipe(emulate("current", format=fmt)))
        y.backward(g)
        outs[fmt] = (y.detach(), x.grad)
    assert torch.equal(outs["hybrid"][0], outs["e4m3"][0])
    assert not torch.equal(outs["hybrid"][1], outs["e4m3"][1])


def test_delayed_first_step_uses_scale_one_and_records_amax():
    x = torch.tensor([[0.3, -1.7, 2.5, 0.01]])
    w = torch.eye(4)
    recipe = build_emulated_recipe(emulate("delayed", amax_history_len=2))
    state = recipe.new_state()
    y = emulated_fp8_linear(x, w, None, recipe, state)
    assert torch.equal(y, raw_cast(x, E4M3).float())  # scale 1: plain E4M3 rounding
    assert state.metas["input"].scale.item() == (torch.tensor(448.0) / 2.5).item()  # fp32 division
    assert state.metas["weight"].scale.item() == 448.0
    with pytest.raises(ValueError, match="new_state"):
        emulated_fp8_linear(x, w, None, recipe, None)


def test_inference_path_matches_training_forward_in_bf16():
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(2, 40, 96, generator=gen).bfloat16().requires_grad_()
    w = torch.randn(48, 96, generator=gen).bfloat16().requires_grad_()
    recipe = build_emulated_recipe(emulate("mxfp8"))
    y = emulated_fp8_linear(x, w, None, recipe)
    with torch.no_grad():
        y_inference = emulated_fp8_linear(x, w, None, recipe)
    assert y.dtype == torch.bfloat16 and y.shape == (2, 40, 48) and y.grad_fn is not None
    assert torch.equal(y.detach(), y_inference) and y_inference.grad_fn is None
    y.float().sum().backward()
    assert x.grad.dtype == w.grad.dtype == torch.bfloat16


def test_wgrad_in_high_precision_when_disabled():
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(32, 64, generator=gen, requires_grad=True)
    w = torch.randn(16, 64, generator=gen, requires_grad=True)
    g = torch.randn(32, 16, generator=gen)
    recipe = build_emulated_recipe(emulate("current", wgrad_in_fp8=False))
    emulated_fp8_linear(x, w, None, recipe).backward(g)
    torch.testing.assert_close(w.grad, g.t() @ x.detach(), rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------ megatron-core linears


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _linears(cfg, seed=0):
    from megatron.core.model_parallel_config import ModelParallelConfig
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    from megatron_ernie.precision.megatron_linear import fp8_linear_classes

    config = ModelParallelConfig(use_cpu_initialization=True)
    init = torch.nn.init.normal_
    column_cls, row_cls = fp8_linear_classes(cfg)
    built = {}
    for name, col, row in (("plain", ColumnParallelLinear, RowParallelLinear), ("fp8", column_cls, row_cls)):
        torch.manual_seed(seed)
        built[name] = (col(64, 32, config=config, init_method=init, bias=True),
                       row(32, 64, config=config, init_method=init, bias=True,
                           input_is_parallel=True, skip_bias_add=False))
    return built


def test_fp8_column_and_row_equal_the_plain_emulated_gemm(megatron_single_rank):
    cfg = emulate("blockwise")
    column, row = _linears(cfg)["fp8"]
    recipe = build_emulated_recipe(cfg)
    x = torch.randn(5, 2, 64, requires_grad=True)
    hidden, _ = column(x)
    out, _ = row(hidden)
    out.sum().backward()
    x_ref = x.detach().clone().requires_grad_()
    w1, b1 = column.weight.detach().clone().requires_grad_(), column.bias.detach().clone()
    w2 = row.weight.detach().clone().requires_grad_()
    h_ref = emulated_fp8_linear(x_ref, w1, b1, recipe)
    out_ref = emulated_fp8_linear(h_ref, w2, None, recipe) + row.bias.detach()
    out_ref.sum().backward()
    assert torch.equal(out, out_ref)
    assert torch.equal(x.grad, x_ref.grad) and torch.equal(column.weight.grad, w1.grad)
    assert torch.equal(row.weight.grad, w2.grad)
    assert type(column).__name__ == "FP8BlockwiseHYBRIDColumnParallelLinear"


def test_fp8_linears_equal_megatron_parents_on_fp8_exact_operands(megatron_single_rank):
    """Operands in {0, +-1/2, +-1, +-2} survive E4M3/E5M2 with power-of-two scales exactly."""
    built = _linears(emulate("blockwise"))
    grid = torch.tensor([-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0])
    gen = torch.Generator().manual_seed(7)
    pick = lambda *shape: grid[torch.randint(0, 7, shape, generator=gen)]  # noqa: E731
    weights = (pick(32, 64), pick(64, 32))
    with torch.no_grad():
        for layers in built.values():
            for layer, weight in zip(layers, weights):
                layer.weight.copy_(weight)
    inputs = ((pick(4, 2, 64), pick(4, 2, 32)), (pick(4, 2, 32), pick(4, 2, 64)))
    results = {}
    for name, layers in built.items():
        results[name] = []
        for layer, (x, g) in zip(layers, inputs):
            xi = x.clone().requires_grad_()
            y, _ = layer(xi)
            y.backward(g)
            results[name] += [y.detach(), xi.grad, layer.weight.grad, layer.bias.grad]
    for ours, parent in zip(results["fp8"], results["plain"]):
        assert torch.equal(ours, parent)
    assert results["fp8"][0].abs().max() > 2  # a real GEMM happened, not a trivial one


def test_extra_state_round_trips_through_state_dict(megatron_single_rank):
    cfg = emulate("delayed", amax_history_len=3)
    column, _ = _linears(cfg)["fp8"]
    for _ in range(2):
        column(torch.randn(3, 1, 64))[0].sum().backward()
    saved = column.state_dict()
    assert saved["_extra_state"]["recipe"] == "delayed"
    fresh, _ = _linears(cfg, seed=1)["fp8"]
    fresh.load_state_dict(saved)
    for role in ("input", "weight", "grad_output"):
        ours, theirs = column.fp8_state.metas[role], fresh.fp8_state.metas[role]
        assert torch.equal(ours.amax_history, theirs.amax_history) and torch.equal(ours.scale, theirs.scale)
    other, _ = _linears(emulate("delayed", amax_history_len=3, format="e4m3"))["fp8"]
    other.load_state_dict(saved)  # same recipe, other format: state still loads
    current, _ = _linears(emulate("current"))["fp8"]
    current.load_state_dict({k: v for k, v in saved.items() if k != "_extra_state"})
    with pytest.raises(ValueError, match="recipe"):
        _linears(emulate("delayed", amax_history_len=3))["fp8"][0].set_extra_state({"recipe": "mxfp8"})


def test_extra_state_is_a_sharded_object_for_dist_checkpointing(megatron_single_rank):
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    column, _ = _linears(emulate("delayed", amax_history_len=2))["fp8"]
    group = megatron_single_rank.get_data_parallel_group(with_context_parallel=True)
    sharded = column.sharded_state_dict(prefix="layer.", metadata={"dp_cp_group": group})
    assert isinstance(sharded["layer._extra_state"], ShardedObject)
    assert sharded["layer._extra_state"].data["scaling"]["input"]["amax_history"].shape == (2,)


def test_expert_with_no_tokens_runs_and_leaves_delayed_state_alone(megatron_single_rank):
    column, row = _linears(emulate("delayed", amax_history_len=2))["fp8"]
    out, _ = row(column(torch.zeros(0, 1, 64, requires_grad=True))[0])
    out.sum().backward()
    assert out.shape == (0, 1, 64)
    assert column.fp8_state.metas["input"].amax_history.tolist() == [0.0, 0.0]


def test_convert_output_layer_in_place_keeps_weights(megatron_single_rank):
    from megatron_ernie.precision.megatron_linear import convert_linear_to_fp8

    cfg = emulate("current")
    plain, _ = _linears(cfg)["plain"]
    weight = plain.weight.detach().clone()
    x = torch.randn(2, 1, 64)
    converted = convert_linear_to_fp8(plain, cfg)
    recipe = build_emulated_recipe(cfg)
    assert converted is plain and torch.equal(plain.weight, weight)
    assert torch.equal(plain(x)[0], emulated_fp8_linear(x, weight, plain.bias, recipe))
    with pytest.raises(TypeError, match="plain Column/RowParallelLinear"):
        convert_linear_to_fp8(plain, cfg)


def test_output_layer_state_travels_in_a_child_that_gpt_model_keeps(megatron_single_rank):
    """GPTModel drops `output_layer._extra_state`; the child's key survives and round-trips."""
    from megatron_ernie.precision.megatron_linear import convert_linear_to_fp8, keep_scaling_state_in_child

    cfg = emulate("delayed", amax_history_len=2)
    head, _ = _linears(cfg)["plain"]
    convert_linear_to_fp8(head, cfg)
    keep_scaling_state_in_child(head)
    head(torch.randn(3, 1, 64))[0].sum().backward()
    saved = head.state_dict()
    assert saved["_extra_state"] is None
    assert max(saved["fp8_scaling._extra_state"]["scaling"]["input"]["amax_history"].tolist()) > 0
    fresh, _ = _linears(cfg, seed=1)["plain"]
    convert_linear_to_fp8(fresh, cfg)
    keep_scaling_state_in_child(fresh)
    fresh.load_state_dict(saved)
    for role in ("input", "weight", "grad_output"):
        assert torch.equal(fresh.fp8_state.metas[role].scale, head.fp8_state.metas[role].scale)
        assert torch.equal(fresh.fp8_state.metas[role].amax_history, head.fp8_state.metas[role].amax_history)


def test_fp8_linear_output_may_be_edited_in_place_like_logits():
    """megatron-core's vocab-parallel cross-entropy edits the logits in place."""
    cfg = emulate("current")
    recipe = build_emulated_recipe(cfg)
    x = torch.randn(3, 2, 64, requires_grad=True)
    weight = torch.randn(32, 64, requires_grad=True)
    logits = emulated_fp8_linear(x, weight, None, recipe)
    logits.sub_(logits.max(dim=-1, keepdim=True).values.detach())
    logits.exp().sum().backward()
    assert logits.shape == (3, 2, 32) and x.grad.shape == x.shape and weight.grad.abs().sum() > 0


def test_spec_patching_swaps_linears_and_can_keep_experts_high_precision():
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear

    from megatron_ernie.precision.megatron_linear import apply_fp8_to_spec, fp8_linear_classes

    spec = get_gpt_layer_local_spec(num_experts=4, moe_grouped_gemm=False)
    cfg = emulate("current")
    column_cls, row_cls = fp8_linear_classes(cfg)
    patched = apply_fp8_to_spec(spec, cfg)
    moe = patched.submodules.mlp.submodules
    assert patched.submodules.self_attention.submodules.linear_qkv is column_cls
    assert patched.submodules.self_attention.submodules.linear_proj is row_cls
    assert moe.experts.submodules.linear_fc1 is column_cls and moe.experts.submodules.linear_fc2 is row_cls
    assert spec.submodules.self_attention.submodules.linear_qkv is ColumnParallelLinear  # untouched
    kept = apply_fp8_to_spec(spec, emulate("current", experts_in_fp8=False)).submodules.mlp.submodules
    assert kept.experts.submodules.linear_fc1 is ColumnParallelLinear
    shared_cls = fp8_linear_classes(emulate("current", experts_in_fp8=False))[0]
    assert kept.shared_experts.submodules.linear_fc1 is shared_cls
    assert apply_fp8_to_spec(spec, FP8Config()) is spec
    grouped = get_gpt_layer_local_spec(num_experts=4, moe_grouped_gemm=True)
    with pytest.raises(ValueError, match="GroupedMLP is a Transformer Engine or grouped-GEMM module"):
        apply_fp8_to_spec(grouped, cfg)
    apply_fp8_to_spec(grouped, emulate("current", experts_in_fp8=False))  # experts stay bf16: fine


def test_layer_uses_fp8_keeps_first_and_last_layers_bf16():
    from megatron_ernie.precision.megatron_linear import layer_uses_fp8

    cfg = emulate("current", bf16_layers_at_start=1, bf16_layers_at_end=2)
    assert [layer_uses_fp8(cfg, i, 6) for i in range(6)] == [False, True, True, True, False, False]
    assert not layer_uses_fp8(FP8Config(), 3, 6)


# ------------------------------------------------------------------ config and TE mapping


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(recipe="fp8"), "fp8.recipe"),
        (dict(recipe="delayed", format="e5m2"), "fp8.format"),
        (dict(backend="cuda"), "fp8.backend"),
        (dict(amax_history_len=0), "fp8.amax_history_len"),
        (dict(amax_history_len="16"), "fp8.amax_history_len"),
        (dict(amax_history_len=True), "fp8.amax_history_len"),
        (dict(amax_compute_algo="mean"), "fp8.amax_compute_algo"),
        (dict(recipe="current", margin=1, backend="emulate"), "fp8.margin"),
        (dict(recipe="delayed", bf16_layers_at_start=1), "fp8.bf16_layers_at_start"),
        (dict(recipe="blockwise", output_layer_in_fp8=True), "fp8.output_layer_in_fp8"),
        (dict(recipe="current", wgrad_in_fp8=False), "fp8.wgrad_in_fp8"),
        (dict(recipe="current", backend="emulate", param_gather=True), "fp8.param_gather"),
    ],
)
def test_config_validation_names_the_field(kwargs, field):
    with pytest.raises(ConfigError) as info:
        FP8Config(**kwargs).validate("fp8")
    assert info.value.field == field


def test_valid_configs_pass_and_layer_counts_are_checked():
    FP8Config().validate("fp8")
    emulate("delayed", bf16_layers_at_start=1, output_layer_in_fp8=True).validate("fp8")
    FP8Config(recipe="blockwise", bf16_layers_at_end=2, param_gather=True).validate("fp8")
    with pytest.raises(ConfigError, match="<= num_layers // pipeline size = 2"):
        validate_layer_counts(emulate("current", bf16_layers_at_end=3), "fp8", num_layers=8, pipeline_size=4)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_backend_te_without_te_or_gpu_is_an_error_never_bf16():
    from megatron_ernie.precision import te

    cfg = FP8Config(recipe="delayed")
    assert not te.probe_transformer_engine().usable
    for call in (te.validate_runtime, te.transformer_config_kwargs, te.te_recipe):
        with pytest.raises(ConfigError, match='backend = "emulate"') as info:
            call(cfg)
        assert info.value.field == "fp8.backend"
    te.validate_runtime(emulate("delayed"))  # emulation needs nothing
    assert te.transformer_config_kwargs(emulate("delayed")) == {"fp8": None, "fp8_param": False}


def test_te_version_error_names_the_version_needed():
    from megatron_ernie.precision import te

    needs = r"Float8BlockScaling needs transformer-engine >= 2\.3\.0, installed is 2\.1\.0"
    with pytest.raises(ConfigError, match=needs):
        te._check_te_version(FP8Config(recipe="blockwise"), "fp8", "2.1.0")
    te._check_te_version(FP8Config(recipe="current"), "fp8", "2.2.0")


def test_megatron_field_mapping_uses_transformer_config_names():
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_ernie.precision.te import ddp_config_kwargs, megatron_fp8_fields

    cfg = FP8Config(recipe="current", format="e4m3", bf16_layers_at_start=1, param_gather=True)
    fields = megatron_fp8_fields(cfg)
    assert fields["fp8"] == "e4m3" and fields["fp8_recipe"] == "tensorwise"
    assert fields["first_last_layers_bf16"] and fields["num_layers_at_start_in_bf16"] == 1
    assert fields["num_layers_at_end_in_bf16"] == 0 and fields["fp8_param"]
    assert set(fields) <= {f.name for f in dataclasses.fields(TransformerConfig)}
    assert ddp_config_kwargs(cfg) == {"fp8_param_gather": True}
    assert megatron_fp8_fields(FP8Config(recipe="mxfp8"))["fp8_recipe"] == "mxfp8"


# ------------------------------------------------------------------ GPU benchmark (pure parts)


def _benchmark_module():
    spec = importlib.util.spec_from_file_location("gpu_fp8", REPO / "benchmarks" / "gpu_fp8.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_fp8"] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def test_benchmark_arguments_and_table():
    bench = _benchmark_module()
    args = bench.parse_args(["--steps", "3", "--recipes", "current,mxfp8", "--tokens", "256",
                             "--experts", "4", "--topk", "2"])
    assert bench.capacity(args) == 128 and args.recipes == "current,mxfp8"
    with pytest.raises(SystemExit):
        bench.parse_args(["--recipes", "fp4"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--tokens", "100"])
    rows = [bench.RunResult("bf16", step_ms=10.0, final_loss=9.0),
            bench.RunResult("current", step_ms=5.0, final_loss=9.01),
            bench.RunResult("mxfp8", status="skipped: needs Blackwell")]
    bench.fill_derived(rows, args, peak_tflops=989.0)
    assert rows[1].tokens_per_s == 256 / 5e-3
    assert rows[1].loss_diff_vs_bf16 == pytest.approx(0.01)
    assert rows[1].mfu == pytest.approx(bench.train_flops_per_step(args) / 5e-3 / 989e12)
    table = bench.format_table(rows).splitlines()
    assert table[3].split()[:3] == ["current", "5.00", "51200"]
    assert table[4].split()[0] == "mxfp8" and table[4].endswith("skipped: needs Blackwell")
    assert bench.peak_tflops_for("NVIDIA H200") == 989.0 and bench.peak_tflops_for("Tesla T4") is None


def test_benchmark_model_routes_every_expert_a_full_capacity_on_cpu():
    """The GPU model's routing and shapes, with torch Linear standing in for te.Linear."""
    import types

    bench = _benchmark_module()
    args = bench.parse_args(["--tokens", "128", "--experts", "4", "--topk", "2", "--hidden", "32",
                             "--expert-ffn", "16", "--vocab", "50", "--layers", "2"])
    def linear(d_in, d_out, bias, params_dtype):
        return torch.nn.Linear(d_in, d_out, bias=bias, dtype=params_dtype)

    torch_te = types.SimpleNamespace(Linear=linear)
    torch.manual_seed(0)
    model = bench.Model(args, torch_te)
    tokens = torch.randint(0, 50, (128,))
    logits = model(tokens, recipe=None)
    assert logits.shape == (128, 50) and logits.dtype == torch.float32
    torch.nn.functional.cross_entropy(logits, tokens).backward()
    expert_grads = [p.grad for p in model.blocks[0].experts.fc1.parameters()]
    assert len(expert_grads) == 4 and all(g is not None and g.abs().sum() > 0 for g in expert_grads)


# ------------------------------------------------------------------ tensor parallel (2 ranks)


def _tp2_worker(rank: int, port: int) -> None:
    """Each rank checks its FP8 column/row shard against the exact full-matrix GEMM."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    from megatron.core import parallel_state
    from megatron.core.model_parallel_config import ModelParallelConfig

    from megatron_ernie.precision.megatron_linear import fp8_linear_classes

    parallel_state.initialize_model_parallel(2, 1)
    column_cls, row_cls = fp8_linear_classes(emulate("blockwise"))
    config = ModelParallelConfig(tensor_model_parallel_size=2, use_cpu_initialization=True)
    grid = torch.tensor([-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0])
    gen = torch.Generator().manual_seed(11)  # same full tensors on both ranks
    pick = lambda *shape: grid[torch.randint(0, 7, shape, generator=gen)]  # noqa: E731
    w1, w2 = pick(32, 64), pick(64, 32)
    x1, g1, x2, g2 = pick(3, 2, 64), pick(3, 2, 32), pick(3, 2, 32), pick(3, 2, 64)
    part = slice(16 * rank, 16 * rank + 16)

    column = column_cls(64, 32, config=config, init_method=torch.nn.init.zeros_, bias=False)
    row = row_cls(32, 64, config=config, init_method=torch.nn.init.zeros_, bias=False,
                  input_is_parallel=True, skip_bias_add=False)
    with torch.no_grad():
        column.weight.copy_(w1[part])
        row.weight.copy_(w2[:, part])
    x1 = x1.requires_grad_()
    y1, _ = column(x1)
    y1.backward(g1[..., part])
    x2_local = x2[..., part].clone().requires_grad_()
    y2, _ = row(x2_local)
    y2.backward(g2)

    assert torch.equal(y1, x1.detach() @ w1[part].t())
    assert torch.equal(x1.grad, g1 @ w1)  # dgrad all-reduced over TP, as the parent does
    assert torch.equal(column.weight.grad, g1[..., part].reshape(-1, 16).t() @ x1.detach().reshape(-1, 64))
    assert torch.equal(y2, x2 @ w2.t())  # row output all-reduced over TP
    assert torch.equal(x2_local.grad, g2 @ w2[:, part])
    parallel_state.destroy_model_parallel()
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_tensor_parallel_fp8_linears_keep_megatron_semantics():
    torch.multiprocessing.spawn(_tp2_worker, args=(_free_port(),), nprocs=2, join=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("recipe", ["delayed", "current", "blockwise", "mxfp8"])
def test_emulation_agrees_with_transformer_engine_on_gpu(recipe):
    from megatron_ernie.precision import te as te_mapping

    if not te_mapping.probe_transformer_engine().usable:
        pytest.skip("Transformer Engine is not usable here")
    bench = _benchmark_module()
    args = bench.parse_args(["--recipes", recipe])
    te_recipe, reason = bench._recipe_or_reason(recipe, args)
    if reason:
        pytest.skip(reason)
    import transformer_engine.pytorch as te

    diffs = bench.emulation_vs_te(recipe, te_recipe, args, te)
    assert max(diffs.values()) < 1e-2, diffs  # a wrong scale or layout gives ~3e-2
