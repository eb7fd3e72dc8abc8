"""The quickstart's family table means something: validation loss falls with sub-network size.

Unit cases check the summary's verdict (Spearman's rank correlation with ties, the largest-minus-smallest
gap, the sentence under the table) against hand-computed values; the slow case trains the quickstart
recipe (configs/quickstart_cpu.toml) shortened, on two seeds, and asserts the family property on the table
the run writes.
"""

import csv
import math

import pytest

from harness import ROOT, torchrun
from megatron_ernie.observe.summary import family_line, family_verdict, spearman


def _row(subnet, total, active, loss):
    return {"subnet": subnet, "total_params": str(total), "active_params": str(active), "valid_loss": str(loss)}


def test_spearman_matches_hand_computed_values():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # one adjacent swap among 5: rho = 1 - 6*2/(5*24) = 0.9
    assert spearman([1, 2, 3, 4, 5], [1, 3, 2, 4, 5]) == pytest.approx(0.9)
    # ties share the mean rank: ranks x = [1.5, 1.5, 3, 4], y = [4, 2.5, 2.5, 1] -> r = -0.8333...
    assert spearman([1, 1, 2, 3], [3, 2, 2, 1]) == pytest.approx(-5 / 6)
    assert math.isnan(spearman([1, 2, 3], [5, 5, 5]))


def test_verdict_orders_members_by_active_then_total_params():
    rows = [_row("big", 500, 400, 3.10), _row("small", 300, 300, 3.30), _row("mid-more-total", 450, 350, 3.18),
            _row("mid", 400, 350, 3.20)]
    v = family_verdict(rows)
    assert v["largest"] == "big" and v["smallest"] == "small"
    assert v["gap"] == pytest.approx(0.20)
    # active ranks [4, 1, 2.5, 2.5], loss ranks [1, 4, 2, 3] -> r = -0.9487
    assert v["rho"] == pytest.approx(-9 / math.sqrt(90), abs=1e-9)


def test_summary_line_says_whether_the_table_is_a_family():
    family = [_row(f"s{i}", 100 + i, 100 + i, 4.0 - 0.02 * i) for i in range(8)]
    line = family_line(family)
    assert "-1.00" in line and "+0.1400 nats" in line and "a real family" in line
    flat = [_row(f"s{i}", 100 + i, 100 + i, 4.0 + 0.001 * (i % 3)) for i in range(8)]
    assert "not yet a family" in family_line(flat)
    # a steep but noisy table: the gap alone is not enough
    shuffled = [_row(f"s{i}", 100 + i, 100 + i, loss) for i, loss in enumerate([4.2, 4.0, 4.3, 4.1, 4.25, 3.9, 4.3, 4.1])]
    assert "not yet a family" in family_line(shuffled)


# The quickstart recipe (configs/quickstart_cpu.toml) shortened for CI: same model, vocabulary, batch, LR and
# warmup, half the steps (the cosine decays over them).  Measured at 150 steps: rho -1.00 on seeds 1234 and 7,
# largest ahead of smallest by 0.034 and 0.023 nats; the quickstart's 0.05-nat gap needs its full 300 steps
# (0.111 on seed 1234), so here the ordering is asserted in full and the gap at a level 150 steps reach.
# CI runs one seed (each run is ~1 minute of a 2-core CI host); the README's family claim rests on the
# full 300-step recipe measured on several seeds, reported in the issue notes.
CI_ITERS = 150
CI_MIN_GAP = 0.015


@pytest.mark.slow
@pytest.mark.parametrize("seed", [7])
def test_quickstart_recipe_trains_a_real_family(tmp_path, data_cache, seed):
    run_dir = tmp_path / "run"
    torchrun(2, ["-m", "megatron_ernie.cli", "pretrain", "--config", ROOT / "configs/quickstart_cpu.toml",
                 "--set", f'run.dir="{run_dir}"', "--set", f"run.seed={seed}", "--set", f"train.iters={CI_ITERS}",
                 "--set", "train.eval_interval=0", "--set", "checkpoint.save_interval=0"], timeout=900)
    rows = list(csv.DictReader(open(run_dir / "elastic" / "family.csv")))
    assert len(rows) == 8 and rows[0]["subnet"].startswith("depth=1,") and rows[-1]["subnet"].startswith("depth=4,")
    v = family_verdict(rows)
    table = [(r["subnet"], r["active_params"], r["valid_loss"]) for r in rows]
    assert v["rho"] <= -0.8, (v, table)
    assert v["gap"] >= CI_MIN_GAP, (v, table)
    # the summary prints the same verdict under the table
    from megatron_ernie.observe.summary import summarize

    assert family_line(rows) in summarize(run_dir)
    assert f"{v['rho']:+.2f}" in family_line(rows)
