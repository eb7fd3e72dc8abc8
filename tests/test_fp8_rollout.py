"""One FP8 operator path for training and rollout (rl.system.fp8_roles) and its K3 table.

Unit tests: the per-step and frozen delayed-scaling modes, fp8_roles config
rules, and scales travelling in exact fp32 buckets of the weight push.

Slow tests:
* tests/dist/rl_worker.py "fp8_scales" (one 2-process launch): the scales the
  trainer ships are named by megatron-core's layout-independent ShardedObject
  keys (the same names at DP2, TP2 and EP2) and TP2 gives exactly the DP
  scales; EP2 gives other weight scales for experts, because megatron-core's
  amax reduction group spans the expert-parallel ranks and pairs their local
  experts by position (as Transformer Engine's amax reduction does).
* benchmarks/fp8_rollout_kl.py --json: the K3 table; unified FP8 (delayed,
  shared scales) must beat FP8 rollout / bf16 train, and the engine must hold
  exactly the trainer's scales.
* `ernie rl` end to end (synchronous, bf16 trainer and rollout): with
  fp8_roles = "both" the trainer's reported K3 stays far below the one of
  fp8_roles = "rollout" at every step.

Measured here (CPU, bf16, 64 samples x <= 6 new tokens, routing replay on; see
the benchmark's table): K3 0 for bf16/bf16, 1.6e-3 for FP8 rollout / bf16
train, 0 for unified delayed FP8 with shared scales, 5.6e-4 for delayed FP8
with separate scaling states, 1.5e-3 for unified current scaling (per-tensor
amax of a whole batch is not batch-invariant), 0 for unified blockwise.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from harness import ROOT, torchrun
from megatron_ernie.config.errors import ConfigError
from megatron_ernie.config.fp8 import FP8Config
from megatron_ernie.precision.recipes import build_emulated_recipe
from megatron_ernie.precision.sharing import PREFIX, split_scales
from megatron_ernie.rl.system import SystemConfig
from megatron_ernie.rl.weight_sync import pack_bucket, plan_push, unpack_bucket

DELAYED = FP8Config(recipe="delayed", backend="emulate", amax_history_len=4)


# ------------------------------------------------------------------ scaling modes
def quantize_inputs(state, tensors) -> None:
    recipe = build_emulated_recipe(DELAYED)
    for x in tensors:
        recipe.quantize_input(x, state, None, need_wgrad=False)


def test_per_step_mode_keeps_scales_for_the_step_then_commits_the_largest_amax():
    xs = [torch.full((4, 8), v) for v in (2.0, 8.0, 4.0)]
    live = build_emulated_recipe(DELAYED).new_state()
    quantize_inputs(live, xs[1:2])  # one live update with the step's largest amax (8)
    step = build_emulated_recipe(DELAYED).new_state()
    step.set_mode("per_step")
    quantize_inputs(step, xs)
    meta = step.metas["input"]
    assert float(meta.scale) == 1.0 and float(meta.amax_history.abs().sum()) == 0.0  # nothing moved yet
    step.commit()
    assert torch.equal(meta.scale, live.metas["input"].scale)
    assert torch.equal(meta.amax_history, live.metas["input"].amax_history)
    assert float(meta.scale) == pytest.approx(448.0 / 8.0)
    step.commit()  # a step without quantisations changes nothing (TE skips zero amaxes)
    assert torch.equal(meta.scale, live.metas["input"].scale)


def test_frozen_mode_never_updates_and_checkpoint_load_drops_pending_amaxes():
    state = build_emulated_recipe(DELAYED).new_state()
    state.metas["input"].scale = torch.tensor(3.0)
    state.set_mode("frozen")
    quantize_inputs(state, [torch.full((2, 8), 100.0)])
    state.commit()
    assert float(state.metas["input"].scale) == 3.0
    state.set_mode("per_step")
    quantize_inputs(state, [torch.full((2, 8), 100.0)])
    state.load_state_dict(state.state_dict())
    state.commit()
    assert float(state.metas["input"].scale) == 3.0
    with pytest.raises(ValueError, match="scaling mode 'sometimes'"):
        state.set_mode("sometimes")


# ------------------------------------------------------------------ config
def test_fp8_roles_select_each_side():
    fp8 = DELAYED
    both, rollout, trainer = (SystemConfig(fp8_roles=r) for r in ("both", "rollout", "trainer"))
    assert both.role_fp8(fp8, "trainer") == fp8 and both.role_fp8(fp8, "rollout") == fp8
    assert rollout.role_fp8(fp8, "trainer").recipe == "off" and rollout.role_fp8(fp8, "rollout") == fp8
    assert trainer.role_fp8(fp8, "rollout").recipe == "off" and trainer.role_fp8(fp8, "trainer") == fp8
    assert both.shares_fp8_scales(fp8) and not rollout.shares_fp8_scales(fp8)
    assert not both.shares_fp8_scales(FP8Config(recipe="blockwise", backend="emulate"))  # stateless
    assert not both.shares_fp8_scales(FP8Config())


@pytest.mark.parametrize("system, fp8, fragment", [
    (SystemConfig(fp8_roles="rollout"), FP8Config(), "fp8.recipe = \"off\""),
    (SystemConfig(), FP8Config(recipe="delayed", backend="te"), "stateless recipe"),
])
def test_fp8_roles_errors_name_the_field_and_the_fix(system, fp8, fragment):
    with pytest.raises(ConfigError, match="rl.system.fp8_roles") as info:
        system.check_fp8(fp8, "rl.system")
    assert fragment in str(info.value)
    with pytest.raises(ConfigError, match="choose one of"):
        SystemConfig(fp8_roles="neither").validate("rl.system")


def test_rl_cli_rejects_fp8_roles_without_a_recipe():
    from megatron_ernie.rl.main import build_parser, load_config

    args = build_parser().parse_args(["--config", str(ROOT / "configs" / "rl_tiny_cpu.toml"),
                                      "--set", 'rl.system.fp8_roles="rollout"'])
    with pytest.raises(ConfigError, match="rl.system.fp8_roles = 'rollout'"):
        load_config(args)


# ------------------------------------------------------------------ weight push
def test_scales_travel_exactly_in_their_own_fp32_bucket():
    weights = {"a.weight": torch.randn(3, 4), "b.weight": torch.randn(5)}
    scale = torch.tensor([1.0 + 2 ** -20])  # rounds to 1.0 in bf16
    scales = {f"{PREFIX}x._extra_state/shard_0_1/input": scale}
    buckets = plan_push(weights, "bf16", 16.0, scales)
    assert [b.dtype for b in buckets] == ["bf16", "fp32"] and [b.index for b in buckets] == [0, 1]
    shapes = {**{k: tuple(v.shape) for k, v in weights.items()}, **{k: (1,) for k in scales}}
    received = {}
    for bucket in buckets:
        received.update(unpack_bucket(bucket, pack_bucket(bucket, {**weights, **scales}), shapes))
    got_weights, got_scales = split_scales(received)
    assert set(got_weights) == set(weights) and torch.equal(next(iter(got_scales.values())), scale)
    with pytest.raises(ValueError, match="this rollout model lacks"):
        unpack_bucket(buckets[1], pack_bucket(buckets[1], scales), {k: shapes[k] for k in weights})


# ------------------------------------------------------------------ slow
@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    out = tmp_path_factory.mktemp("fp8-scales") / "result.json"
    case = {"layouts": {"dp2": [], "tp2": ["parallel.tensor=2"], "ep2": ["parallel.expert=2"]}}
    torchrun(2, [ROOT / "tests" / "dist" / "rl_worker.py", "fp8_scales", out, json.dumps(case)], timeout=600)
    return json.loads(out.read_text())


@pytest.mark.slow
def test_shipped_scales_have_layout_independent_names_and_values(layouts):
    dp, tp, ep = (layouts[k] for k in ("dp2", "tp2", "ep2"))
    # 2 layers x (qkv, proj, 8 experts x (fc1, fc2)) x (input, weight)
    assert len(dp["after"]) == 2 * (2 + 16) * 2
    assert set(dp["after"]) == set(tp["after"]) == set(ep["after"])
    assert set(dp["before"].values()) == {1.0}  # per_step mode: the forward changed nothing
    assert all(v != 1.0 for v in dp["after"].values())  # commit calibrated every linear
    assert tp["after"] == dp["after"]  # TP shards' amaxes max-reduce to the full tensor's
    attention = [k for k in dp["after"] if "self_attention" in k]
    assert all(ep["after"][k] == dp["after"][k] for k in attention)


@pytest.fixture(scope="module")
def k3_table(tmp_path_factory):
    out = tmp_path_factory.mktemp("fp8-k3") / "k3.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "fp8_rollout_kl.py"), "--prompts", "8",
                           "--json", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    print("\n" + proc.stdout)
    return {row["pairing"]: row for row in json.loads(out.read_text())["rows"]}


@pytest.mark.slow
def test_unified_fp8_has_lower_k3_than_fp8_rollout_against_bf16_training(k3_table):
    mixed = k3_table["FP8 rollout / bf16 train"]
    unified = k3_table["FP8 / FP8 unified (delayed, shared scales)"]
    separate = k3_table["FP8 / FP8 delayed, separate scaling state"]
    assert unified["scales_match"] is True
    assert mixed["k3_replay"] > 1e-4 and mixed["route_mismatch"] > 0
    assert unified["k3_replay"] <= 0.01 * mixed["k3_replay"]
    assert unified["k3_replay"] <= 0.01 * separate["k3_replay"]  # sharing the scaling state is what matters
    assert unified["k3_compare"] <= 0.01 * mixed["k3_compare"]
    for row in k3_table.values():
        assert row["tokens"] > 100 and row["k3_replay"] >= 0


def rl_run(run_dir, roles: str) -> list[dict]:
    cmd = [sys.executable, "-m", "megatron_ernie.rl.main", "--config", str(ROOT / "configs" / "rl_tiny_cpu.toml"),
           "--set", f'run.dir="{run_dir}"', "--set", "train.iters=5", "--set", 'model.dtype="bf16"',
           "--set", "rl.buffer.max_policy_lag=0", "--set", 'fp8.recipe="delayed"', "--set", 'fp8.backend="emulate"',
           "--set", f'rl.system.fp8_roles="{roles}"', "--set", "checkpoint.save_on_exit=false",
           "--rollout-workers", "1", "--reward-workers", "0"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [json.loads(line) for line in (run_dir / "rl" / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_rl_run_with_unified_fp8_keeps_trainer_and_rollout_in_agreement(tmp_path):
    unified = [m["policy/rollout_kl_k3"] for m in rl_run(tmp_path / "both", "both")]
    mixed = [m["policy/rollout_kl_k3"] for m in rl_run(tmp_path / "rollout", "rollout")]
    assert len(unified) == len(mixed) == 5
    print(f"\nK3 per step, unified FP8: {unified}\nK3 per step, FP8 rollout only: {mixed}")
    assert min(mixed) > 1e-7
    assert max(unified) <= 0.01 * min(mixed)
