"""The planner against layouts built and trained for real (one 4-process launch,
tests/dist/plan_worker.py):

* static memory is exact: predicted bytes of parameters, main-grad buffers and
  optimizer state equal what every rank's model and optimizer hold;
* communication is exact, per group and collective, for the terms the planner
  models exactly: data-parallel gradient reduction and parameter all-gather
  (dense and expert), pipeline p2p, the expert all-to-all (summed over ranks:
  how many rows a rank receives depends on the routing, the total does not)
  and tensor / expert-tensor parallelism, except EP x expert-TP, whose gathers
  depend on the routing (benchmarks/plan_accuracy.py reports its error).
  Scalars and routing metadata (<= 1 KiB per call: losses, token counts,
  norms) are measured but not predicted."""

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
    "dense_tp2_sp": ["moe.num_experts=0", "parallel.tensor=2", "parallel.sequence_parallel=true"],
    "dense_tp2_pp2_nosp": ["moe.num_experts=0", "parallel.tensor=2", "parallel.pipeline=2"],
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


EXACT_GROUPS = {"dp", "expert_dp", "pp", "ep", "embd"}


def uneven_expert_gather(par) -> bool:
    """EP > 1 with expert-TP > 1: each rank gathers as many rows as the routing sent it, and the
    CPU shim for uneven all-gathers (runtime/cpu_compat.py) pads them to the largest."""
    return par.expert > 1 and par.expert_tensor_size > 1


def measured_key(name: str, measured: dict) -> str | None:
    if name in measured:
        return name
    return next((k for k in measured if name in k.split("+")), None)


def traffic_by_key(results, layout):
    """(predicted, measured) {key: {kind: bytes}} summed over ranks, keys being the measured group names."""
    from megatron_ernie.plan.comm import step_traffic

    cfg = C.load(results[layout]["config"])
    pred, meas, exact = {}, {}, {}
    for rank in results[layout]["ranks"]:
        for key, kinds in rank["comm"].items():
            for kind, n in kinds.items():
                meas.setdefault(key, {}).setdefault(kind, 0)
                meas[key][kind] += n
        traffic = step_traffic(cfg.model, cfg.moe, cfg.parallel, cfg.train, rank["vocab_size"], 4, rank["pp_rank"],
                               1.0, cfg.fp8)
        for group, kinds in traffic.groups.items():
            key = measured_key(group, rank["comm"]) or group
            ok = group in EXACT_GROUPS or (group in ("tp", "etp") and not uneven_expert_gather(cfg.parallel))
            exact[key] = exact.get(key, True) and ok
            for kind, n in kinds.items():
                pred.setdefault(key, {}).setdefault(kind, 0)
                pred[key][kind] += n
    return pred, meas, exact


COMM_LAYOUTS = [k for k in CASE["layouts"] if not k.startswith("elastic")]  # the sandwich runs 3 forwards


@pytest.mark.parametrize("layout", COMM_LAYOUTS)
def test_communication_is_exact_per_group(results, layout):
    pred, meas, exact = traffic_by_key(results, layout)
    checked = 0
    for key, kinds in pred.items():
        if exact[key]:
            assert meas.get(key) == kinds, (layout, key, meas.get(key), kinds)
            checked += 1
    assert checked  # every layout has data-parallel traffic at least


# the elastic sandwich's forwards are sub-networks; FP8 emulation saves quantised GEMM inputs the
# estimate does not model yet (benchmarks/plan_accuracy.py reports both)
ACTIVATION_LAYOUTS = [k for k in CASE["layouts"] if not k.startswith(("elastic", "fp8"))]


def predicted_chunk_activations(cfg, vocab_size: int, pp_rank: int, chunk: int) -> float:
    from megatron_ernie.plan import activations as A
    from megatron_ernie.plan.inventory import chunk_layers, padded_vocab

    m, moe, par = cfg.model, cfg.moe, cfg.parallel
    sh = A.shape_of(m, moe, par, cfg.train)
    layers = chunk_layers(m.num_layers, par.pipeline, par.virtual_pipeline, pp_rank, chunk)
    total = sum(A.layer_bytes(i, m, moe, par, sh, "none", 1.0, "unfused") for i in layers)
    if pp_rank == par.pipeline - 1 and chunk == par.virtual_pipeline - 1:
        total += A.head_bytes(m, sh, padded_vocab(vocab_size, par.tensor))
    return total


@pytest.mark.parametrize("layout", ACTIVATION_LAYOUTS)
def test_saved_activations_per_micro_batch_within_10_percent(results, layout):
    cfg = C.load(results[layout]["config"])
    for rank in results[layout]["ranks"]:
        assert rank["saved_per_forward"], layout
        for chunk, measured in rank["saved_per_forward"]:
            predicted = predicted_chunk_activations(cfg, rank["vocab_size"], rank["pp_rank"], chunk)
            assert abs(predicted - measured) <= 0.10 * measured, (layout, rank["pp_rank"], chunk, predicted, measured)
