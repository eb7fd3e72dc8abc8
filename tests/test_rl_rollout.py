"""Rollout engine (KV cache, sampling, routed experts), routing replay (R3) and weight sync.

The megatron-core parts run in one torchrun process (tests/dist/rl_worker.py,
scenario "rollout"): a tiny MoE (2 layers, 8 experts, top-2, init std 0.1 so
that routing decisions matter) serves 32 arithmetic prompts.
"""

import json

import numpy as np
import pytest
import torch

from harness import ROOT, torchrun

from megatron_ernie.rl.rollout.sampling import _truncate, sample_next
from megatron_ernie.rl.task_tokenizer import CharTokenizer


def test_top_k_and_top_p_keep_the_right_tokens():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isfinite(_truncate(logits, 2, 1.0)).tolist() == [[True, True, False, False]]
    # nucleus 0.7: 0.5 alone is < 0.7, 0.5 + 0.3 reaches it -> keep two
    assert torch.isfinite(_truncate(logits, 0, 0.7)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(_truncate(logits, 0, 0.4)).tolist() == [[True, False, False, False]]


def test_sampling_reports_untruncated_logprob_at_temperature():
    logits = torch.tensor([[2.0, 1.0, 0.0]]).repeat(2000, 1)
    tokens, logprobs = sample_next(logits, 2.0, 0, 0.5, torch.Generator().manual_seed(0))
    assert set(tokens.tolist()) == {0}  # top-p 0.5 at T=2 keeps only the first token (p = 0.506)
    expected = torch.log_softmax(logits[0] / 2.0, -1)[0]
    assert torch.allclose(logprobs, expected.expand_as(logprobs))
    tokens, _ = sample_next(logits, 1.0, 0, 1.0, torch.Generator().manual_seed(0))
    freq = np.bincount(tokens.numpy(), minlength=3) / len(tokens)
    assert np.allclose(freq, torch.softmax(logits[0], -1).numpy(), atol=0.04)


def test_char_tokenizer_round_trip(tmp_path):
    tok = CharTokenizer.train(["12+7=", "19"])
    assert tok.vocab_size == 2 + len("12+7=9")
    ids = tok.encode("9+1=")
    assert tok.decode(ids + [tok.eod_id]) == "9+1="
    tok.save(tmp_path / "t.json")
    assert CharTokenizer.load(tmp_path / "t.json").encode("9+1=") == ids
    with pytest.raises(ValueError, match="not in the task alphabet"):
        tok.encode("x")


@pytest.fixture(scope="module")
def rollout(tmp_path_factory):
    out = tmp_path_factory.mktemp("rl-rollout") / "result.json"
    case = {"overrides": ["model.init_method_std=0.1"], "prompts": 8}
    torchrun(1, [ROOT / "tests" / "dist" / "rl_worker.py", "rollout", out, json.dumps(case)], timeout=600)
    return json.loads(out.read_text())


@pytest.mark.slow
def test_kv_cached_generation_matches_full_sequence_in_fp32(rollout):
    r = rollout["fp32"]
    assert r["contract_errors"] == []
    assert r["n_stop"] > 0 and r["n_length"] > 0  # both stop tokens and max_new_tokens were exercised
    # incremental decoding with megatron-core's KV cache == the trainer's full-sequence forward
    assert r["compare"]["max_abs_logprob_diff"] < 1e-5
    assert r["compare"]["k3"] < 1e-9
    assert r["compare"]["own_route_mismatch"] == 0.0


@pytest.mark.slow
def test_routing_replay_removes_route_mismatch_and_cuts_k3(rollout):
    r = rollout["bf16"]
    assert r["contract_errors"] == []
    without, with_replay = r["compare"], r["replay"]
    assert without["used_route_mismatch"] > 0  # bf16 rollout vs fp32 trainer: some tokens route differently
    assert with_replay["used_route_mismatch"] == 0.0 and with_replay["used_rows"] > 100
    assert with_replay["k3"] * 2 <= without["k3"], (with_replay["k3"], without["k3"])
    print(f"\nbf16 rollout vs fp32 trainer: route mismatch {without['used_route_mismatch']:.4f} of "
          f"(token, layer) rows; K3 {without['k3']:.3e} without replay, {with_replay['k3']:.3e} with replay")


@pytest.mark.slow
def test_router_still_learns_under_replay(rollout):
    assert rollout["router_grad_norm_replay"] > 0


@pytest.mark.slow
def test_weight_broadcast_in_buckets_is_exact(rollout):
    s = rollout["sync"]
    assert s["equal"] and s["buckets"] > 1
    assert s["nbytes"] > 100_000 and s["send_bytes_per_s"] > 0


@pytest.mark.slow
def test_policy_step_with_reference_kl(rollout):
    r = rollout["train_step"]
    first, second = r["first"], r["second"]
    assert r["version"] == 2 and r["params_moved"] > 0.9 * r["params"]
    assert first["ref_kl_k3"] < 1e-9 < second["ref_kl_k3"]  # the reference is the initial policy
    assert first["routing_mismatch_used"] == 0.0 and first["routing_mismatch_own"] > 0
    for key in ("pg_loss", "clip_fraction", "entropy", "rollout_kl_k3", "grad_norm"):
        assert np.isfinite(first[key]), key
    assert first["entropy"] > 0


@pytest.fixture(scope="module")
def reference_layouts(tmp_path_factory):
    out = tmp_path_factory.mktemp("rl-reference") / "result.json"
    four = ["model.num_layers=4"]
    case = {"layouts": {"dp2": four, "pp2": four + ["parallel.pipeline=2"],
                        "pp2_vpp2": four + ["parallel.pipeline=2", "parallel.virtual_pipeline=2"],
                        "tp2": four + ["parallel.tensor=2", "parallel.sequence_parallel=true"]}}
    torchrun(2, [ROOT / "tests" / "dist" / "rl_worker.py", "reference_layouts", out, json.dumps(case)], timeout=600)
    return json.loads(out.read_text())


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["pp2", "pp2_vpp2", "tp2"])
def test_reference_kl_runs_through_the_pipeline_and_matches_data_parallel(reference_layouts, layout):
    """The frozen reference runs forward-only through megatron-core's schedule, so pipelining works."""
    ref, got = reference_layouts["dp2"], reference_layouts[layout]
    assert len(ref) == len(got) == 3
    assert ref[0]["ref_kl_k3"] == got[0]["ref_kl_k3"] == 0.0  # step 1: the policy is the reference
    for a, b in zip(ref[1:], got[1:]):
        assert a["ref_kl_k3"] > 1e-3
        assert b["ref_kl_k3"] == pytest.approx(a["ref_kl_k3"], rel=1e-4)
    for a, b in zip(ref, got):
        assert b["pg_loss"] == pytest.approx(a["pg_loss"], rel=1e-4, abs=1e-7)
        assert b["entropy"] == pytest.approx(a["entropy"], rel=1e-5)
