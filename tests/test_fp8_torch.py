"""fp8.backend = "torch": the emulation's recipes with real FP8 GEMMs (torch._scaled_mm).

torch 2.13 runs torch._scaled_mm on CPU for E4M3 and E5M2 operands (fp32
accumulation), so the real path is exercised here, not only on a GPU. Both
backends quantise identically, so every output must equal the emulation up to
fp32 summation order: measured max relative difference (per tensor, against its
largest entry) <= 2.1e-7 for y, dx, dW, db over every recipe and format (seeds
0-2, 77 tokens x 200 in x 96 out; 5.8e-8 for the block recipes); hence the 2e-6
tolerance. A wrong scale,
transpose or block alignment gives differences of 1e-2 or more.
"""

from __future__ import annotations

import re

import pytest
import torch

from harness import ROOT, torchrun
from megatron_ernie.config.errors import ConfigError
from megatron_ernie.config.fp8 import FP8Config
from megatron_ernie.precision import gemm
from megatron_ernie.precision.linear import emulated_fp8_linear
from megatron_ernie.precision.quantize import quantize_blockwise, quantize_tensorwise
from megatron_ernie.precision.recipes import build_emulated_recipe
from megatron_ernie.precision.formats import E4M3, E5M2
from megatron_ernie.precision.scaling import abs_max, scale_from_amax

RECIPES = ["delayed", "current", "blockwise", "mxfp8"]
TOLERANCE = 2e-6


def max_rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def run_linear(backend, recipe, fmt, seed, tokens=77, d_in=200, d_out=96, steps=3, dtype=torch.float32,
               device="cpu"):
    """`steps` forward/backward passes (delayed scaling: scales from a real history); last outputs."""
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(tokens, d_in, generator=gen) * 3).to(device, dtype).requires_grad_()
    w = (torch.randn(d_out, d_in, generator=gen) * 0.05).to(device, dtype).requires_grad_()
    b = torch.randn(d_out, generator=gen).to(device, dtype).requires_grad_()
    grads = [torch.randn(tokens, d_out, generator=gen).to(device, dtype) * 1e-3 for _ in range(steps)]
    cfg = FP8Config(recipe=recipe, format=fmt, backend=backend, amax_history_len=4)
    recipe_obj = build_emulated_recipe(cfg)
    state = recipe_obj.new_state()
    for g in grads:
        x.grad = w.grad = b.grad = None
        y = emulated_fp8_linear(x, w, b, recipe_obj, state)
        y.backward(g)
    return {"y": y.detach(), "dx": x.grad, "dw": w.grad, "db": b.grad}


class CountingScaledMM:
    """Wraps gemm.scaled_mm_fp32 to count the real FP8 GEMMs and their operand dtypes."""

    def __init__(self, monkeypatch):
        self.calls = []
        self._inner = gemm.scaled_mm_fp32
        monkeypatch.setattr(gemm, "scaled_mm_fp32", self)

    def __call__(self, a, b_t, scale_a, scale_b):
        self.calls.append((a.dtype, b_t.dtype, tuple(a.shape), tuple(b_t.shape)))
        return self._inner(a, b_t, scale_a, scale_b)


# ------------------------------------------------------------------ the GEMM layer


def _random_quantized(shape, block, fmt, gen):
    x = torch.randn(*shape, generator=gen) * torch.rand(shape[0], 1, generator=gen) * 10
    if block is None:
        return quantize_tensorwise(x, fmt, scale_from_amax(abs_max(x), fmt.max_normal, False))
    return quantize_blockwise(x, fmt, block, lambda amax: scale_from_amax(amax, fmt.max_normal, True))


@pytest.mark.parametrize("block", [None, (1, 128), (128, 128), (1, 32), (32, 1)])
def test_transposed_operand_dequantises_to_the_transpose(block):
    q = _random_quantized((150, 70), block, E4M3, torch.Generator().manual_seed(1))
    t = q.transposed()
    assert t.shape == (70, 150)
    assert torch.equal(t.dequantize(), q.dequantize().t())


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("blocks", [(None, None), ((1, 128), (128, 128)), ((1, 128), (1, 128)),
                                    ((1, 32), (1, 32))], ids=["tensor", "1x128-128x128", "1x128", "mx"])
def test_fp8_matmul_equals_the_dequantised_product(blocks, seed):
    gen = torch.Generator().manual_seed(seed)
    m, n, k = 37 + seed, 45, 300 + 7 * seed  # none a multiple of 16: padding is exercised
    a = _random_quantized((m, k), blocks[0], E5M2, gen)
    b = _random_quantized((n, k), blocks[1], E4M3, gen)
    out = gemm.fp8_matmul_nt(a, b)
    assert out.shape == (m, n) and out.dtype == torch.float32
    assert max_rel_diff(out, a.dequantize().double() @ b.dequantize().double().t()) < TOLERANCE


def test_fp8_matmul_with_an_empty_dimension_is_zeros():
    gen = torch.Generator().manual_seed(0)
    a = _random_quantized((0, 64), None, E4M3, gen)
    b = _random_quantized((32, 64), None, E4M3, gen)
    assert gemm.fp8_matmul_nt(a, b).shape == (0, 32)
    no_k = gemm.fp8_matmul_nt(_random_quantized((8, 0), None, E4M3, gen), _random_quantized((16, 0), None, E5M2, gen))
    assert no_k.shape == (8, 16) and not no_k.any()  # K = 0: an expert with no tokens, in wgrad
    with pytest.raises(ValueError, match="disagree on K"):
        gemm.fp8_matmul_nt(a, _random_quantized((32, 48), None, E4M3, gen))


def test_operands_with_misaligned_k_blocks_are_refused():
    gen = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="K-blocks"):
        gemm.fp8_matmul_nt(_random_quantized((16, 256), (1, 128), E4M3, gen),
                           _random_quantized((16, 256), (1, 32), E4M3, gen))


# ------------------------------------------------------------------ the linear: torch vs emulate


@pytest.mark.parametrize("fmt", ["hybrid", "e4m3"])
@pytest.mark.parametrize("recipe", RECIPES)
def test_torch_backend_equals_emulation_forward_and_backward(recipe, fmt):
    spreads = {}
    for seed in (0, 1, 2):
        emulated = run_linear("emulate", recipe, fmt, seed)
        real = run_linear("torch", recipe, fmt, seed)
        for name in emulated:
            diff = max_rel_diff(real[name], emulated[name])
            spreads[name] = max(spreads.get(name, 0.0), diff)
    assert max(spreads.values()) < TOLERANCE, spreads


@pytest.mark.parametrize("recipe", RECIPES)
def test_torch_backend_differs_from_high_precision_like_the_emulation(recipe):
    """Both backends are FP8: their error against fp64 is the same, and clearly non-zero."""
    real = run_linear("torch", recipe, "hybrid", 0, steps=1 if recipe != "delayed" else 3)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(77, 200, generator=gen).double() * 3
    w = torch.randn(96, 200, generator=gen).double() * 0.05
    b = torch.randn(96, generator=gen).double()
    exact = x @ w.t() + b
    assert 1e-4 < max_rel_diff(real["y"], exact) < 0.1


@pytest.mark.parametrize("recipe,expected", [("delayed", 3), ("current", 3),
                                             ("blockwise", 2 + 1 + 1), ("mxfp8", 7 + 3 + 3)])
def test_every_gemm_of_a_step_is_a_real_fp8_gemm(monkeypatch, recipe, expected):
    """fprop, dgrad, wgrad: one call each per tensor-wise GEMM, one per K-block otherwise.

    Shapes 77 tokens x 200 in x 96 out: blockwise K-blocks of 128 give fprop 2,
    dgrad 1 (K = out), wgrad 1 (K = tokens); mxfp8's 32 give 7, 3 and 3.
    """
    counter = CountingScaledMM(monkeypatch)
    run_linear("torch", recipe, "hybrid", 0, steps=1)
    assert len(counter.calls) == expected
    dtypes = {(a, b) for a, b, _, _ in counter.calls}
    assert (torch.float8_e5m2, torch.float8_e4m3fn) in dtypes  # dgrad/wgrad: E5M2 grads
    assert (torch.float8_e5m2, torch.float8_e5m2) not in dtypes  # cuBLAS has no such kernel
    for _, _, a_shape, b_shape in counter.calls:  # padded to cuBLAS's multiples of 16
        assert a_shape[1] == b_shape[1] and all(size % 16 == 0 for size in (*a_shape, *b_shape))


def test_emulate_backend_runs_no_fp8_gemm(monkeypatch):
    counter = CountingScaledMM(monkeypatch)
    run_linear("emulate", "delayed", "hybrid", 0, steps=1)
    assert counter.calls == []


def test_bf16_activations_and_inference_path_match_the_emulation():
    emulated = run_linear("emulate", "current", "hybrid", 3, dtype=torch.bfloat16, steps=1)
    real = run_linear("torch", "current", "hybrid", 3, dtype=torch.bfloat16, steps=1)
    for name in emulated:  # fp32 results that differ by ~1e-7 can round one bf16 ulp apart
        assert max_rel_diff(real[name], emulated[name]) < 2 ** -7, name
    x, w = torch.randn(20, 128), torch.randn(64, 128)
    with torch.no_grad():  # the rollout's path: forward only, no backward operands kept
        outs = [emulated_fp8_linear(x, w, None, build_emulated_recipe(FP8Config(recipe="blockwise", backend=name)))
                for name in ("torch", "emulate")]
    assert max_rel_diff(*outs) < TOLERANCE


def test_wgrad_in_high_precision_skips_the_fp8_wgrad(monkeypatch):
    counter = CountingScaledMM(monkeypatch)
    cfg = FP8Config(recipe="delayed", backend="torch", wgrad_in_fp8=False)
    x = torch.randn(32, 64, requires_grad=True)
    w = torch.randn(32, 64, requires_grad=True)
    recipe = build_emulated_recipe(cfg)
    emulated_fp8_linear(x, w, None, recipe, recipe.new_state()).sum().backward()
    assert len(counter.calls) == 2  # fprop and dgrad only
    torch.testing.assert_close(w.grad, torch.ones(32, 32).t() @ x.detach(), rtol=1e-6, atol=1e-5)


# ------------------------------------------------------------------ megatron-core layers


def _megatron_pair(cfg, d_in=64, d_hidden=32):
    from megatron.core.model_parallel_config import ModelParallelConfig

    from megatron_ernie.precision.megatron_linear import fp8_linear_classes

    config = ModelParallelConfig(use_cpu_initialization=True)
    column_cls, row_cls = fp8_linear_classes(cfg)
    torch.manual_seed(0)
    column = column_cls(d_in, d_hidden, config=config, init_method=torch.nn.init.normal_, bias=True)
    row = row_cls(d_hidden, d_in, config=config, init_method=torch.nn.init.normal_, bias=True,
                  input_is_parallel=True, skip_bias_add=False)
    return column, row


def test_megatron_linears_with_torch_backend_equal_the_emulated_ones(megatron_single_rank):  # noqa: F811
    outputs = {}
    for backend in ("emulate", "torch"):
        column, row = _megatron_pair(FP8Config(recipe="delayed", backend=backend))
        x = torch.randn(5, 3, 64, generator=torch.Generator().manual_seed(4), requires_grad=True)
        for _ in range(2):
            x.grad = None
            out, _ = row(column(x)[0])
            out.square().sum().backward()
        outputs[backend] = (out.detach(), x.grad, column.weight.grad, row.weight.grad, type(column).__name__)
    assert outputs["torch"][4] == "FP8DelayedHYBRIDTorchColumnParallelLinear"
    for real, emulated in zip(outputs["torch"][:4], outputs["emulate"][:4]):
        assert max_rel_diff(real, emulated) < TOLERANCE


def test_layer_widths_that_cublas_cannot_take_are_a_config_error(megatron_single_rank):  # noqa: F811
    with pytest.raises(ConfigError) as error:
        _megatron_pair(FP8Config(recipe="current", backend="torch"), d_hidden=40)
    assert error.value.field == "fp8.backend" and error.value.value == "torch"
    assert "[40, 64]" in str(error.value) and "multiples of 16" in str(error.value)
    assert "emulate" in error.value.fix
    _megatron_pair(FP8Config(recipe="current", backend="emulate"), d_hidden=40)  # emulation: any width


# ------------------------------------------------------------------ config and runtime checks


def test_torch_is_a_backend_with_the_emulation_rules():
    FP8Config(recipe="delayed", backend="torch", output_layer_in_fp8=True, wgrad_in_fp8=False).validate("fp8")
    with pytest.raises(ConfigError) as error:
        FP8Config(recipe="delayed", backend="cuda").validate("fp8")
    assert error.value.field == "fp8.backend" and "'torch'" in error.value.fix
    with pytest.raises(ConfigError) as error:
        FP8Config(recipe="current", backend="torch", param_gather=True).validate("fp8")
    assert error.value.field == "fp8.param_gather" and "'torch'" in error.value.fix


def test_torch_backend_tells_megatron_core_nothing_about_fp8():
    from megatron_ernie.precision.te import ddp_config_kwargs, megatron_fp8_fields

    cfg = FP8Config(recipe="delayed", backend="torch")
    assert megatron_fp8_fields(cfg) == {"fp8": None, "fp8_param": False}
    assert ddp_config_kwargs(cfg) == {"fp8_param_gather": False}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU path")
def test_cpu_runs_real_fp8_gemms_so_the_torch_backend_is_legal_here():
    from megatron_ernie.precision.model import fp8_extensions

    assert gemm.scaled_mm_unavailable_reason(torch.device("cpu")) is None
    ext = fp8_extensions(FP8Config(recipe="current", backend="torch"), 4)
    assert len(ext.layer_spec) == 1 and ext.tconfig == {}


def test_a_torch_without_fp8_gemms_is_a_config_error_naming_the_backend(monkeypatch):
    from megatron_ernie.precision.model import fp8_extensions

    def broken(*args, **kwargs):
        raise RuntimeError("_scaled_mm is not implemented for this device")

    from megatron_ernie.precision.te import validate_runtime

    monkeypatch.setattr(torch, "_scaled_mm", broken)
    for check in (lambda cfg: fp8_extensions(cfg, 4), validate_runtime):
        with pytest.raises(ConfigError) as error:
            check(FP8Config(recipe="current", backend="torch"))
        assert error.value.field == "fp8.backend" and error.value.value == "torch"
        assert torch.__version__ in str(error.value) and "not implemented" in str(error.value)
        assert 'backend = "emulate"' in error.value.fix
    validate_runtime(FP8Config(recipe="off", backend="torch"))  # FP8 off: nothing to check


# ------------------------------------------------------------------ ernie pretrain, both backends

ITERATION = re.compile(r"iteration\s+(\d+)/\s*\d+\s+\|.*?\| loss ([0-9.]+)")
PRETRAIN_STEPS = 8


def _pretrain_losses(tmp_path, backend: str) -> list:
    run_dir = tmp_path / backend
    proc = torchrun(2, ["-m", "megatron_ernie.cli", "pretrain", "--config", ROOT / "configs/tiny_cpu_fp8.toml",
                        "--set", f"run.dir=\"{run_dir}\"", "--set", f"train.iters={PRETRAIN_STEPS}",
                        "--set", "train.eval_interval=0", "--set", "checkpoint.save_interval=0",
                        "--set", "checkpoint.save_on_exit=false", "--set", "log.tensorboard=false",
                        "--set", f"fp8.backend=\"{backend}\""])
    return [float(loss) for _, loss in ITERATION.findall(proc.stdout)]


@pytest.mark.slow
def test_pretrain_with_torch_backend_follows_the_emulated_loss_curve(tmp_path, data_cache):
    emulated, real = _pretrain_losses(tmp_path, "emulate"), _pretrain_losses(tmp_path, "torch")
    assert len(real) == len(emulated) == PRETRAIN_STEPS
    diffs = [abs(a - b) / b for a, b in zip(real, emulated)]
    assert max(diffs) < 1e-3, diffs  # accumulation order only; measured: see the report
    assert real[-1] < real[0] - 0.3, real  # and it learns


# ------------------------------------------------------------------ on a GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("recipe", RECIPES)
def test_cublas_fp8_gemms_equal_the_emulation_on_gpu(recipe):
    reason = gemm.scaled_mm_unavailable_reason(torch.device("cuda"))
    if reason:
        pytest.skip(reason)
    kw = dict(tokens=256, d_in=512, d_out=384, device="cuda")
    emulated = run_linear("emulate", recipe, "hybrid", 0, **kw)
    real = run_linear("torch", recipe, "hybrid", 0, **kw)
    for name in emulated:
        assert max_rel_diff(real[name], emulated[name]) < 1e-5, name
