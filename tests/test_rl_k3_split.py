"""The rollout K3 split into numerics (samples of the trainer's own weights version) and staleness (older
samples), and the share of sequences with an MoE route flip (issue 14 item 4: at lag 1 the single K3 scalar
was mostly staleness, and read as train/inference mismatch)."""

import json
import math

import pytest
import torch

from harness import ROOT, torchrun
from megatron_ernie.rl.algorithms import rollout_k3_split_metrics, rollout_k3_sums

LN2 = math.log(2.0)


def test_sums_put_each_sequence_in_its_bucket():
    train = torch.log(torch.tensor([[0.5, 0.5, 0.5], [0.5, 0.5, 0.5], [0.5, 0.5, 0.5]]))
    rollout = torch.log(torch.tensor([[0.25, 0.5, 0.9], [0.5, 0.5, 0.5], [1.0, 0.5, 0.5]]))
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])  # token 3 of row 0 is padding
    same = torch.tensor([True, True, False])
    sums = rollout_k3_sums(train, rollout, mask, same)
    # K3 with r = p_rollout / p_train: r = 0.5 -> 0.5 - 1 + ln 2; r = 2 -> 2 - 1 - ln 2; r = 1 -> 0
    expected = [(-0.5 + LN2) + 0.0 + 0.0, 5.0, 1.0 - LN2, 1.0]
    assert sums.tolist() == pytest.approx(expected, abs=1e-6)
    metrics = rollout_k3_split_metrics(sums)
    assert metrics["rollout_kl_k3_numerics"] == pytest.approx((-0.5 + LN2) / 5)
    assert metrics["rollout_kl_k3_stale"] == pytest.approx(1.0 - LN2)
    assert metrics["stale_token_share"] == pytest.approx(1 / 6)


def test_an_empty_bucket_has_no_k3_rather_than_zero():
    sums = rollout_k3_sums(torch.zeros(2, 2), torch.full((2, 2), -0.1), torch.ones(2, 2), torch.tensor([True, True]))
    metrics = rollout_k3_split_metrics(sums)
    assert "rollout_kl_k3_stale" not in metrics and metrics["stale_token_share"] == 0.0
    assert metrics["rollout_kl_k3_numerics"] == pytest.approx(math.exp(-0.1) - 1 + 0.1, rel=1e-5)  # float32
    stale = rollout_k3_split_metrics(rollout_k3_sums(torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 2),
                                                     torch.tensor([False])))
    assert "rollout_kl_k3_numerics" not in stale and stale == {"stale_token_share": 1.0, "rollout_kl_k3_stale": 0.0}


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    out = tmp_path_factory.mktemp("k3-split") / "result.json"
    torchrun(1, [ROOT / "tests" / "dist" / "k3_split_worker.py", "k3_split", out], timeout=600)
    return json.loads(out.read_text())


@pytest.mark.slow
def test_same_version_samples_from_an_exact_engine_have_zero_numeric_k3(split):
    """fp32 engine with the trainer's own weights: trainer and rollout agree to rounding, routes included."""
    m = split["fp32_same_version"]
    assert 0.0 <= m["rollout_kl_k3_numerics"] < 1e-9
    assert "rollout_kl_k3_stale" not in m and m["stale_token_share"] == 0.0  # no staleness: that bucket is empty
    assert m["rollout_kl_k3"] == pytest.approx(m["rollout_kl_k3_numerics"], abs=1e-12)
    assert m["routing_seq_flip_own"] == 0.0 and m["routing_seq_flip_own_same_version"] == 0.0


@pytest.mark.slow
def test_the_same_samples_one_version_later_are_all_staleness(split):
    m = split["fp32_stale"]
    assert "rollout_kl_k3_numerics" not in m and m["stale_token_share"] == 1.0
    assert m["rollout_kl_k3_stale"] > 1e-6  # one optimizer step moved the policy
    assert m["rollout_kl_k3_stale"] == pytest.approx(m["rollout_kl_k3"], rel=1e-6)
    assert "routing_seq_flip_own_same_version" not in m


@pytest.mark.slow
def test_a_mixed_batch_reports_each_part_as_measured_apart(split):
    """bf16 samples of the trainer's version next to fp32 samples two versions old, in one training step:
    each bucket's K3 equals the K3 of that part measured alone (sequence_logprobs at the same weights)."""
    m, fresh, stale = split["mixed_replay"], split["bf16_fresh_direct"], split["stale_direct"]
    assert m["rollout_kl_k3_numerics"] == pytest.approx(fresh["k3"], rel=1e-4, abs=1e-10)
    assert m["rollout_kl_k3_stale"] == pytest.approx(stale["k3"], rel=1e-4)
    assert m["stale_token_share"] == pytest.approx(stale["tokens"] / (stale["tokens"] + fresh["tokens"]))
    assert m["rollout_kl_k3_numerics"] < m["rollout_kl_k3_stale"]
    # route flips: the trainer's own routers against the rollout's recorded experts, per sequence
    assert m["routing_seq_flip_own_same_version"] == pytest.approx(fresh["seq_flip_share"])
    assert m["routing_seq_flip_own"] == pytest.approx((fresh["seq_flip_share"] + stale["seq_flip_share"]) / 2)
    assert m["routing_seq_flip_own"] > 0  # bf16 rollout vs fp32 trainer, and stale routers: some flips
    assert m["routing_seq_flip_used"] == 0.0  # replay: the loss used the rollout's experts everywhere


@pytest.mark.slow
def test_without_replay_the_loss_uses_the_flipped_routes(split):
    m = split["mixed_no_replay"]
    assert m["routing_seq_flip_used"] == m["routing_seq_flip_own"] > 0
    assert 0 < m["stale_token_share"] < 1 and m["rollout_kl_k3_numerics"] < m["rollout_kl_k3_stale"]


@pytest.mark.slow
def test_sequence_flips_add_up_across_data_pipeline_and_tensor_ranks(tmp_path):
    """Targets = the trainer's own routes except one token of one layer in 4 of 16 sequences (a layer-1 flip
    lives on the second pipeline stage at PP 2; a flip near the end on the second TP rank under sequence
    parallelism): every layout reports exactly 4/16."""
    out = tmp_path / "result.json"
    layouts = {"dp2": [], "pp2": ["parallel.pipeline=2"],
               "tp2": ["parallel.tensor=2", "parallel.sequence_parallel=true"]}
    torchrun(2, [ROOT / "tests" / "dist" / "k3_split_worker.py", "flip_layouts", out, json.dumps({"layouts": layouts})],
             timeout=600)
    r = json.loads(out.read_text())
    expected = r["flipped_sequences"] / r["sequences"]
    assert expected == 4 / 16
    for name in layouts:
        m = r[name]
        assert m["routing_seq_flip_own"] == expected, (name, m["routing_seq_flip_own"])
        assert m["routing_seq_flip_own_same_version"] == expected and m["routing_seq_flip_used"] == 0.0
        assert m["stale_token_share"] == 0.0
    assert r["pp2"]["rollout_kl_k3_numerics"] == pytest.approx(r["dp2"]["rollout_kl_k3_numerics"], rel=1e-5)
    assert r["tp2"]["rollout_kl_k3_numerics"] == pytest.approx(r["dp2"]["rollout_kl_k3_numerics"], rel=1e-5)
