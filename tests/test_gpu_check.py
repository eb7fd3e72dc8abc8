"""benchmarks/gpu_check.sh: the prepared GPU check, run end to end on CPU (--cpu-dry-run).

The device minutes of a lent GPU must go to measurements, so every section of
the script (environment and compat-layer check, GEMM rates, `ernie pretrain`
of the dense model in bf16 and FP8 with backend "torch", the MoE, the rollout
K3) runs here with tiny sizes, through the same shell entry point, and the
report must carry finite numbers for each. The pure helpers (FLOP counts, the
iteration-line parser against the real console format, the FP8 comparison)
are checked against hand-computed values.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest

from harness import ROOT

STEPS = 4  # the dry run's default
# CPU time of the whole dry run is about 100 s (5 CLI launches, each ~10 s of imports);
# the wall-clock limits are generous because a shared CI host can be many times slower.


def _module():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def finite_positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory, data_cache):
    out = tmp_path_factory.mktemp("gpu-check")
    proc = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--cpu-dry-run", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=1000,
                          env={**os.environ, "GPU_CHECK_TIMEOUT": "900"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, json.loads((out / "gpu_check.json").read_text()), proc.stdout


# ------------------------------------------------------------------ the dry run


@pytest.mark.slow
def test_dry_run_writes_the_report_files(dry_run):
    out, report, stdout = dry_run
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.json", "gpu_check.log", "gpu_check.md"]
    assert report["mode"] == "cpu-dry-run"
    markdown = (out / "gpu_check.md").read_text()
    assert markdown in stdout  # printed too
    for name in ("dense_bf16", "dense_fp8_delayed", "dense_fp8_current", "moe_bf16", "bf16 / bf16"):
        assert name in markdown


@pytest.mark.slow
def test_environment_reports_megatron_core_and_the_compat_layer(dry_run):
    from megatron.core import package_info

    env = dry_run[1]["environment"]
    assert env["megatron_core"] == package_info.__version__
    assert env["cpu_compat_applied"] is True and env["cpu_compat_ok"] is True  # CPU: on
    assert env["fp8_torch_backend"] == "ok"
    checks = dry_run[1]["checks"]
    assert checks["megatron_core_version"] == package_info.__version__ and checks["fp8_torch_backend_runs"]


@pytest.mark.slow
def test_gemm_rates_are_measured(dry_run):
    gemm = dry_run[1]["gemm"]
    assert gemm["n"] == 256 and finite_positive(gemm["bf16_tflops"]) and finite_positive(gemm["fp8_tflops"])


@pytest.mark.slow
def test_every_pretrain_run_trains_and_is_timed(dry_run):
    runs = dry_run[1]["pretrain"]["runs"]
    assert sorted(runs) == ["dense_bf16", "dense_fp8_current", "dense_fp8_delayed", "moe_bf16"]
    for name, run in runs.items():
        assert run["status"] == "ok", (name, run)
        assert len(run["losses"]) == STEPS and all(math.isfinite(v) for v in run["losses"])
        for field in ("tokens_per_s", "ms_per_iter", "model_tflops", "mfu_vs_measured_gemm", "final_loss"):
            assert finite_positive(run[field]), (name, field, run.get(field))
    assert runs["moe_bf16"]["total_params"] > runs["moe_bf16"]["active_matmul_params"]
    assert runs["dense_bf16"]["total_params"] > runs["dense_bf16"]["active_matmul_params"]  # + embedding
    assert sorted(dry_run[1]["checks"]["pretrain_runs_ok"]) == sorted(runs)


@pytest.mark.slow
def test_fp8_runs_differ_from_bf16_but_only_a_little(dry_run):
    runs, fp8 = dry_run[1]["pretrain"]["runs"], dry_run[1]["pretrain"]["fp8_vs_bf16"]
    assert sorted(fp8) == ["current", "delayed"]
    for recipe, row in fp8.items():
        assert finite_positive(row["step_time_ratio"]) and finite_positive(row["speedup"])
        assert abs(row["step_time_ratio"] * row["speedup"] - 1) < 1e-9
        assert 0 < row["max_rel_loss_gap"] < 0.05, (recipe, row)  # same seed and data, FP8 GEMMs
        assert runs[f"dense_fp8_{recipe}"]["losses"] != runs["dense_bf16"]["losses"]


@pytest.mark.slow
def test_rollout_k3_with_and_without_routing_replay(dry_run):
    rl = dry_run[1]["rl"]
    assert rl["status"] == "ok", rl
    rows = {row["pairing"]: row for row in rl["rows"]}
    assert len(rows) == 3 and "bf16 / bf16" in rows
    for row in rows.values():
        for field in ("k3_replay", "k3_compare", "route_mismatch"):
            assert math.isfinite(row[field]) and row[field] >= 0, (row["pairing"], field)
        assert row["tokens"] > 0
    # On CPU decoding and the full forward run the same kernels: bf16 agrees exactly with replay.
    assert rows["bf16 / bf16"]["k3_replay"] == 0.0


# ------------------------------------------------------------------ helpers, in process


def test_model_counts_match_a_hand_count():
    gc = _module()
    dense = {"model.hidden_size": 64, "model.num_layers": 2, "model.seq_length": 32,
             "model.num_attention_heads": 4, "model.num_query_groups": 2, "model.ffn_hidden_size": 128,
             "data.vocab_size": 1000, "moe.num_experts": 0}
    # attention: qkv 64 x (64 + 2*2*16) + proj 64 x 64 = 8192 + 4096; SwiGLU FFN 3 x 64 x 128 = 24576
    per_layer = 64 * 128 + 64 * 64 + 3 * 64 * 128
    counts = gc.model_counts(dense)
    assert counts["active_matmul_params"] == 2 * per_layer + 64 * 1000
    assert counts["total_params"] == counts["active_matmul_params"] + 64 * 1000
    assert counts["train_flops_per_token"] == 6 * counts["active_matmul_params"] + 12 * 32 * 64 * 2
    moe = {**dense, "moe.num_experts": 4, "moe.router_topk": 2, "moe.expert_ffn_hidden_size": 32,
           "moe.first_dense_layers": 1}
    m = gc.model_counts(moe)
    expert = 3 * 64 * 32
    layer_attention = 64 * 128 + 64 * 64
    assert m["active_matmul_params"] == (2 * layer_attention + 3 * 64 * 128 + 2 * expert + 64 * 4 + 64 * 1000)
    assert m["total_params"] == m["active_matmul_params"] + 2 * expert + 64 * 1000


def test_gpu_sizes_are_a_1b_dense_and_an_moe_of_similar_active_size():
    gc = _module()
    dense = gc.model_counts({**gc.GPU_COMMON, "moe.num_experts": 0})
    moe = gc.model_counts({**gc.GPU_COMMON, **gc.GPU_MOE})
    assert 0.9e9 < dense["total_params"] < 1.2e9
    assert abs(moe["active_matmul_params"] / dense["active_matmul_params"] - 1) < 0.05
    assert moe["total_params"] > 2 * dense["total_params"] - dense["active_matmul_params"]


def test_iteration_parser_reads_the_real_console_line():
    from megatron_ernie.observe.console import IterationStats, format_iteration

    gc = _module()
    line = format_iteration(IterationStats(3, 14, 49152, 7.25, 3e-4, 1.5, 123456.7, 132.5))
    nan_line = format_iteration(IterationStats(4, 14, 65536, float("nan"), 3e-4, None, 99.0, 1.0))
    rows = gc.parse_iterations(f"[12:00:00] {line}\nnoise\n[12:00:01] {nan_line}\n")
    assert rows[0] == (3, 7.25, 123457.0, 132.5)
    assert rows[1][0] == 4 and math.isnan(rows[1][1])


def test_fp8_comparison_and_mfu_arithmetic():
    gc = _module()
    bf16 = {"ms_per_iter": 200.0, "losses": [8.0, 7.0], "final_loss": 7.0}
    fp8 = {"ms_per_iter": 125.0, "losses": [8.08, 7.0], "final_loss": 7.0}
    row = gc.fp8_versus_bf16(bf16, fp8)
    assert row == {"step_time_ratio": 0.625, "speedup": 1.6, "final_loss_gap": 0.0,
                   "max_rel_loss_gap": pytest.approx(0.01)}
    assert gc.fp8_versus_bf16(bf16, {"status": "exit 1"}) == {"status": "missing run"}
    result = {"tokens_per_s": 1000.0}
    gc.add_mfu(result, {"train_flops_per_token": 6e9}, {"bf16_tflops": 600.0, "datasheet_bf16_tflops": None})
    assert result == {"tokens_per_s": 1000.0, "model_tflops": 6.0, "mfu_vs_measured_gemm": 0.01}


def test_non_finite_numbers_stay_readable_json():
    gc = _module()
    cleaned = gc._finite_or_none({"a": [1.0, float("inf")], "b": float("nan"), "c": "x"})
    assert json.loads(json.dumps(cleaned, allow_nan=False)) == {"a": [1.0, "inf"], "b": "nan", "c": "x"}


def test_arguments_default_per_mode_and_reject_a_warmup_past_the_steps():
    gc = _module()
    gpu, dry = gc.parse_args([]), gc.parse_args(["--cpu-dry-run"])
    assert (gpu.steps, gpu.gemm_n, gpu.budget_s) == (14, 8192, 420.0)
    assert (dry.steps, dry.gemm_n) == (4, 256)
    with pytest.raises(SystemExit):
        gc.parse_args(["--steps", "3", "--warmup", "3"])


def test_a_report_cut_short_is_still_written(tmp_path):
    """What run_sections saves after its first sections, if the device's time runs out then."""
    gc = _module()
    partial = {"mode": "gpu", "sections": {"environment": 3.0}, "pretrain": {"runs": {}, "fp8_vs_bf16": {}},
               "rl": {"status": "not run"}, "environment": {"megatron_core": "0.19.2", "cpu_compat_ok": True},
               "gemm": {"n": 8192, "bf16_tflops": 790.0, "fp8_tflops": float("nan")}}
    text = gc.write_report(partial, tmp_path, 0.0)
    saved = json.loads((tmp_path / "gpu_check.json").read_text())
    assert saved["checks"]["megatron_core_version"] == "0.19.2" and saved["gemm"]["fp8_tflops"] == "nan"
    assert "megatron-core 0.19.2" in text and "bf16 790 TFLOP/s" in text
    assert (tmp_path / "gpu_check.md").read_text() == text


def test_a_failing_section_is_recorded_and_the_rest_go_on():
    gc = _module()
    report = {"sections": {}}
    result = gc.guarded(report, "boom", lambda: 1 / 0)
    assert result["status"].startswith("error: ZeroDivisionError") and "boom" in report["sections"]


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
