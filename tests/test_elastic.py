"""Elastic supernet: sub-network rules, sampling, training across layouts,
search under a budget, and extraction to a standalone checkpoint."""

import csv
import re

import pytest

from megatron_ernie import config as C
from megatron_ernie.config.errors import ConfigError
from megatron_ernie.elastic import search
from megatron_ernie.elastic.params import subnet_size
from megatron_ernie.elastic.subnet import (Subnet, choices, kept_layers, layer_ranking, parse_subnet,
                                           sample_step)

from harness import ROOT, run_worker, torchrun

CFG = C.load(ROOT / "configs/tiny_cpu.toml")


# ----------------------------------------------------------------- pure rules
def test_layer_ranking_is_nested_and_spreads_over_stages():
    ranking = layer_ranking(8)
    assert sorted(ranking) == list(range(8)) and ranking[:2] == [0, 7]
    for d in range(1, 8):
        assert kept_layers(d, ranking) < kept_layers(d + 1, ranking)  # nested
    four = kept_layers(4, ranking)
    assert all(four & {2 * s, 2 * s + 1} for s in range(4)), four  # PP4: every stage keeps a layer


@pytest.mark.parametrize("text,field,fix", [
    ("depth=0", "elastic.depth", "between 1"),
    ("depth=9", "elastic.depth", "between 1"),
    ("topk=3,experts=2", "elastic.topk", "experts kept"),
    ("experts=5", "elastic.experts", "between 1"),
    ("ffn=0.3", "elastic.ffn", "whole number"),
    ("ffn=0", "elastic.ffn", "(0, 1]"),
    ("width=2", "--subnet", "depth=3"),
])
def test_bad_subnets_are_clear_errors(text, field, fix):
    with pytest.raises(ConfigError) as err:
        parse_subnet(text, CFG.model, CFG.moe)
    assert err.value.field == field and fix in str(err.value)


def test_bad_elastic_config():
    for overrides, field in ((["elastic.ffn=[1.5]"], "elastic.ffn"), (["elastic.progressive=[\"width\"]"],
                             "elastic.progressive"), (["elastic.distill_weight=2.0"], "elastic.distill_weight")):
        with pytest.raises(ConfigError) as err:
            C.validate(C.load(ROOT / "configs/tiny_cpu.toml", overrides))
        assert err.value.field == field


def test_sampling_is_deterministic_and_sandwiched():
    axes = choices(CFG.elastic, CFG.model, CFG.moe)
    a = sample_step(CFG.elastic, axes, iteration=5, seed=1)
    assert a == sample_step(CFG.elastic, axes, iteration=5, seed=1)
    assert [r for r, _ in a] == ["largest", "smallest", "random"]
    assert a[0][1] == Subnet(4, 1.0, 4, 2) and a[1][1] == Subnet(2, 0.5, 2, 1)
    draws = {sample_step(CFG.elastic, axes, i, 1)[2][1] for i in range(40)}
    assert len(draws) > 5 and all(s.topk <= s.experts for s in draws)


def test_progressive_shrinking_opens_axes_in_order():
    el = C.load(ROOT / "configs/tiny_cpu.toml", ["elastic.depth=[2, 3, 4]", "elastic.progressive=[\"depth\", \"ffn\"]",
                                                  "elastic.progressive_interval=10"]).elastic
    axes = choices(el, CFG.model, CFG.moe)
    early = sample_step(el, axes, 3, 0)[1][1]
    later = sample_step(el, axes, 13, 0)[1][1]
    assert (early.depth, early.ffn, early.experts) == (2, 1.0, 4)
    assert (later.depth, later.ffn, later.experts) == (2, 0.5, 4)


def test_param_counts_shrink_along_each_axis():
    full = subnet_size(CFG.model, CFG.moe, 2048, Subnet(4, 1.0, 4, 2))
    for smaller in (Subnet(3, 1.0, 4, 2), Subnet(4, 0.5, 4, 2), Subnet(4, 1.0, 2, 2), Subnet(4, 1.0, 4, 1)):
        size = subnet_size(CFG.model, CFG.moe, 2048, smaller)
        assert size.active < full.active and size.total <= full.total
    # top-k changes active, not total, parameters
    assert subnet_size(CFG.model, CFG.moe, 2048, Subnet(4, 1.0, 4, 1)).total == full.total


def test_budget_selection():
    rows = [{"subnet": "a", "total_params": 10, "active_params": 5, "flops_per_token": 10, "valid_loss": 3.0},
            {"subnet": "b", "total_params": 20, "active_params": 8, "flops_per_token": 16, "valid_loss": 2.0},
            {"subnet": "c", "total_params": 30, "active_params": 9, "flops_per_token": 18, "valid_loss": 2.5}]
    assert search.best_under_budget(rows, "active", 9)["subnet"] == "b"
    assert search.best_under_budget(rows, "total", 15)["subnet"] == "a"
    assert [r["pareto"] for r in search.mark_pareto(rows)] == [True, True, False]
    with pytest.raises(ConfigError, match="no sub-network fits; the smallest has 5"):
        search.best_under_budget(rows, "active", 4)


# --------------------------------------------------------- multi-process runs
LAYOUTS = {
    "dp4": [], "tp2": ["parallel.tensor=2", "parallel.sequence_parallel=true"], "pp2": ["parallel.pipeline=2"],
    "ep2": ["parallel.expert=2"], "dp4_distopt": ["parallel.distributed_optimizer=true"],
    "tp2_ep2": ["parallel.tensor=2", "parallel.sequence_parallel=true", "parallel.expert=2"],
}
EXTRACT = ["depth=2,ffn=0.5,experts=2,topk=1", "depth=3,ffn=1,experts=4,topk=1"]


@pytest.fixture(scope="module")
def elastic_runs(tmp_path_factory, data_cache):
    tmp = tmp_path_factory.mktemp("elastic")
    return tmp, run_worker("elastic", tmp, {"iters": 4, "layouts": LAYOUTS, "save_from": "dp4"}, nproc=4)


@pytest.mark.slow
@pytest.mark.parametrize("layout", [k for k in LAYOUTS if k != "dp4"])
def test_elastic_training_is_layout_invariant(elastic_runs, layout):
    _, r = elastic_runs
    ref, got = r["dp4"], r[layout]
    assert got["losses"] == pytest.approx(ref["losses"], rel=1e-5)
    assert got["subnets"].keys() == ref["subnets"].keys()
    for name, loss in ref["subnets"].items():
        assert got["subnets"][name] == pytest.approx(loss, rel=1e-5), name


@pytest.mark.slow
def test_subnets_differ_and_training_moves(elastic_runs):
    _, r = elastic_runs
    losses = list(r["dp4"]["subnets"].values())
    assert len(set(round(v, 6) for v in losses)) == len(losses)  # each axis changes the function
    assert r["dp4"]["losses"][-1] < r["dp4"]["losses"][0]


@pytest.fixture(scope="module")
def extracted(elastic_runs):
    tmp, _ = elastic_runs
    out = tmp / "extract"
    out.mkdir()
    return run_worker("extract", out, {"run_dir": str(tmp / "dp4"), "subnets": EXTRACT}, nproc=1)


@pytest.mark.slow
@pytest.mark.parametrize("text", EXTRACT)
def test_extracted_model_equals_supernet_subnet(extracted, text):
    r = extracted[text]
    assert r["extracted"] == pytest.approx(r["supernet"], abs=1e-6)
    assert r["params"] == r["predicted"] == r["counted"]


@pytest.mark.slow
def test_continuation_reads_tokens_the_supernet_did_not(extracted):
    c = extracted["continuation"]
    assert c["supernet_consumed"] > 0 and c["record"]["consumed_samples"] == c["supernet_consumed"]
    assert (c["start"], c["iteration"]) == (c["supernet_consumed"], 0)
    assert c["supernet_first_batch_seen"] == c["first_batch_size"] > 0  # the comparison does see overlap
    assert c["first_batch_seen"] == 0  # ... and the continuation's first batch has none
    assert c["opt_out_start"] == 0 and c["sft_start"] == 0  # load_data_position=false, SFT: from sample 0


@pytest.mark.slow
def test_continuation_lr_stays_at_or_below_the_supernets_final_lr(extracted):
    c = extracted["continuation"]
    assert c["record"]["final_lr"] == pytest.approx(c["supernet_final_lr"], rel=1e-12)
    assert c["supernet_final_lr"] < c["supernet_peak_lr"]  # a jump to the config's peak would show
    assert len(c["lrs"]) == 20 and c["lrs"][0] <= c["supernet_final_lr"]
    assert max(c["lrs"]) <= c["supernet_final_lr"] * (1 + 1e-9)


@pytest.mark.slow
def test_extracted_adam_moments_are_the_supernets_sliced_like_the_weights(extracted):
    m = extracted["moments"]
    assert m["compared"] == 2 * m["n_params"] > 0
    assert m["nonzero"] == m["n_params"]  # loaded, not fresh zeros
    assert m["max_diff"] == 0.0
    assert m["steps"] == [m["supernet_step"]] and m["supernet_step"] > 0


@pytest.mark.slow
def test_first_continued_step_equals_the_supernets_step_of_that_subnet(extracted):
    m = extracted["moments"]
    assert m["lrs"][1] == pytest.approx(m["lrs"][0], rel=1e-12)  # peak fraction 1, no warmup: the same LR
    assert m["losses"][1] == pytest.approx(m["losses"][0], abs=1e-5)
    assert m["grad_norms"][1] == pytest.approx(m["grad_norms"][0], rel=1e-4)
    assert m["step_max_update"] > 1e-5  # the step moves the weights ...
    # ... as the supernet moves its slice, up to float32 rounding (masked vs sliced sums) that Adam amplifies
    # where sqrt(v) is tiny: measured 1% of the largest update; fresh moments would differ by ~lr (100%)
    assert m["step_max_diff"] <= 0.05 * m["step_max_update"]


@pytest.mark.slow
def test_extracted_subnet_exports_to_hugging_face(extracted, tmp_path):
    import torch
    import transformers

    from megatron_ernie.convert.export import export_hf

    r = extracted[EXTRACT[0]]
    export_hf(r["checkpoint"], tmp_path / "hf")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", torch_dtype=torch.float32)
    with torch.no_grad():
        theirs = model(torch.tensor(r["tokens"])).logits
    ours = torch.tensor(r["logits"])
    assert theirs.shape == ours.shape
    assert (theirs - ours).abs().max().item() <= 1e-5


@pytest.mark.slow
def test_extracted_checkpoint_continues_training_at_another_layout(extracted, tmp_path):
    r = extracted[EXTRACT[0]]
    proc = torchrun(2, ["-m", "megatron_ernie.cli", "pretrain", "--config", r["config"],
                        "--set", f"checkpoint.load=\"{r['checkpoint']}\"", "--set", "parallel.expert=2",
                        "--set", f"run.dir=\"{tmp_path / 'cont'}\"", "--set", "train.iters=3",
                        "--set", "train.eval_interval=0", "--set", "log.level=\"INFO\""])
    assert "initialised weights from" in proc.stdout
    assert f"data from sample {extracted['continuation']['supernet_consumed']};" in proc.stdout
    losses = [float(x) for x in re.findall(r"\| loss ([0-9.]+) \|", proc.stdout)]
    assert len(losses) == 3 and losses[0] < 7.0  # a fresh init starts near ln(2048) = 7.6


@pytest.mark.slow
def test_eval_cli_reports_the_same_subnet_loss(elastic_runs):
    import os
    import subprocess
    import sys

    tmp, r = elastic_runs
    text = "depth=2,ffn=0.5,experts=2,topk=1"
    proc = subprocess.run([sys.executable, "-m", "megatron_ernie.cli", "eval", "--run-dir", str(tmp / "dp4"),
                           "--subnet", text], capture_output=True, text=True, cwd=ROOT, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "MASTER_PORT": "29612"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = proc.stdout.strip().splitlines()[-1].split()
    assert row[0] == text
    assert float(row[4]) == pytest.approx(r["dp4"]["subnets"][text], abs=5e-5)  # the table prints 4 decimals


@pytest.mark.slow
def test_search_honours_the_budget(elastic_runs, tmp_path):
    tmp, _ = elastic_runs
    import subprocess
    import sys

    budget = 150_000
    proc = subprocess.run([sys.executable, "-m", "megatron_ernie.cli", "search", "--run-dir", str(tmp / "dp4"),
                           "--budget-active", str(budget), "--out", str(tmp_path)],
                          capture_output=True, text=True, cwd=ROOT, timeout=600,
                          env={**__import__("os").environ, "PYTHONPATH": str(ROOT), "MASTER_PORT": "29611"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = list(csv.DictReader(open(tmp_path / "search.csv")))
    assert len(rows) == 24  # depth {2,3,4} x ffn {0.5,1} x experts {2,4} x topk {1,2}
    fitting = [r for r in rows if int(r["active_params"]) <= budget]
    assert 0 < len(fitting) < len(rows)
    best = min(fitting, key=lambda r: float(r["valid_loss"]))
    assert f"best under active budget {budget:,}: {best['subnet']}" in proc.stdout
    assert (tmp_path / "search_pareto.png").stat().st_size > 10_000


@pytest.mark.slow
def test_importance_reordering_keeps_the_full_model_and_its_training(elastic_runs):
    tmp, _ = elastic_runs
    out = tmp / "reorder"
    out.mkdir()
    r = run_worker("reorder", out, {"run_dir": str(tmp / "dp4")}, nproc=1)
    plain, moved = r["plain"], r["reordered"]
    assert moved["eval_after"] == pytest.approx(moved["eval_before"], abs=1e-6)
    assert any(perm != sorted(perm) for perm in moved["moved"].values())  # something actually moved
    # weights and Adam moments permuted together: the same training trajectory
    assert moved["steps"] == pytest.approx(plain["steps"], rel=1e-6)
    assert moved["eval_trained"] == pytest.approx(plain["eval_trained"], rel=1e-6)
