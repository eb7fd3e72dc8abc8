"""Every layout for N devices that the project's own config checks accept, costed.

Candidates: TP (dividing the heads, at most one node), PP (dividing the
layers), VPP (dividing the layers per stage, <= 8), EP (dividing the experts),
expert-TP (a divisor of TP), with and without the distributed optimizer;
sequence parallelism whenever TP > 1 (it only saves memory, for the same
traffic).  Each candidate replaces ``[parallel]`` of the user's config and
goes through ``config.validate(cfg, N)`` — the same rules `ernie pretrain`
applies — so the planner never proposes a layout the trainer would refuse.
Context parallelism and the other sections stay as configured.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from megatron_ernie import config as C
from megatron_ernie.plan import activations as A
from megatron_ernie.plan.comm import step_traffic
from megatron_ernie.plan.inventory import chunk_layers, is_moe_layer, layer_linear_elements, padded_vocab, param_shape_key
from megatron_ernie.plan.memory import RankPosition, StaticMemory, dp_sizes, static_memory
from megatron_ernie.plan.steptime import StepTime, step_time


@dataclass(frozen=True)
class Options:
    efficiency: float = 0.4  # share of the dense peak the GEMMs reach
    imbalance: float = 1.0  # busiest expert rank's load / the mean (1 = balanced routing)
    recompute: str = "none"
    headroom_gib: float = 0.0  # kept free on the device (allocator fragmentation, NCCL, CUDA context)
    attention: str = "flash"  # flash (TE fused attention on GPUs) | unfused (megatron-core local spec, CPU)


@dataclass
class LayoutPlan:
    parallel: object
    memory: dict  # bytes per term on the rank with the highest peak
    pp_rank: int  # that rank
    traffic: dict  # {group: {kind: payload bytes}} on pipeline rank 0
    time: StepTime
    fits: bool = True
    binding: str = ""
    notes: list = field(default_factory=list)

    @property
    def peak(self) -> float:
        return self.memory["total"]


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidate_parallels(model, moe, par, world: int, gpus_per_node: int):
    for tp in (t for t in divisors(world) if t <= gpus_per_node and model.num_attention_heads % t == 0):
        for pp in (p for p in divisors(world // tp) if model.num_layers % p == 0):
            vpps = [v for v in divisors(model.num_layers // pp) if v <= 8] if pp > 1 else [1]
            eps = [e for e in divisors(world // pp) if moe.num_experts % e == 0] if moe.num_experts else [1]
            for vpp in vpps:
                for ep in eps:
                    for etp in (d for d in divisors(tp) if moe.num_experts or d == tp):
                        for distopt in (True, False):
                            yield dataclasses.replace(
                                par, tensor=tp, pipeline=pp, virtual_pipeline=vpp, expert=ep,
                                expert_tensor=etp, sequence_parallel=tp > 1, distributed_optimizer=distopt)


PLANNED_SECTIONS = ("model", "moe", "parallel", "train", "fp8", "elastic")


def validate_for_planning(cfg, world: int | None = None) -> None:
    """config.validate restricted to what a layout depends on: planning needs no data files,
    run directory or cluster, so a login node can plan a config whose data lives elsewhere."""
    for name in PLANNED_SECTIONS:
        getattr(cfg, name).validate(name)
    if world is not None:
        from megatron_ernie.config.checks import check_all

        check_all(cfg, world)


def valid_layouts(cfg, world: int, gpus_per_node: int):
    """(valid ParallelConfigs, {rejected field: count}) under the project's checks."""
    valid, rejected = [], {}
    for par in candidate_parallels(cfg.model, cfg.moe, cfg.parallel, world, gpus_per_node):
        try:
            validate_for_planning(dataclasses.replace(cfg, parallel=par), world)
        except C.ConfigError as err:
            rejected[err.field] = rejected.get(err.field, 0) + 1
            continue
        valid.append(par)
    return valid, rejected


def fp8_weight_cache_bytes(cfg, par, pp_rank: int, vocab_size: int) -> int:
    """TE keeps an FP8 copy (and its transpose) of every FP8 GEMM weight: ~2 B per element (estimate)."""
    fp8 = cfg.fp8
    if fp8.recipe == "off" or fp8.backend != "te" or fp8.param_gather:
        return 0
    model, moe, lo, hi = cfg.model, cfg.moe, fp8.bf16_layers_at_start, cfg.model.num_layers - fp8.bf16_layers_at_end
    shape = param_shape_key(par)
    layers = (i for c in range(par.virtual_pipeline)
              for i in chunk_layers(model.num_layers, par.pipeline, par.virtual_pipeline, pp_rank, c))
    return 2 * sum(layer_linear_elements(is_moe_layer(i, moe), model, moe, shape, fp8.experts_in_fp8)
                   for i in layers if lo <= i < hi)


def rank_memory(cfg, par, world: int, vocab_size: int, pp_rank: int, opts: Options) -> dict:
    model, moe, train = cfg.model, cfg.moe, cfg.train
    dp, _ = dp_sizes(par, world)
    m = train.global_batch_size // (train.micro_batch_size * dp)
    st: StaticMemory = static_memory(model, moe, par, vocab_size, world, RankPosition(pp_rank, None, None), cfg.fp8)
    acts = A.rank_activation_bytes(model, moe, par, train, padded_vocab(vocab_size, par.tensor), pp_rank, m,
                                   opts.recompute, opts.imbalance, opts.attention)
    dispatch = A.moe_dispatch_bytes(model, moe, par, A.shape_of(model, moe, par, train), opts.imbalance)
    terms = {"params": st.params, "grads": st.grads, "optimizer": st.optimizer,
             "fp8_weights": fp8_weight_cache_bytes(cfg, par, pp_rank, vocab_size),
             "activations": acts, "moe_dispatch": dispatch}
    terms["total"] = sum(terms.values())
    return terms


BINDING_FIX = {
    "params": "more tensor/pipeline/expert parallelism",
    "grads": "more tensor/pipeline/expert parallelism",
    "optimizer": "the distributed optimizer or more data parallelism",
    "fp8_weights": "fp8.param_gather or more model parallelism",
    "activations": "more tensor/pipeline parallelism or a smaller micro-batch (activation recomputation "
                   "is not a trainer option yet; ernie plan --recompute shows what it would save)",
    "moe_dispatch": "more expert parallelism or a lower routing imbalance",
}


def plan_layout(cfg, par, world: int, vocab_size: int, device, opts: Options) -> LayoutPlan:
    per_rank = [rank_memory(cfg, par, world, vocab_size, r, opts) for r in range(par.pipeline)]
    worst = max(range(par.pipeline), key=lambda r: per_rank[r]["total"])
    traffic = step_traffic(cfg.model, cfg.moe, par, cfg.train, vocab_size, world, 0, opts.imbalance, cfg.fp8)
    time = step_time(cfg.model, cfg.moe, par, cfg.train, vocab_size, world, device, traffic, cfg.fp8,
                     opts.efficiency, opts.recompute, opts.imbalance)
    mem = per_rank[worst]
    plan = LayoutPlan(par, mem, worst, traffic.groups, time)
    budget = device.mem_bytes - opts.headroom_gib * 2**30
    if mem["total"] > budget:
        term = max(BINDING_FIX, key=lambda k: mem[k])
        fix = BINDING_FIX[term]
        if term == "optimizer" and par.distributed_optimizer:
            fix = "more data parallelism (more devices, or a smaller TP x PP x EP product)"
        plan.fits = False
        plan.binding = (f"{term} ({mem[term] / 2**30:.1f} GiB of {mem['total'] / 2**30:.1f} GiB on pipeline rank "
                        f"{worst}, device {budget / 2**30:.0f} GiB): try {fix}")
    return plan


def plan_all(cfg, world: int, vocab_size: int, device, opts: Options = Options()):
    """(plans sorted: fitting ones by step time, then the rest by peak memory; rejected-field counts)."""
    valid, rejected = valid_layouts(cfg, world, device.gpus_per_node)
    plans = [plan_layout(cfg, par, world, vocab_size, device, opts) for par in valid]
    plans.sort(key=lambda p: (not p.fits, p.time.total_s if p.fits else p.peak))
    return plans, rejected
