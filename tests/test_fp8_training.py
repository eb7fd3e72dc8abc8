"""FP8 as a training option: the `[fp8]` section reaches the model, trains and resumes.

The slow tests share one 2-process launch of tests/dist/fp8_worker.py (the
tiny MoE of tests/dist/worker.py on the KJV corpus, fp32 master weights):

* emulated delayed scaling trains N steps within a relative loss tolerance of
  the fp32 run from the same weights and data; every other recipe builds and
  its first steps agree too;
* delayed-scaling state (amax histories, scales) goes through megatron-core
  dist_checkpointing and comes back bit for bit, and the resumed run continues
  exactly like an uninterrupted one; FP8 training can start from an fp32 checkpoint;
* tensor parallel 2 trains, and the amax reduction gives every rank the same scales;
* backend = "te" without Transformer Engine fails in setup, before the model is built.

Measured on CPU (20 steps, 2 ranks, fp32 master weights): the largest per-step
relative loss difference to the fp32 run was 4.0e-3 (delayed), 6.8e-3 (current),
4.1e-3 (blockwise), 4.0e-3 (mxfp8), 5.3e-3 (delayed at TP=2); hence 2e-2.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from harness import ROOT, torchrun
from megatron_ernie.config.errors import ConfigError
from megatron_ernie.config.fp8 import FP8Config

STEPS = 20
REL_TOLERANCE = 2e-2  # measured <= 6.8e-3 over 20 steps for every recipe
SHORT_STEPS = 2
RESUME_N = 2
TP_STEPS = 3
OTHER_RECIPES = ["current", "blockwise", "mxfp8"]
RESUME_FP8 = ["fp8.amax_history_len=16", "fp8.output_layer_in_fp8=true",
              "fp8.bf16_layers_at_start=1", "parallel.expert=2"]
CASES = {
    "compare": {"iters": STEPS, "recipes": ["delayed"], "save_baseline": True},
    "short": {"iters": STEPS, "exit": SHORT_STEPS, "recipes": OTHER_RECIPES},
    "resume": {"n": RESUME_N, "fp8": RESUME_FP8},
    "tp2": {"iters": TP_STEPS, "recipes": ["delayed"],
            "layout": ["parallel.tensor=2", "parallel.sequence_parallel=true"]},
    "from_fp32": {"source": "compare"},
    "te_error": {},
}


def relative_differences(losses, reference) -> list:
    assert len(losses) == len(reference) > 0
    return [abs(a - b) / abs(b) for a, b in zip(losses, reference)]


@pytest.fixture(scope="module")
def results(tmp_path_factory, data_cache) -> dict:
    out = tmp_path_factory.mktemp("fp8-training") / "result.json"
    torchrun(2, [ROOT / "tests" / "dist" / "fp8_worker.py", out, json.dumps(CASES)], timeout=900)
    return json.loads(Path(out).read_text())


# ------------------------------------------------------------------ fp8 vs fp32


@pytest.mark.slow
def test_delayed_fp8_trains_within_tolerance_of_fp32(results):
    fp32, fp8 = results["compare"]["fp32"], results["compare"]["delayed"]
    assert len(fp8["losses"]) == STEPS
    diffs = relative_differences(fp8["losses"], fp32["losses"])
    assert max(diffs) < REL_TOLERANCE, diffs
    assert max(diffs) > 1e-5, "FP8 losses equal fp32: the FP8 layers were not used"
    assert fp8["losses"][-1] < fp8["losses"][0] - 0.5, fp8["losses"]  # it learns


@pytest.mark.slow
def test_every_transformer_linear_runs_in_fp8(results):
    # 4 layers x (qkv, proj, 4 local experts x (fc1, fc2)) at EP=1
    assert results["compare"]["delayed"]["fp8_linears"] == 40
    assert results["compare"]["fp32"]["fp8_linears"] == 0


@pytest.mark.slow
def test_amax_reduction_gives_every_data_parallel_rank_the_same_scales(results):
    rank0, rank1 = results["compare"]["delayed"]["states"]
    assert len(rank0) == 40 and rank0 == rank1
    scales = [meta["scale"][0] for roles in rank0.values() for meta in roles.values()]
    assert all(scale != 1.0 for scale in scales)  # every scale was updated from an amax


@pytest.mark.slow
@pytest.mark.parametrize("recipe", OTHER_RECIPES)
def test_each_recipe_builds_trains_and_saves(results, recipe):
    short = results["short"][recipe]
    assert short["fp8_linears"] == 40
    assert short["saved"] == f"iter_{SHORT_STEPS:07d}"
    fp32 = results["compare"]["fp32"]["losses"][:SHORT_STEPS]
    diffs = relative_differences(short["losses"], fp32)
    assert 0 < max(diffs) < REL_TOLERANCE, diffs


# ------------------------------------------------------------------ checkpoint and resume


@pytest.mark.slow
def test_delayed_scaling_state_round_trips_bit_for_bit(results):
    r = results["resume"]
    assert r["resumed_at"] == RESUME_N
    for saved, loaded in zip(r["saved_state"], r["loaded_state"]):
        assert saved == loaded  # floats from float32 tensors: == is bit equality
        # layers 1-3 (layer 0 stays high precision) x 6 linears, plus the output layer
        assert len(saved) == 3 * 6 + 1
        assert not any(".layers.0." in name for name in saved)
        assert any(name.endswith("output_layer") for name in saved)
        histories = [v for roles in saved.values() for meta in roles.values() for v in meta["amax_history"]]
        assert len(histories) == len(saved) * 3 * 16 and sum(v > 0 for v in histories) > 0


@pytest.mark.slow
def test_resumed_fp8_run_continues_like_an_uninterrupted_one(results):
    r = results["resume"]
    assert r["first"] == r["straight"][:RESUME_N]
    assert r["second"] == r["straight"][RESUME_N:], (r["straight"], r["second"])
    assert r["fp_split"] == r["fp_straight"]


@pytest.mark.slow
def test_fp8_training_starts_from_a_high_precision_checkpoint(results):
    r, fp32 = results["from_fp32"], results["compare"]["fp32"]
    assert r["iteration"] == STEPS and r["fingerprint"] == fp32["fingerprint"]
    for rank_state in r["states"]:
        assert len(rank_state) == 40
        for roles in rank_state.values():  # the fp32 checkpoint has no scales: fresh ones
            assert all(meta["scale"] == [1.0] and not any(meta["amax_history"]) for meta in roles.values())


# ------------------------------------------------------------------ tensor parallel


@pytest.mark.slow
def test_tensor_parallel_fp8_trains_with_reduced_amaxes(results):
    fp32, fp8 = results["tp2"]["fp32"], results["tp2"]["delayed"]
    diffs = relative_differences(fp8["losses"], fp32["losses"])
    assert len(diffs) == TP_STEPS and 0 < max(diffs) < REL_TOLERANCE, diffs
    rank0, rank1 = fp8["states"]
    assert len(rank0) == 40 and rank0 == rank1  # TP shards of a weight share one scale


# ------------------------------------------------------------------ backend "te" without TE


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_te_backend_without_te_fails_in_setup_before_the_model_build(results):
    r = results["te_error"]
    assert r["field"] == "fp8.backend"
    assert 'backend = "emulate"' in r["message"]
    assert "fp8_extensions" in r["frames"] and "build_model" not in r["frames"]


# ------------------------------------------------------------------ single-process


def test_recipe_off_adds_no_extensions():
    from megatron_ernie.config.schema import ModelConfig
    from megatron_ernie.model.extensions import extensions_for
    from megatron_ernie.precision.model import fp8_extensions

    empty = fp8_extensions(FP8Config(), 4)
    assert (empty.layer_spec, empty.post_build, empty.tconfig) == ((), (), {})
    assert extensions_for(ModelConfig(), fp8=FP8Config()).layer_spec == ()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_te_backend_extensions_raise_config_error_here():
    from megatron_ernie.precision.model import fp8_extensions

    with pytest.raises(ConfigError) as error:
        fp8_extensions(FP8Config(recipe="current", backend="te"), 4)
    assert error.value.field == "fp8.backend" and "emulate" in error.value.fix


def _moe_layer_spec():
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    return get_gpt_layer_local_spec(num_experts=4, moe_grouped_gemm=False)


def _linear_classes(spec) -> set:
    from megatron_ernie.precision.megatron_linear import is_emulated_fp8_linear

    found, stack = set(), [spec]
    while stack:
        node = stack.pop()
        if isinstance(node, type):
            found.add(is_emulated_fp8_linear(node))
        elif isinstance(node, (list, tuple)):
            stack.extend(node)
        elif hasattr(node, "__dataclass_fields__"):
            stack.extend(getattr(node, name) for name in node.__dataclass_fields__)
    return found


def test_emulated_extensions_rewrite_only_the_fp8_layers():
    from megatron_ernie.precision.model import fp8_extensions

    cfg = FP8Config(recipe="delayed", backend="emulate", bf16_layers_at_start=1, bf16_layers_at_end=1)
    ext = fp8_extensions(cfg, 4)
    spec = _moe_layer_spec()
    assert ext.tconfig == {} and ext.post_build == ()
    assert ext.rewrite_layer(0, spec) is spec and ext.rewrite_layer(3, spec) is spec
    assert _linear_classes(ext.rewrite_layer(1, spec)) == {True, False}  # FP8 linears + norms etc.
    assert _linear_classes(spec) == {False}
    with_head = fp8_extensions(FP8Config(recipe="delayed", backend="emulate", output_layer_in_fp8=True), 4)
    assert len(with_head.post_build) == 1


# ------------------------------------------------------------------ Transformer Engine (GPU)


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_te_backend_trains_close_to_bf16_on_gpu(tmp_path, data_cache):
    """The production path: megatron-core's TE spec with FP8 fields, against bf16.

    Not yet run on a GPU; the 5e-2 tolerance is a guess to be replaced by a measurement.
    """
    from megatron_ernie.precision.te import probe_transformer_engine

    if not probe_transformer_engine().usable:
        pytest.skip("Transformer Engine is not usable here")
    case = {"te": {"iters": STEPS, "recipes": ["delayed", "current"], "backend": "te",
                   "layout": ["model.dtype=\"bf16\""]}}
    out = tmp_path / "result.json"
    torchrun(2, [ROOT / "tests" / "dist" / "fp8_worker.py", out, json.dumps(case)], timeout=900)
    results = json.loads(out.read_text())["te"]
    for recipe in ("delayed", "current"):
        diffs = relative_differences(results[recipe]["losses"], results["fp32"]["losses"])
        assert 0 < max(diffs) < 5e-2, (recipe, diffs)
