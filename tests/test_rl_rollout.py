"""Rollout engine (KV cache, sampling, routed experts), routing replay (R3) and weight sync.

The megatron-core parts run in one torchrun process (tests/dist/rl_worker.py,
scenario "rollout"): a tiny MoE (2 layers, 8 experts, top-2, init std 0.1 so
that routing decisions matter) serves 32 arithmetic prompts. Scenario
"rollout_replica" (2 processes) checks a tensor-parallel rollout replica
against the whole model; the last test runs `ernie rl` with two TP2 replicas
and kills a member of one.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

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
                        "tp2": four + ["parallel.tensor=2", "parallel.sequence_parallel=true"]}, "anchor": "pp2_vpp2",
            "gather_layouts": {"ep2": ["parallel.expert=2"]}}
    torchrun(2, [ROOT / "tests" / "dist" / "rl_worker.py", "reference_layouts", out, json.dumps(case)], timeout=600)
    return json.loads(out.read_text())


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["dp2", "pp2", "pp2_vpp2", "tp2", "ep2"])
def test_the_published_weights_equal_every_ranks_shards(reference_layouts, layout):
    """What the trainer publishes (gather_global on rank 0): every rank's shard equals its slice of
    it, whether the tensor is whole on rank 0 (copied once), on another stage, or split by TP/EP."""
    got = reference_layouts[f"gather:{layout}"]
    assert got["mismatched"] == 0 and got["shards"] >= got["keys"] > 10
    assert got["dtypes"] == ["torch.float32"]


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


@pytest.fixture(scope="module")
def replica(tmp_path_factory):
    out = tmp_path_factory.mktemp("rl-replica") / "result.json"
    torchrun(2, [ROOT / "tests" / "dist" / "rl_worker.py", "rollout_replica", out], timeout=600)
    return json.loads(out.read_text())


@pytest.mark.slow
def test_tensor_parallel_replica_generates_what_the_whole_model_generates(replica):
    reference, leader, follower = replica["reference"], replica["leader"], replica["follower"]
    assert leader["version"] == follower["version"] == 3  # the follower got the weights through the leader
    assert leader["numel"] == follower["numel"] < 0.7 * replica["whole_numel"]  # each member holds a shard
    assert [len(call) for call in leader["outputs"]] == [16, 2]
    for ref_call, got_call in zip(reference, leader["outputs"]):
        for (ref_tokens, ref_logprobs, ref_routes, ref_finish), (tokens, logprobs, routes, finish) in zip(
                ref_call, got_call):
            assert tokens == ref_tokens and finish == ref_finish  # same samples: same logits, same sampler seed
            assert np.allclose(logprobs, ref_logprobs, atol=1e-5)  # TP sums differ only in rounding
            assert np.array_equal(np.sort(routes, -1), np.sort(ref_routes, -1))
    assert follower["outputs"] == leader["outputs"]  # the members stay in lock step, bit for bit
    assert len({tuple(g[0]) for g in leader["outputs"][0]}) > 4  # sampling, not one repeated answer


def rollout_member_pid(run_dir: Path, rank: int) -> int:
    """The pid of rollout process `rank` of the run in `run_dir` (followers are not in roles.json)."""
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            environ = (proc / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        if b"rollout" in cmdline and any(str(run_dir).encode() in arg for arg in cmdline) \
                and f"RANK={rank}".encode() in environ:
            return int(proc.name)
    raise AssertionError(f"no rollout process of rank {rank} for {run_dir}")


@pytest.mark.slow
def test_tensor_parallel_rollout_replicas_run_rl_and_survive_a_lost_member(tmp_path):
    """`ernie rl` with 4 rollout processes as two TP2 replicas; one replica loses a member mid-run."""
    run_dir, steps = tmp_path / "run", 10
    cmd = [sys.executable, "-m", "megatron_ernie.rl.main", "--config", str(ROOT / "configs" / "rl_tiny_cpu.toml"),
           "--set", f'run.dir="{run_dir}"', "--set", f"train.iters={steps}", "--set", "rl.system.rollout_tensor=2",
           "--set", "rl.buffer.max_policy_lag=0", "--set", "checkpoint.save_on_exit=false",
           "--rollout-workers", "4", "--reward-workers", "0"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "ERNIE_RL_TRACE": str(tmp_path / "trace")}
    log = tmp_path / "rl.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        metrics_path = run_dir / "rl" / "metrics.jsonl"
        deadline = time.monotonic() + 600
        while not (metrics_path.exists() and len(metrics_path.read_text().splitlines()) >= 3):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        os.kill(rollout_member_pid(run_dir, 3), signal.SIGKILL)  # replica 1's follower
        assert proc.wait(timeout=600) == 0, log.read_text()[-3000:]
    metrics = [json.loads(line) for line in metrics_path.read_text().splitlines()]
    roles = json.loads((run_dir / "rl" / "roles.json").read_text())
    assert sorted(r["rank"] for r in roles if r["role"] == "rollout") == [0, 1]  # leaders alone join
    assert [r["alive"] for r in sorted(roles, key=lambda r: r["rank"]) if r["role"] == "rollout"] == [True, False]
    assert "rollout replica 1: a member is gone" in log.read_text()
    assert len(metrics) == steps
    assert metrics[0]["rollout/alive_workers"] == 2 and metrics[-1]["rollout/alive_workers"] == 1
    # synchronous: each replica generates with the trainer's current weights (bf16 vs the fp32 trainer)
    assert all(0 <= m["policy/rollout_kl_k3"] < 1e-5 for m in metrics), [m["policy/rollout_kl_k3"] for m in metrics]
    assert_synchronous_chain_in_trace(tmp_path / "trace", steps)


def assert_synchronous_chain_in_trace(directory: Path, steps: int) -> None:
    """ERNIE_RL_TRACE (rl/trace.py): every role's messages on one clock; at lag 0 a step is a chain, in which
    the next round's prompts follow the SyncPlan at once and the rollout reads them once it has synced."""
    from megatron_ernie.rl import trace

    events = trace.load(str(directory))
    assert sorted({e[1] for e in events}) == ["controller0", "rollout0", "rollout1", "trainer0"]  # leaders only
    sent = [e for e in events if e[1] == "trainer0" and e[2] == "send" and e[3] == "StepDone"]
    got = [e for e in events if e[1] == "controller0" and e[2] == "recv" and e[3] == "StepDone"]
    assert len(sent) == len(got) == steps and all(a[0] < b[0] for a, b in zip(sent, got))
    offsets = {(r["role"], r["dir"], r["type"], r["peer"], r["which"]): r["offset_s"]
               for r in trace.step_timeline(events)[1:]}
    plan = [("trainer0", "send", "WeightsReady", "controller"), ("controller0", "recv", "WeightsReady", "trainer0"),
            ("controller0", "send", "SyncPlan", "rollout0")]
    after_sync = [("rollout0", "recv", "SyncPlan", "controller"), ("rollout0", "send", "SyncDone", "controller"),
                  ("rollout0", "recv", "PromptRequest", "controller"),
                  ("rollout0", "send", "SampleBatch", "controller"), ("controller0", "send", "TrainBatch", "trainer0"),
                  ("trainer0", "recv", "TrainBatch", "controller")]
    chains = [plan + [("controller0", "send", "PromptRequest", "rollout0")], plan + after_sync]  # no wait for SyncDone
    for chain in chains:
        times = [offsets[key + ("first",)] for key in chain]
        assert times == sorted(times), list(zip(chain, times))


@pytest.mark.slow
def test_reference_is_the_starting_checkpoint_also_after_a_resume(reference_layouts):
    """pi_ref is the checkpoint a stage starts from (checkpoint.load), not the random initialisation
    the trainer is built with, and a resume from the run's own checkpoint keeps it."""
    r = reference_layouts["anchor"]
    assert r["first"]["ref_kl_k3"] == 0.0  # step 1: the loaded policy is the reference
    assert r["second"]["ref_kl_k3"] > 1e-3
    assert r["resumed"]["ref_kl_k3"] == pytest.approx(r["second"]["ref_kl_k3"], rel=1e-5)
    assert r["resumed"]["pg_loss"] == pytest.approx(r["second"]["pg_loss"], rel=1e-5)

