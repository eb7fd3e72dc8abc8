"""The post-training benchmark's tables (benchmarks/posttrain_pipeline.py): pure functions, no runs."""

import importlib.util
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "posttrain_pipeline.py"
_SPEC = importlib.util.spec_from_file_location("posttrain_bench", _PATH)
bench = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(bench)


def _row(**means):
    return {task: {"greedy": [m, 0.05], "sampled": [m / 2, 0.05]} for task, m in means.items()}


def _seed(shift):
    return {"sft": _row(a=0.2 + shift, b=0.4),
            "experts/ea": _row(a=0.6 + shift, b=0.3),
            "experts/eb": _row(a=0.1, b=0.8 + shift),
            "opd": _row(a=0.5, b=0.7),
            "general": _row(a=0.48, b=0.6),
            "baseline": _row(a=0.3, b=0.5)}


def test_cell_is_mean_and_half_range():
    assert bench.cell([0.2, 0.6]) == pytest.approx((0.4, 0.2))
    assert bench.cell([0.3]) == (0.3, 0.0)


def test_mode_table_collects_one_value_per_seed():
    table = bench.mode_table({1: _seed(0.0), 2: _seed(0.1)}, "sampled")
    assert table["experts/ea"]["a"] == pytest.approx([0.3, 0.35])
    assert list(table) == ["sft", "experts/ea", "experts/eb", "opd", "general", "baseline"]


def test_matrix_prints_points_with_spread_and_average():
    text = bench.format_matrix(bench.mode_table({1: _seed(0.0), 2: _seed(0.1)}, "greedy"), ["a", "b"], "T")
    sft = next(line for line in text.splitlines() if line.startswith("sft"))
    # a: 20 and 30 -> 25.0 ± 5.0; b: 40 ± 0; average of (20, 40) and (30, 40): 30 and 35 -> 32.5 ± 2.5
    assert sft.replace("±", " ").split() == ["sft", "25.0", "5.0", "40.0", "0.0", "32.5", "2.5"]
    assert text.splitlines()[1].split() == ["stage", "a", "b", "average"]


def test_targets_pass_and_miss_with_the_right_numbers():
    table = bench.mode_table({1: _seed(0.0)}, "greedy")
    lines = bench.targets(table, {"ea": ["a"], "eb": ["b"]}, ["a", "b"])
    text = "\n".join(lines)
    assert "PASS  expert ea gain over SFT on a: +40.0 points" in text
    assert "PASS  OPD recovers of ea's gain on a: +75.0%" in text      # 30 of 40 points
    assert "PASS  OPD recovers of eb's gain on b: +75.0%" in text      # 30 of 40 points
    assert "PASS  OPD average minus best expert average: +15.0 points" in text  # 60 vs 45 (both)
    assert "PASS  general RL change on a: -2.0 points" in text
    assert "MISS  general RL change on b: -10.0 points" in text
    assert "PASS  OPD average minus baseline average: +20.0 points" in text


def test_targets_miss_a_negative_expert_gain():
    scores = _seed(0.0)
    scores["experts/ea"] = _row(a=0.15, b=0.3)
    lines = bench.targets(bench.mode_table({1: scores}, "greedy"), {"ea": ["a"], "eb": ["b"]}, ["a", "b"])
    assert any(line.startswith("  MISS  expert ea gain over SFT on a: -5.0") for line in lines)
    assert any("OPD recovers of ea's gain on a: +nan%" in line for line in lines)


def test_targets_carry_standard_errors_from_the_cells():
    """Every cell has SE 5 points (one seed): a difference has sqrt(50) = 7.1; OPD's 30 of ea's 40 points
    (shared SFT cell) has sqrt(50 + 0.75^2 * 50 - 2 * 0.75 * 25) / 40 = 15.9%; with two seeds of SE 5
    each the seed mean's SE is 5 / sqrt(2) and a difference 5.0."""
    table = bench.mode_table({1: _seed(0.0)}, "greedy")
    errors = bench.mode_table({1: _seed(0.0)}, "greedy", part=1)
    text = "\n".join(bench.targets(table, {"ea": ["a"], "eb": ["b"]}, ["a", "b"], errors))
    assert "PASS  expert ea gain over SFT on a: +40.0 points ± 7.1 SE" in text
    assert "PASS  OPD recovers of ea's gain on a: +75.0% ± 15.9 SE" in text
    assert "MISS  general RL change on b: -10.0 points ± 7.1 SE" in text
    assert "PASS  OPD average minus best expert average: +15.0 points ± 5.0 SE" in text  # averages of 2 cells
    two = {1: _seed(0.0), 2: _seed(0.0)}
    text = "\n".join(bench.targets(bench.mode_table(two, "greedy"), {"ea": ["a"], "eb": ["b"]}, ["a", "b"],
                                   bench.mode_table(two, "greedy", part=1)))
    assert "expert ea gain over SFT on a: +40.0 points ± 5.0 SE" in text
    assert bench.seed_mean_se([0.03, 0.04]) == pytest.approx(2.5)


def test_counts_default_and_refuse_negatives_before_anything_trains(capsys):
    args = bench.parse_args([])
    assert (args.prompts, args.samples) == (128, 4)
    assert (bench.parse_args(["--quick"]).prompts, bench.parse_args(["--quick"]).samples) == (8, 1)
    with pytest.raises(SystemExit):
        bench.parse_args(["--samples", "-1"])
    assert "--samples -1: use a positive count" in capsys.readouterr().err


def test_judge_report_lists_the_mean_score_by_kind():
    judged = {"examples": 4, "accuracy": 0.75, "correlation": 0.5, "mean_score_yes": 0.7, "mean_score_no": 0.3,
              "by_kind": {"right": 0.7, "pseudo": 0.29}}
    lines = bench.judge_report({1: judged, 2: None}).splitlines()
    assert lines[3] == "    mean p(y) by kind: right 0.70, pseudo 0.29"
    assert lines[4] == "  seed 2: no judge stage"
    assert "mean |score - rubric| nan" in lines[2]  # a report written before the field existed
    assert "mean |score - rubric| 0.125" in bench.judge_report({1: {**judged, "mean_abs_error": 0.125}})
