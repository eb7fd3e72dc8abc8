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


# ------------------------------------------------ the recipe (issue 13, item 3)
TARGETS = ["depth=3,ffn=0.5,experts=2,topk=1", "experts=2"]


def _elastic(*overrides):
    cfg = C.load(ROOT / "configs/tiny_cpu.toml", list(overrides))
    C.validate(cfg)
    return cfg


def _sandwich(cfg, iteration, seed=1):
    from megatron_ernie.elastic.subnet import target_subnets

    axes = choices(cfg.elastic, cfg.model, cfg.moe)
    return sample_step(cfg.elastic, axes, iteration, seed, target_subnets(cfg.elastic, cfg.model, cfg.moe))


def test_targets_are_trained_every_step_after_largest_and_smallest():
    cfg = _elastic(f"elastic.targets={TARGETS!r}".replace("'", '"'), "elastic.sandwich_random=2")
    want = [Subnet(3, 0.5, 2, 1), Subnet(4, 1.0, 2, 2)]
    for it in range(12):
        members = _sandwich(cfg, it)
        assert [r for r, _ in members] == ["largest", "smallest", "target", "target", "random", "random"]
        assert [s for _, s in members[:4]] == [Subnet(4, 1.0, 4, 2), Subnet(2, 0.5, 2, 1), *want]
    # the random members are drawn exactly as without targets (same seed, same stream)
    plain = _elastic("elastic.sandwich_random=2")
    assert [_sandwich(cfg, i)[4:] for i in range(12)] == [_sandwich(plain, i)[2:] for i in range(12)]


def test_sandwich_without_smallest_is_largest_targets_random():
    cfg = _elastic('elastic.targets=["depth=2,ffn=0.5,experts=2,topk=1", "depth=3"]', "elastic.sandwich_smallest=false")
    for it in range(5):
        members = _sandwich(cfg, it)
        assert [r for r, _ in members] == ["largest", "target", "target", "random"]
        assert [s for _, s in members[1:3]] == [Subnet(2, 0.5, 2, 1), Subnet(3, 1.0, 4, 2)]
    # a target equal to the smallest (or largest) is not trained twice
    twice = _elastic('elastic.targets=["depth=2,ffn=0.5,experts=2,topk=1", "depth=4"]')
    assert [r for r, _ in _sandwich(twice, 0)] == ["largest", "smallest", "random"]


def test_open_after_trains_only_the_largest_then_opens_progressive_phases_from_it():
    cfg = _elastic('elastic.targets=["depth=3,ffn=0.5,experts=2,topk=1", "ffn=0.5"]', "elastic.open_after=5",
                   'elastic.progressive=["depth", "ffn"]', "elastic.progressive_interval=10")
    big = Subnet(4, 1.0, 4, 2)
    for it in range(5):
        assert _sandwich(cfg, it) == [("largest", big)]
    # phase 0 (iterations 5..14): depth only; the first target keeps its depth, the rest is the largest's;
    # the second target (ffn only) is then the largest itself and is not trained twice
    for it in (5, 14):
        members = _sandwich(cfg, it)
        assert [r for r, _ in members] == ["largest", "smallest", "target", "random"]
        assert members[1][1] == Subnet(2, 1.0, 4, 2) and members[2][1] == Subnet(3, 1.0, 4, 2)
        assert all(s.ffn == 1.0 and s.experts == 4 for _, s in members)
    # phase 1 (from 15 = open_after + interval): ffn opens
    members = _sandwich(cfg, 15)
    assert [s for r, s in members if r != "random"] == [big, Subnet(2, 0.5, 4, 2), Subnet(3, 0.5, 4, 2),
                                                       Subnet(4, 0.5, 4, 2)]


def test_open_after_without_progressive_opens_every_axis_at_once():
    cfg = _elastic('elastic.targets=["depth=3,ffn=0.5,experts=2,topk=1"]', "elastic.open_after=3",
                   "elastic.sandwich_random=0")
    assert [len(_sandwich(cfg, it)) for it in range(5)] == [1, 1, 1, 3, 3]
    assert _sandwich(cfg, 3)[1:] == [("smallest", Subnet(2, 0.5, 2, 1)), ("target", Subnet(3, 0.5, 2, 1))]


def test_distillation_weight_ramps_linearly_then_stays():
    from megatron_ernie.elastic.objective import distill_weight_at

    ramp = _elastic("elastic.distill_ramp_iters=4", "elastic.distill_weight=0.8").elastic
    assert [distill_weight_at(ramp, i) for i in range(7)] == pytest.approx([0, 0.2, 0.4, 0.6, 0.8, 0.8, 0.8])
    flat = _elastic("elastic.distill_weight=0.3").elastic
    assert [distill_weight_at(flat, i) for i in (0, 1, 100)] == [0.3, 0.3, 0.3]


@pytest.mark.parametrize("overrides,field,words", [
    (['elastic.targets=["depth=3,width=0.5"]'], "elastic.targets", ["depth=3,width=0.5", "depth=4,ffn=0.5"]),
    (['elastic.targets=["depth=three"]'], "elastic.targets", ["depth needs a number"]),
    (['elastic.targets=[""]'], "elastic.targets", ["empty target"]),
    (['elastic.targets=["depth=6"]'], "elastic.targets", ["depth=6", "model.num_layers=4"]),
    (['elastic.targets=["experts=8,topk=1"]'], "elastic.targets", ["moe.num_experts=4"]),
    (['elastic.targets=["ffn=0.3"]'], "elastic.targets", ["whole number"]),
    (['elastic.targets=["experts=1"]'], "elastic.targets", ["top-k", "experts kept (1)"]),
    (["elastic.distill_ramp_iters=-1"], "elastic.distill_ramp_iters", [">= 0"]),
    (["elastic.open_after=-2"], "elastic.open_after", [">= 0"]),
    (["elastic.sandwich_smallest=false", "elastic.sandwich_random=0"], "elastic.sandwich_smallest",
     ["only the largest"]),
])
def test_bad_recipe_options_are_clear_errors(overrides, field, words):
    with pytest.raises(ConfigError) as err:
        _elastic(*overrides)
    assert err.value.field == field
    assert all(w in str(err.value) for w in words), str(err.value)


def test_target_depth_must_keep_a_layer_on_every_pipeline_stage():
    cfg = C.load(ROOT / "configs/tiny_cpu.toml", ['elastic.targets=["depth=1"]', "parallel.pipeline=2",
                                                   "parallel.expert=1"])
    with pytest.raises(ConfigError) as err:
        C.validate(cfg, world_size=2)
    assert err.value.field == "elastic.depth" and err.value.value == 1


@pytest.fixture(scope="module")
def cpu_compat_applied():
    from megatron_ernie.runtime import cpu_compat

    cpu_compat.apply()


@pytest.fixture(scope="module")
def megatron_one_rank(cpu_compat_applied, megatron_single_rank):
    """The CPU compat layer first, then the shared one-rank megatron world (tests/conftest.py)."""
    return megatron_single_rank


def _gate_logits():
    """4 tokens over a 5-word vocabulary, labels 0..3: the teacher is sure and right on tokens 0 and 2,
    sure and wrong on tokens 1 and 3; the student is lukewarm everywhere."""
    import torch

    labels = torch.tensor([[0, 1, 2, 3]])
    teacher = torch.full((1, 4, 5), -2.0)
    student = torch.zeros(1, 4, 5)
    for t, lab in enumerate(labels[0].tolist()):
        teacher[0, t, lab if t % 2 == 0 else 4] = 4.0
        student[0, t, lab] = 1.0
    return labels, teacher, student


@pytest.mark.parametrize("gate", [True, False])
def test_distillation_gate_mixes_ce_and_kl_per_token(megatron_one_rank, gate):
    import torch
    import torch.nn.functional as F

    from megatron_ernie.elastic.train import Distill, TeacherCache, _loss

    labels, teacher, student = _gate_logits()
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])  # token 3 is padding
    cache, a = TeacherCache(users=1, logits={}), 0.4
    distill = Distill(a, gate)
    batch = {"labels": labels, "loss_mask": mask, "mb": 0}
    _loss({**batch, "role": "largest"}, cache, distill, None, teacher)
    student = student.requires_grad_()
    total, count, logged = _loss({**batch, "role": "target"}, cache, distill, None, student)
    # by hand
    ce = -F.log_softmax(student, -1).gather(-1, labels[..., None])[..., 0]
    t_ce = -F.log_softmax(teacher, -1).gather(-1, labels[..., None])[..., 0]
    p_t = F.softmax(teacher, -1)
    kl = (p_t * (F.log_softmax(teacher, -1) - F.log_softmax(student, -1))).sum(-1)
    open_ = (t_ce < ce) if gate else torch.ones(1, 4, dtype=torch.bool)
    assert open_.tolist() == ([[True, False, True, False]] if gate else [[True] * 4])
    per_token = torch.where(open_, (1 - a) * ce + a * kl, ce)
    assert total.item() == pytest.approx((per_token * mask).sum().item(), rel=1e-6)
    assert int(count) == 3 and logged["loss/target"].tolist() == pytest.approx([(ce * mask).sum().item(), 3])
    if gate:  # open on token 0 and 2 of the 3 real tokens
        assert logged["distill_gate_open"].tolist() == [2.0, 3.0]
        # a closed token learns plain CE: its gradient is softmax - onehot
        total.backward()
        want = F.softmax(student.detach()[0, 1], -1) - F.one_hot(labels[0, 1], 5)
        assert torch.allclose(student.grad[0, 1], want, atol=1e-6)
    else:
        assert "distill_gate_open" not in logged
    assert cache.logits == {}  # freed after its last user


def _router(num_experts, kind):
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_ernie.elastic.modules import ElasticTopKRouter

    cfg = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=1, num_moe_experts=num_experts,
                            moe_router_topk=1, moe_aux_loss_coeff=0.1, moe_router_load_balancing_type=kind,
                            moe_router_pre_softmax=True, use_cpu_initialization=True, add_bias_linear=False)
    router = ElasticTopKRouter(cfg, ProcessGroupCollection.use_mpu_process_groups())
    router.set_layer_number(1)
    return router.train()


def _aux_loss_and_grad(router, x):
    """The logged load-balancing loss and the router weight's gradient from the aux loss alone."""
    from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

    tracker = get_moe_layer_wise_logging_tracker()
    tracker.clear()
    probs, _ = router(x)
    (probs.sum() * 0).backward()  # the main loss contributes nothing: the gradient is the aux loss's
    (logged,) = [v["values"][0].item() for v in tracker.values()]
    tracker.clear()
    return logged, router.weight.grad


@pytest.mark.parametrize("kind", ["aux_loss", "seq_aux_loss", "global_aux_loss"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_masked_router_load_balancing_loss_is_the_kept_experts_router(megatron_one_rank, kind, seed):
    import torch

    torch.manual_seed(seed)
    masked, plain = _router(4, kind), _router(2, kind)
    with torch.no_grad():
        plain.weight.copy_(masked.weight[:2])
    masked.active_experts = 2
    x = torch.randn(6, 3, 8)
    loss_m, grad_m = _aux_loss_and_grad(masked, x)
    loss_p, grad_p = _aux_loss_and_grad(plain, x)
    assert loss_m == pytest.approx(loss_p, rel=1e-6) and loss_p > 0.5  # megatron's would be 2x (E/E')
    assert grad_p.abs().max() > 0
    assert torch.allclose(grad_m[:2], grad_p, rtol=1e-5, atol=1e-9)
    assert grad_m[2:].abs().max() == 0  # masked experts learn nothing
    masked.active_experts = None  # all experts: the coefficient is megatron's own
    assert masked.get_aux_loss_coeff(kind) == 0.1


def _fake_run(tmp_path, iteration, overrides):
    """A run directory (config.toml + a checkpoint's meta.json) as `ernie reorder` reads it."""
    import json

    cfg = C.load(ROOT / "configs/tiny_cpu.toml", [f'run.dir="{tmp_path}"', *overrides])
    C.save_resolved(cfg, tmp_path)
    latest = tmp_path / "checkpoints" / f"iter_{iteration:07d}"
    latest.mkdir(parents=True)
    (latest / "meta.json").write_text(json.dumps({"iteration": iteration, "consumed_samples": 0,
                                                  "consumed_tokens": 0, "layout": {}, "extra": {}}))
    return cfg, latest


class _Opened(Exception):
    pass


@pytest.mark.parametrize("iteration,overrides,layers,refused", [
    (10, [], False, ["experts", "ffn"]),  # axes open from step 0
    (10, ["elastic.open_after=10"], True, None),  # reordered at open_after: nothing trained open yet
    (11, ["elastic.open_after=10"], False, ["experts", "ffn"]),
    (11, ["elastic.open_after=10"], True, ["depth", "experts", "ffn"]),
    (11, ["elastic.open_after=10", "elastic.experts=[]", "elastic.ffn=[]"], False, None),  # not elastic there
    (11, ["elastic.open_after=10", "elastic.experts=[]", "elastic.ffn=[]"], True, ["depth"]),
    (11, ["elastic.open_after=10", "elastic.experts=[]", "elastic.ffn=[]", 'elastic.targets=["experts=2"]'],
     False, ["experts"]),  # a target makes the axis elastic
    # progressive from open_after: depth opens at 10, ffn at 20, experts at 30
    (20, ["elastic.open_after=10", 'elastic.progressive=["depth", "ffn", "experts"]',
          "elastic.progressive_interval=10"], False, None),
    (21, ["elastic.open_after=10", 'elastic.progressive=["depth", "ffn", "experts"]',
          "elastic.progressive_interval=10"], False, ["ffn"]),
])
def test_reorder_refuses_runs_whose_axes_are_open(tmp_path, monkeypatch, iteration, overrides, layers, refused):
    from megatron_ernie.elastic import reorder, session
    from megatron_ernie.train import loop

    cfg, latest = _fake_run(tmp_path, iteration, overrides)
    monkeypatch.setattr(session, "supernet_config", lambda run_dir, extra=(): (cfg, latest))
    monkeypatch.setattr(loop, "setup", lambda *a, **k: (_ for _ in ()).throw(_Opened()))
    argv = ["--run-dir", str(tmp_path)] + (["--layers"] if layers else [])
    if refused is None:
        with pytest.raises(_Opened):  # past the check: it goes on to open the supernet
            reorder.main(argv)
        return
    with pytest.raises(ConfigError) as err:
        reorder.main(argv)
    text = str(err.value)
    assert err.value.field == "--run-dir" and f"at iteration {iteration} " in text
    assert f"axes {refused} open" in text and "elastic.open_after = N" in text and "iteration <= N" in text


# --------------------------------------------------------- multi-process runs
LAYOUTS = {
    "dp4": [], "tp2": ["parallel.tensor=2", "parallel.sequence_parallel=true"], "pp2": ["parallel.pipeline=2"],
    "ep2": ["parallel.expert=2"], "dp4_distopt": ["parallel.distributed_optimizer=true"],
    "tp2_ep2": ["parallel.tensor=2", "parallel.sequence_parallel=true", "parallel.expert=2"],
}
EXTRACT = ["depth=2,ffn=0.5,experts=2,topk=1", "depth=3,ffn=1,experts=4,topk=1"]


# the recipe at two layouts in the same launch: open_after=1 (step 0 trains the largest alone), one
# declared target, no smallest, ramp over 2 steps, per-token gate
RECIPE = {"options": ['elastic.targets=["depth=3,ffn=0.5,experts=2,topk=1"]', "elastic.sandwich_smallest=false",
                      "elastic.distill_ramp_iters=2", "elastic.distill_gate=true", "elastic.open_after=1"],
          "layouts": {"recipe_dp4": [], "recipe_tp2_pp2": ["parallel.tensor=2", "parallel.sequence_parallel=true",
                                                           "parallel.pipeline=2"]},
          "probe": ["depth=3,ffn=0.5,experts=2,topk=1"]}


@pytest.fixture(scope="module")
def elastic_runs(tmp_path_factory, data_cache):
    tmp = tmp_path_factory.mktemp("elastic")
    return tmp, run_worker("elastic", tmp, {"iters": 4, "layouts": LAYOUTS, "save_from": "dp4", "recipe": RECIPE},
                           nproc=4)


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


@pytest.mark.slow
def test_recipe_training_is_layout_invariant(elastic_runs):
    _, r = elastic_runs
    ref, got = r["recipe_dp4"], r["recipe_tp2_pp2"]
    assert got["losses"] == pytest.approx(ref["losses"], rel=1e-5)
    assert [s.keys() for s in got["scalars"]] == [s.keys() for s in ref["scalars"]]
    for mine, theirs in zip(got["scalars"], ref["scalars"]):
        for key, value in theirs.items():
            assert mine[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key  # the KL is ~1e-3: abs
    for name, loss in ref["subnets"].items():
        assert got["subnets"][name] == pytest.approx(loss, rel=1e-5), name


@pytest.mark.slow
def test_recipe_schedule_in_a_run(elastic_runs):
    _, r = elastic_runs
    steps = r["recipe_dp4"]["scalars"]
    # step 0 (before open_after=1): the largest alone, its CE is the whole objective
    assert steps[0]["elastic/members"] == 1 and "elastic/loss_target" not in steps[0]
    assert steps[0]["elastic/objective"] == pytest.approx(steps[0]["elastic/loss_largest"], rel=1e-6)
    # then: largest, the target, one random member (no smallest)
    assert [s["elastic/members"] for s in steps[1:]] == [3, 3, 3]
    assert all("elastic/loss_target" in s and "elastic/loss_smallest" not in s for s in steps[1:])
    assert [s["elastic/distill_weight"] for s in steps] == pytest.approx([0.0, 0.25, 0.5, 0.5])
    shares = [s["elastic/distill_gate_open"] for s in steps[1:]]
    assert all(0 < x < 1 for x in shares), shares  # open on some tokens, closed on others
    assert r["recipe_dp4"]["losses"][-1] < r["recipe_dp4"]["losses"][0]


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
    # the load-balancing loss is on, and the sub-network keeps fewer experts than the supernet has
    assert m["aux_loss_coeffs"][0] == m["aux_loss_coeffs"][1] > 0 and m["experts"][1] < m["experts"][0]
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
