"""The planner's static memory is exact: predicted bytes of parameters, main-grad
buffers and optimizer state per rank equal what the built model and optimizer
hold, for every layout below (one 4-process launch, tests/dist/plan_worker.py)."""

import pytest

import json

from harness import ROOT, torchrun
from megatron_ernie import config as C
from megatron_ernie.plan.memory import RankPosition, static_memory

pytestmark = pytest.mark.slow

ELASTIC = ["elastic.enabled=true", "elastic.depth=[2, 4]", "elastic.ffn=[0.5, 1.0]", "elastic.experts=[2, 4]",
           "elastic.topk=[1, 2]", "elastic.sandwich_random=1", "elastic.distill_weight=0.5",
           "elastic.eval_subnets=0", "moe.first_dense_layers=1"]
DISTOPT = "parallel.distributed_optimizer=true"
BF16 = "model.dtype=\"bf16\""
FP8 = ["fp8.recipe=\"delayed\"", "fp8.backend=\"emulate\"", "fp8.amax_history_len=8"]
LAYOUTS = {
    "dp4": [],
    "dp4_distopt": [DISTOPT],
    "tp2_sp": ["parallel.tensor=2", "parallel.sequence_parallel=true"],
    "pp2": ["parallel.pipeline=2"],
    "pp2_vpp2_distopt": ["parallel.pipeline=2", "parallel.virtual_pipeline=2", DISTOPT],
    "ep2": ["parallel.expert=2"],
    "ep4_distopt_overlap": ["parallel.expert=4", DISTOPT, "parallel.overlap_grad_reduce=true"],
    "tp2_ep2_etp2_bf16": ["parallel.tensor=2", "parallel.sequence_parallel=true", "parallel.expert=2", BF16],
    "tp2_etp1_distopt": ["parallel.tensor=2", "parallel.sequence_parallel=true", "parallel.expert_tensor=1",
                         DISTOPT],
    "bf16_dp4_distopt": [BF16, DISTOPT],
    "bf16_pp2": [BF16, "parallel.pipeline=2"],
    "fp8_ep2_distopt": FP8 + ["parallel.expert=2", DISTOPT],
    "tied_pp2_distopt_shared": ["model.untie_embeddings_and_output_weights=false", "parallel.pipeline=2",
                                DISTOPT, "moe.shared_expert_ffn_hidden_size=32",
                                "model.normalization=\"LayerNorm\"", "moe.first_dense_layers=1"],
    "elastic_ep2": ELASTIC + ["parallel.expert=2"],
}
CASE = {"layouts": {name: {"overrides": o} for name, o in LAYOUTS.items()}}
CASE["layouts"]["extracted_pp2_distopt"] = {"overrides": ELASTIC + ["parallel.pipeline=2", DISTOPT],
                                            "extract": "depth=2,ffn=0.5,experts=2,topk=1"}


@pytest.fixture(scope="module")
def results(tmp_path_factory, data_cache):
    tmp = tmp_path_factory.mktemp("plan")
    torchrun(4, [ROOT / "tests" / "dist" / "plan_worker.py", "layouts", tmp / "result.json", json.dumps(CASE)],
             timeout=1500)
    return json.loads((tmp / "result.json").read_text())


def predicted(cfg, rank: dict):
    where = RankPosition(rank["pp_rank"], rank["dp_rank"], rank["expert_dp_rank"])
    return static_memory(cfg.model, cfg.moe, cfg.parallel, rank["vocab_size"], 4, where, cfg.fp8)


@pytest.mark.parametrize("layout", list(CASE["layouts"]))
@pytest.mark.parametrize("term", ["params", "grads", "optimizer"])
def test_static_memory_is_exact(results, layout, term):
    cfg = C.load(results[layout]["config"])
    for i, rank in enumerate(results[layout]["ranks"]):
        assert getattr(predicted(cfg, rank), term) == rank[term], (layout, i, rank)


def test_layouts_differ(results):
    # guards against a vacuous comparison: the layouts really change what a rank holds
    totals = {name: results[name]["ranks"][0]["optimizer"] for name in results}
    assert len(set(totals.values())) >= 8, totals
