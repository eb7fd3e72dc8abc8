"""Stop and resume is exact: 2N steps straight == N steps, stop, resume, N steps."""

import pytest

from harness import run_worker

pytestmark = pytest.mark.slow

VARIANTS = {
    "ddp": [],
    # megatron-core's distributed optimizer with torch AdamW: resume must restore
    # each parameter's own Adam step, not one shared step tensor.
    "distopt": ["parallel.distributed_optimizer=true"],
    "ep2_distopt": ["parallel.expert=2", "parallel.distributed_optimizer=true"],
    # whole experts on both TP ranks: their optimizer state is sharded over expert-DP (= the TP ranks)
    "tp2_etp1_distopt": ["parallel.tensor=2", "parallel.sequence_parallel=true", "parallel.expert_tensor=1",
                         "parallel.distributed_optimizer=true"],
}


@pytest.fixture(scope="module")
def results(tmp_path_factory, data_cache):
    case = {"n": 3, "variants": {k: v + ["schedule.warmup_iters=2"] for k, v in VARIANTS.items()}}
    return run_worker("resume", tmp_path_factory.mktemp("resume"), case, nproc=2)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_resumed_losses_equal_uninterrupted(results, variant):
    r = results[variant]
    assert r["resumed_at"] == 3
    assert r["first"] == r["straight"][:3]
    assert r["second"] == r["straight"][3:], (r["straight"], r["second"])


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_resumed_weights_equal_uninterrupted(results, variant):
    r = results[variant]
    assert r["fp_split"] == r["fp_straight"]
