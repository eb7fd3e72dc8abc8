"""`ernie plan` (megatron_ernie/plan/): the arithmetic against megatron-core's own
objects where one process suffices, the layout enumeration against the config
checks, and the command line.  The multi-process exactness checks are in
tests/test_plan_dist.py."""

from __future__ import annotations

import json
import random

import pytest

from megatron_ernie import config as C
from megatron_ernie.config.checks import check_all
from megatron_ernie.plan import cli
from megatron_ernie.plan.buffers import grad_buffer_layout, owned_by_rank
from megatron_ernie.plan.comm import wire_bytes
from megatron_ernie.plan.hardware import parse_device
from megatron_ernie.plan.inventory import Param, chunk_layers
from megatron_ernie.plan.layouts import Options, plan_all, valid_layouts
from megatron_ernie.plan.memory import RankPosition, static_memory

from harness import ROOT

# ------------------------------------------------------------- megatron-core's buffer as the oracle


class FakeGroup:
    """Just what _ParamAndGradBuffer and the distributed optimizer ask of a DP group."""

    def __init__(self, size: int, rank: int = 0):
        self._size, self._rank = size, rank

    def size(self) -> int:
        return self._size

    def rank(self) -> int:
        return self._rank


@pytest.fixture(scope="module")
def megatron_buffer():
    import torch
    import torch.distributed as dist

    from megatron_ernie.runtime import cpu_compat

    cpu_compat.apply()
    if not dist.is_initialized():  # megatron logs through torch.distributed
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.distributed.param_and_grad_buffer import _ParamAndGradBuffer
    from megatron.core.process_groups_config import ProcessGroupCollection

    def build(params: list[Param], dp: int, distopt: bool, bucket_size):
        tensors = []
        for p in params:
            t = torch.nn.Parameter(torch.zeros(p.numel))
            if p.shared_embedding:
                t.shared_embedding = True
            tensors.append(t)
        ddp = DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=distopt)
        pgs = ProcessGroupCollection()
        pgs.tp, pgs.dp_cp = FakeGroup(1), FakeGroup(dp)
        return _ParamAndGradBuffer(ddp, torch.float32, torch.float32, tensors, FakeGroup(dp), bucket_size,
                                   {t: f"p{i}" for i, t in enumerate(tensors)}, 1.0, list(range(len(tensors))),
                                   False, pgs), tensors

    return build


def random_params(rng: random.Random, distopt: bool) -> list[Param]:
    n = rng.randint(1, 12)
    shared = {rng.randrange(n)} if distopt and rng.random() < 0.5 else set()
    if shared and rng.random() < 0.5:
        shared.add(rng.randrange(n))
    return [Param(f"p{i}", rng.choice([1, 7, 64, 100, 129, rng.randint(1, 5000)]), shared_embedding=i in shared)
            for i in range(n)]


CASES = [(seed, dp, distopt, bucket) for seed in range(6) for dp in (1, 3, 4, 16)
         for distopt in (False, True) for bucket in (None, 300, 4000)]


@pytest.mark.parametrize("seed,dp,distopt,bucket", CASES)
def test_buffer_layout_equals_megatron_core(megatron_buffer, seed, dp, distopt, bucket):
    params = random_params(random.Random(seed * 1000 + dp), distopt)
    buf, tensors = megatron_buffer(params, dp, distopt, bucket)
    mine = grad_buffer_layout(params, dp, distopt, bucket)
    assert mine.numel == buf.numel
    assert list(mine.buckets) == [(b.offset, b.offset + b.grad_data.numel()) for b in buf.buckets]
    assert [tuple(r) for r in mine.ranges.tolist()] == [buf.param_index_map[t][:2] for t in tensors]


@pytest.mark.parametrize("seed,dp,bucket", [(s, dp, b) for s in range(6) for dp in (2, 3, 8) for b in (None, 300)])
def test_distributed_optimizer_shards_equal_megatron_core(megatron_buffer, seed, dp, bucket):
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    params = random_params(random.Random(seed), True)
    buf, _ = megatron_buffer(params, dp, True, bucket)
    owned = owned_by_rank(grad_buffer_layout(params, dp, True, bucket), dp)
    for rank in range(dp):
        buf.data_parallel_group = FakeGroup(dp, rank)
        maps = [DistributedOptimizer._build_model_gbuf_range(buf, b)["param_map"] for b in range(len(buf.buckets))]
        elements = sum(r["param"].size for m in maps for r in m.values())
        assert owned[rank] == (elements, sum(len(m) for m in maps)), rank
    assert sum(e for e, _ in owned) == sum(p.numel for p in params)  # every element owned once


# ------------------------------------------------------------------------ pure arithmetic


def test_chunk_layers_follow_megatron_interleaving():
    # 8 layers, PP2 x VPP2: rank 0 holds layers 0-1 and 4-5, rank 1 holds 2-3 and 6-7
    assert [list(chunk_layers(8, 2, 2, 0, c)) for c in range(2)] == [[0, 1], [4, 5]]
    assert [list(chunk_layers(8, 2, 2, 1, c)) for c in range(2)] == [[2, 3], [6, 7]]


def test_ring_wire_bytes():
    assert wire_bytes("all_gather", 800, 4) == 600
    assert wire_bytes("all_reduce", 800, 4) == 1200
    assert wire_bytes("all_to_all", 800, 1) == 0
    assert wire_bytes("p2p", 800, 2) == 800


def test_parse_device_presets_and_custom():
    assert parse_device("h200").mem_gib == 141
    d = parse_device("custom:96,1000,2000,400,50")
    assert (d.mem_gib, d.tflops_bf16, d.tflops_fp8, d.nvlink_gbps, d.ib_gbps) == (96, 1000, 2000, 400, 50)
    with pytest.raises(C.ConfigError, match="--gpu"):
        parse_device("custom:96,1000")
    with pytest.raises(C.ConfigError, match="--gpu"):
        parse_device("b300")


# ------------------------------------------------------------------------ layouts


def tiny(overrides=()):
    return C.load(ROOT / "configs" / "tiny_cpu.toml", list(overrides))


def test_every_enumerated_layout_passes_the_config_checks_and_the_matrix_is_found():
    import dataclasses
    import tomllib

    cfg = tiny(["elastic.enabled=false", "parallel.expert=1"])
    valid, rejected = valid_layouts(cfg, 4, 8)
    for par in valid:
        check_all(dataclasses.replace(cfg, parallel=par), 4)  # raises if not
    assert rejected  # the enumeration does try layouts the checks refuse
    matrix = tomllib.loads((ROOT / "configs" / "cpu_layout_matrix.toml").read_text())["layouts"]
    names = {cli.layout_name(p) for p in valid}
    for overrides in matrix.values():
        par = tiny(["elastic.enabled=false", "parallel.expert=1"] + overrides).parallel
        par = dataclasses.replace(par, expert_tensor=par.expert_tensor_size, sequence_parallel=par.tensor > 1)
        assert cli.layout_name(par) in names, par


def test_plans_sorted_fitting_first_by_step_time_and_unfit_name_a_term():
    cfg = C.load(ROOT / "configs" / "gpu_moe16b_a3b_4x8.toml")
    plans, _ = plan_all(cfg, 32, cfg.data.vocab_size, parse_device("custom:24,989,1979,450,50"), Options())
    fits = [p for p in plans if p.fits]
    assert fits and len(fits) < len(plans)
    assert plans[:len(fits)] == fits
    assert [p.time.total_s for p in fits] == sorted(p.time.total_s for p in fits)
    for p in plans[len(fits):]:
        assert p.peak > 24 * 2**30 and p.binding.split(" ")[0] in p.memory


@pytest.mark.parametrize("pp_rank", [0, 3])
def test_distributed_optimizer_divides_optimizer_state_by_data_parallel(pp_rank):
    import dataclasses

    cfg = C.load(ROOT / "configs" / "gpu_moe16b_a3b_4x8.toml")
    par = dataclasses.replace(cfg.parallel, pipeline=4, expert=1)  # DP = 32 / 4 = 8
    where = RankPosition(pp_rank, None, None)
    plain, sharded = (static_memory(cfg.model, cfg.moe, dataclasses.replace(par, distributed_optimizer=d),
                                    cfg.data.vocab_size, 32, where) for d in (False, True))
    assert plain.params == pytest.approx(sharded.params, rel=1e-4)  # padding only
    assert plain.grads == pytest.approx(sharded.grads, rel=1e-4)
    # bf16: 12 B per element (fp32 moments + fp32 master) on every rank, or an eighth of them
    assert plain.optimizer == pytest.approx(plain.params / 2 * 12, rel=1e-4)
    assert sharded.optimizer == pytest.approx(plain.optimizer / 8, rel=1e-3)


# ------------------------------------------------------------------------ command line


def test_cli_table_lists_the_configured_layout(capsys):
    code = cli.main(["--config", str(ROOT / "configs" / "gpu_ernie45_300b_a47b.toml"), "--gpus", "768", "--top", "3"])
    out = capsys.readouterr().out
    assert code == 0
    assert "configured layout TP8+SPxPP6xEP8xETP1 distopt" in out  # the shipped layout, ranked
    assert out.count("comm/step") == 3


def test_cli_json_has_every_layout_with_terms(capsys):
    assert cli.main(["--config", str(ROOT / "configs" / "gpu_moe16b_a3b_4x8.toml"), "--gpus", "32", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["gpus"] == 32 and len(doc["layouts"]) > 100
    row = doc["layouts"][0]
    assert set(row["memory_bytes"]) >= {"params", "grads", "optimizer", "activations", "total"}
    assert row["step_s"]["total"] == pytest.approx(
        row["step_s"]["compute"] + row["step_s"]["bubble"] + row["step_s"]["exposed_comm"])


@pytest.mark.parametrize("argv,field", [
    (["--gpus", "0"], "--gpus"), (["--gpus", "8", "--gpu", "x100"], "--gpu"),
    (["--gpus", "8", "--efficiency", "1.5"], "--efficiency"), (["--gpus", "8", "--set", "model.hidden_size=-1"],
                                                               "model.hidden_size")])
def test_cli_bad_input_names_the_field(capsys, argv, field):
    assert cli.main(["--config", str(ROOT / "configs" / "tiny_cpu.toml"), *argv]) == 2
    assert field in capsys.readouterr().err


def test_cli_exit_code_1_when_nothing_fits(capsys):
    argv = ["--config", str(ROOT / "configs" / "gpu_ernie45_300b_a47b.toml"), "--gpus", "48", "--top", "2"]
    assert cli.main(argv) == 1
    out = capsys.readouterr().out
    assert "0 fit" in out and "does not fit:" in out


# ------------------------------------------------------------------------ show-config / submit

BIG = str(ROOT / "configs" / "gpu_ernie45_300b_a47b.toml")
TP4 = ["--set", "parallel.tensor=4"]  # the 300B layout at TP4: predicted over an H100's memory


def test_show_config_refuses_a_layout_predicted_not_to_fit_and_the_suggestion_fits(capsys):
    import re

    from megatron_ernie import cli as ernie
    from megatron_ernie.plan.check import peak_memory_line

    assert ernie.main(["show-config", "--config", BIG, *TP4, "--world-size", "768"]) == 2
    err = capsys.readouterr().err
    assert "parallel" in err and "--force" in err
    overrides = re.findall(r"--set (parallel\.\w+=\w+)", err)
    assert len(overrides) == 7
    fixed = C.load(BIG, overrides)
    assert "DOES NOT FIT" not in peak_memory_line(fixed, 768)  # raises if it did not fit


def test_show_config_force_and_a_fitting_config_print_the_peak(capsys):
    from megatron_ernie import cli as ernie

    assert ernie.main(["show-config", "--config", BIG, *TP4, "--world-size", "768", "--force"]) == 0
    assert "DOES NOT FIT" in capsys.readouterr().err
    small = str(ROOT / "configs" / "gpu_moe16b_a3b_4x8.toml")
    assert ernie.main(["show-config", "--config", small, "--world-size", "32"]) == 0
    err = capsys.readouterr().err
    assert "predicted peak memory per rank" in err and "DOES NOT FIT" not in err
    assert ernie.main(["show-config", "--config", BIG, "--world-size", "768", "--gpu", "h200"]) == 0
    assert ernie.main(["show-config", "--config", BIG, "--world-size", "768"]) == 0  # the shipped layout fits an H100
    assert "DOES NOT FIT" not in capsys.readouterr().err


def test_submit_dry_run_refuses_unless_forced(capsys):
    from megatron_ernie.launch import submit

    assert submit.main(["pretrain", "--config", BIG, *TP4, "--dry-run"]) == 2
    assert "a layout that fits" in capsys.readouterr().err
    assert submit.main(["pretrain", "--config", BIG, *TP4, "--dry-run", "--force"]) == 0
    out = capsys.readouterr()
    assert "#SBATCH" in out.out and "DOES NOT FIT" in out.err


# ------------------------------------------------------------------------ RL sizing (estimate)


def test_rollout_replica_memory_splits_over_rollout_tensor():
    import dataclasses

    from megatron_ernie.plan.rl import rollout_memory

    cfg = C.load(BIG)
    sizes = {}
    for t in (1, 8):
        system = dataclasses.replace(cfg.rl.system, rollout_tensor=t, rollout_batch_prompts=4)
        sizes[t] = rollout_memory(cfg.model, cfg.moe, system, cfg.rl.sampling, cfg.data.vocab_size)
    assert sizes[1].kv_cache == 8 * sizes[8].kv_cache  # 8 query groups: K/V heads split evenly
    # replicated norms and routers keep the split just above 1/8
    assert sizes[8].weights * 8 == pytest.approx(sizes[1].weights, rel=1e-3) and sizes[8].weights * 8 > sizes[1].weights
    h, L, g = cfg.model.hidden_size, cfg.model.num_layers, cfg.model.num_query_groups
    head_dim = h // cfg.model.num_attention_heads
    assert sizes[1].kv_cache == 2 * L * g * head_dim * cfg.model.seq_length * 4 * cfg.rl.sampling.n_per_prompt * 2


def test_plan_on_an_rl_config_prints_the_rollout_replica(capsys):
    cli.main(["--config", str(ROOT / "configs" / "rl_tiny_cpu.toml"), "--gpus", "2"])
    out = capsys.readouterr().out
    assert "RL rollout replica" in out and "RL trainer group" in out


def test_an_rl_config_is_planned_at_the_batch_rl_trains_and_an_sft_config_is_not_an_rl_config(capsys):
    """`ernie rl` trains on prompts_per_step x n_per_prompt sequences a step, whatever train.global_batch_size
    says (16 here): 6 x 4 = 24 sequences do not split over 16 data-parallel ranks, 8 x 4 = 32 do. An SFT
    config lists its tasks under [[rl.tasks]] but is not an RL job."""
    rl = ["--config", str(ROOT / "configs" / "rl_tiny_cpu.toml"), "--gpus", "16", "--json",
          "--set", "train.global_batch_size=16", "--set", "train.micro_batch_size=1",
          "--set", "rl.sampling.n_per_prompt=4"]
    batch_refusals = {}
    for prompts in (6, 8):
        cli.main([*rl, "--set", f"rl.system.prompts_per_step={prompts}"])
        batch_refusals[prompts] = json.loads(capsys.readouterr().out)["rejected"].get("train.global_batch_size", 0)
    assert batch_refusals[8] == 0 and batch_refusals[6] > 0, batch_refusals  # 16 sequences would split at both
    cli.main(["--config", str(ROOT / "configs" / "sft_tiny_cpu.toml"), "--gpus", "2"])
    assert "RL rollout replica" not in capsys.readouterr().out
