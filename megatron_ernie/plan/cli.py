"""`ernie plan`: rank every layout of a config for N devices by estimated step time.

    ernie plan --config configs/gpu_ernie45_300b_a47b.toml --gpus 768 --gpu h100 --top 5
    ernie plan --config C.toml --gpus 32 --json > plan.json

Per layout: per-rank memory by term (exact for parameters, main-grad buffers
and optimizer state; estimated for activations, MoE dispatch and FP8 weight
copies), communication per step and group, and a step-time estimate.  The
layouts that fit come first, fastest first; for those that do not, the
binding term and what would relieve it.  See megatron_ernie/plan/*.py for
every formula and its source.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from megatron_ernie import config as C
from megatron_ernie.plan.activations import ATTENTION_KERNELS, RECOMPUTE
from megatron_ernie.plan.hardware import parse_device
from megatron_ernie.plan.layouts import Options, plan_all, validate_for_planning

GIB = 2**30
MEMORY_TERMS = ("params", "grads", "optimizer", "fp8_weights", "activations", "moe_dispatch")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ernie plan", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="TOML file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--gpus", type=int, required=True, help="number of devices (the world size)")
    p.add_argument("--gpu", default="h100", help="h100 | h200 | a100 | custom:mem_gib,tflops_bf16,tflops_fp8,nvlink_gbps,ib_gbps")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--top", type=int, default=10, help="rows to print (default 10)")
    p.add_argument("--efficiency", type=float, default=0.4, help="share of the dense peak the GEMMs reach (0.4)")
    p.add_argument("--imbalance", type=float, default=1.0, help="busiest expert rank's load over the mean (1.0)")
    p.add_argument("--recompute", choices=RECOMPUTE, default="none",
                   help="activation recomputation to assume (the trainer runs without; what-if only)")
    p.add_argument("--attention", choices=ATTENTION_KERNELS, default="flash",
                   help="attention kernel: flash (TE on GPUs, default) or unfused (the local spec on CPU)")
    p.add_argument("--headroom-gib", type=float, default=4.0,
                   help="device memory kept free for the CUDA context, NCCL and fragmentation (4)")
    p.add_argument("--json", action="store_true", help="print every layout as JSON")
    return p


def _check_args(args) -> None:
    if args.gpus < 1:
        raise C.ConfigError("--gpus", args.gpus, "give the number of devices, >= 1")
    if args.top < 1:
        raise C.ConfigError("--top", args.top, "print at least one row")
    if not 0 < args.efficiency <= 1:
        raise C.ConfigError("--efficiency", args.efficiency, "a share of the peak in (0, 1]")
    if args.imbalance < 1:
        raise C.ConfigError("--imbalance", args.imbalance, "the busiest rank's load over the mean is >= 1")
    if args.gpus_per_node < 1:
        raise C.ConfigError("--gpus-per-node", args.gpus_per_node, "must be >= 1")


def layout_name(par) -> str:
    parts = [f"TP{par.tensor}" + ("+SP" if par.sequence_parallel else ""), f"PP{par.pipeline}"]
    if par.virtual_pipeline > 1:
        parts.append(f"VPP{par.virtual_pipeline}")
    if par.expert > 1 or par.expert_tensor_size != par.tensor:
        parts.append(f"EP{par.expert}xETP{par.expert_tensor_size}")
    return "x".join(parts) + (" distopt" if par.distributed_optimizer else "")


def same_layout(a, b) -> bool:
    keys = ("tensor", "pipeline", "virtual_pipeline", "expert", "expert_tensor_size", "distributed_optimizer")
    return all(getattr(a, k) == getattr(b, k) for k in keys)


def plan_record(plan) -> dict:
    return {"layout": layout_name(plan.parallel), "parallel": dataclasses.asdict(plan.parallel),
            "fits": plan.fits, "binding": plan.binding, "pipeline_rank": plan.pp_rank,
            "memory_bytes": plan.memory, "comm_bytes": plan.traffic,
            "step_s": {"total": plan.time.total_s, "compute": plan.time.compute_s,
                       "bubble": plan.time.bubble_s, "exposed_comm": plan.time.comm_s}}


def format_row(label, plan) -> str:
    m, t = plan.memory, plan.time
    terms = " ".join(f"{m[k] / GIB:6.1f}" for k in MEMORY_TERMS)
    return (f"{label:>3} {layout_name(plan.parallel):<34} {m['total'] / GIB:6.1f}  {terms}  "
            f"{t.total_s:7.2f} {t.compute_s:7.2f} {t.bubble_s:6.2f} {t.comm_s:6.2f}")


def format_comm(plan) -> str:
    return "      comm/step (GiB payload): " + ", ".join(
        f"{g} " + "+".join(f"{k} {v / GIB:.1f}" for k, v in kinds.items()) for g, kinds in plan.traffic.items())


def print_table(plans, rejected, configured, args, device) -> None:
    fits = [p for p in plans if p.fits]
    print(f"ernie plan: {len(plans)} valid layouts for {args.gpus} x {device.name} "
          f"({device.mem_gib:g} GiB, {args.headroom_gib:g} GiB kept free), {len(fits)} fit; "
          f"efficiency {args.efficiency}, routing imbalance {args.imbalance}, recompute {args.recompute}, "
          f"{args.attention} attention")
    if rejected:
        print("rejected by the config checks: " + ", ".join(f"{k} ({v})" for k, v in sorted(rejected.items())))
    print(f"{'#':>3} {'layout':<34} {'peak':>6}  " + " ".join(f"{k[:6]:>6}" for k in MEMORY_TERMS)
          + f"  {'step_s':>7} {'comp':>7} {'bubble':>6} {'comm':>6}   (GiB per rank)")
    for i, plan in enumerate(fits[:args.top], 1):
        print(format_row(i, plan))
        print(format_comm(plan))
    unfit = [p for p in plans if not p.fits]
    for plan in unfit[:max(0, args.top - len(fits[:args.top]))]:
        print(format_row("-", plan) + f"\n      does not fit: {plan.binding}")
    mine = next((i for i, p in enumerate(plans, 1) if same_layout(p.parallel, configured)), None)
    if mine is None:
        print("the configured layout is not valid for this many devices")
    else:
        plan = plans[mine - 1]
        state = f"fits, rank {mine} of {len(fits)}" if plan.fits else f"does NOT fit: {plan.binding}"
        print(f"configured layout {layout_name(plan.parallel)}: {state}\n{format_row(mine, plan)}")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        _check_args(args)
        cfg = C.load(args.config, args.overrides)
        cfg = _with_rl_batch(cfg) if _is_rl_config(args.config) else cfg
        validate_for_planning(cfg)
        device = parse_device(args.gpu, args.gpus_per_node)
    except C.ConfigError as err:
        print(f"ernie plan: error: {err}", file=sys.stderr)
        return 2
    opts = Options(args.efficiency, args.imbalance, args.recompute, args.headroom_gib, args.attention)
    plans, rejected = plan_all(cfg, args.gpus, cfg.data.vocab_size, device, opts)
    if args.json:
        print(json.dumps({"gpus": args.gpus, "device": dataclasses.asdict(device), "rejected": rejected,
                          "layouts": [plan_record(p) for p in plans]}, indent=1))
    else:
        print_table(plans, rejected, cfg.parallel, args, device)
        if _is_rl_config(args.config):
            print_rl_sizing(cfg, device, opts)
    return 0 if any(p.fits for p in plans) else 1


def _is_rl_config(path: str) -> bool:
    """An `ernie rl` config: an [rl] table and no [sft] (an SFT config lists its tasks under [[rl.tasks]])."""
    from megatron_ernie.config.loader import read_toml

    raw = read_toml(path)
    return "rl" in raw and "sft" not in raw


def _with_rl_batch(cfg):
    """The trainer's batch as `ernie rl` sets it: every sample of a step, prompts_per_step x n_per_prompt
    sequences (rl/main.py load_config); the config's own train.global_batch_size is not used by RL."""
    batch = cfg.rl.system.prompts_per_step * cfg.rl.sampling.n_per_prompt
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, global_batch_size=batch))


def print_rl_sizing(cfg, device, opts) -> None:
    """The rollout replica per process and the trainer het group's configured layout."""
    from megatron_ernie.plan.layouts import plan_layout
    from megatron_ernie.plan.rl import rollout_memory, trainer_world

    system = cfg.rl.system
    r = rollout_memory(cfg.model, cfg.moe, system, cfg.rl.sampling, cfg.data.vocab_size)
    fits = "fits" if r.total <= device.mem_bytes - opts.headroom_gib * GIB else "DOES NOT FIT"
    print(f"RL rollout replica (rollout_tensor {system.rollout_tensor}, {system.rollout_dtype}, "
          f"{system.rollout_batch_prompts}x{cfg.rl.sampling.n_per_prompt} sequences of <= {cfg.model.seq_length} "
          f"tokens), per process: weights {r.weights / GIB:.2f} + KV cache {r.kv_cache / GIB:.2f} + logits "
          f"{r.logits / GIB:.2f} = {r.total / GIB:.2f} GiB ({fits}; estimate)")
    world = trainer_world(cfg.slurm)
    try:
        validate_for_planning(cfg, world)
    except C.ConfigError as err:
        print(f"RL trainer group (slurm.trainer, {world} devices): configured layout invalid there: {err}")
        return
    plan = plan_layout(cfg, cfg.parallel, world, cfg.data.vocab_size, device, opts)
    state = "fits" if plan.fits else f"does NOT fit: {plan.binding}"
    print(f"RL trainer group (slurm.trainer, {world} devices): {layout_name(plan.parallel)} peak "
          f"{plan.peak / GIB:.2f} GiB per rank, {state}")


if __name__ == "__main__":
    sys.exit(main())
