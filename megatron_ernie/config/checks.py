"""Rules that relate two config sections, checked before any process starts work.

Each rule names the field to change.  They mirror what megatron-core would
otherwise assert (deep inside model construction) or silently accept.
"""

from __future__ import annotations

from megatron_ernie.config.errors import ConfigError, require
from megatron_ernie.runtime.dims import dims_from_config



def check_model_vs_parallel(model, moe, par) -> None:
    tp, pp, vpp = par.tensor, par.pipeline, par.virtual_pipeline
    require(model.num_attention_heads % tp == 0, "model.num_attention_heads", model.num_attention_heads,
           f"must be divisible by parallel.tensor={tp}")
    require(model.num_query_groups % tp == 0, "model.num_query_groups", model.num_query_groups,
           f"must be divisible by parallel.tensor={tp}")
    require(model.ffn_hidden_size % tp == 0, "model.ffn_hidden_size", model.ffn_hidden_size,
           f"must be divisible by parallel.tensor={tp}")
    require(model.num_layers % (pp * vpp) == 0, "model.num_layers", model.num_layers,
           f"must be divisible by pipeline*virtual_pipeline = {pp}*{vpp}")
    if par.sequence_parallel or (moe.num_experts and tp > 1):
        require(model.seq_length % tp == 0, "model.seq_length", model.seq_length,
               f"sequence parallelism needs it divisible by parallel.tensor={tp}")
    require(par.context == 1, "parallel.context", par.context,
           "context parallelism needs Transformer Engine attention; use 1 on this build")


def check_moe_vs_parallel(model, moe, par) -> None:
    if moe.num_experts == 0:
        require(par.expert == 1, "parallel.expert", par.expert, "expert parallelism needs moe.num_experts > 0")
        return
    require(moe.num_experts % par.expert == 0, "moe.num_experts", moe.num_experts,
           f"must be divisible by parallel.expert={par.expert}")
    require(moe.expert_ffn_hidden_size % par.expert_tensor_size == 0, "moe.expert_ffn_hidden_size",
           moe.expert_ffn_hidden_size, f"must be divisible by parallel.expert_tensor={par.expert_tensor_size}")
    require(moe.first_dense_layers < model.num_layers, "moe.first_dense_layers", moe.first_dense_layers,
           f"must be smaller than model.num_layers={model.num_layers}")
    require(par.tensor == 1 or par.sequence_parallel, "parallel.sequence_parallel", par.sequence_parallel,
           "megatron-core requires sequence parallelism for MoE with tensor parallelism; set it to true")
    if moe.grouped_gemm:
        raise ConfigError("moe.grouped_gemm", True, "grouped GEMM needs Transformer Engine on a GPU; set it to false")


def check_batch(train, par, world: int) -> int:
    """Returns the number of micro-batches per step."""
    dims = dims_from_config(par, world)
    n = dims.num_microbatches(train.global_batch_size, train.micro_batch_size)
    if par.virtual_pipeline > 1:
        require(n % par.pipeline == 0, "train.global_batch_size", train.global_batch_size,
               f"interleaved pipelining needs the micro-batch count ({n}) divisible by parallel.pipeline={par.pipeline}")
    return n


def check_top1_routing(elastic, moe) -> None:
    """Top-1 with softmax over the selected expert gives every token weight 1: the router
    would get no gradient (megatron-core refuses it); top-1 needs pre-softmax routing."""
    if moe.num_experts == 0 or moe.router_pre_softmax or moe.score_function != "softmax":
        return
    topks = set(elastic.topk) if elastic.enabled else set()
    if moe.router_topk == 1 or 1 in topks:
        field = "moe.router_topk" if moe.router_topk == 1 else "elastic.topk"
        require(False, field, moe.router_topk if moe.router_topk == 1 else elastic.topk,
               "top-1 routing needs moe.router_pre_softmax = true (softmax over all experts)")


def check_elastic_vs_model(elastic, model, moe) -> None:
    """Every elastic choice must be a sub-network of this model: at most its layers, experts and
    top-k, and a width fraction that keeps a whole number of expert FFN channels."""
    if not elastic.enabled:
        return
    from megatron_ernie.elastic.subnet import kept_channels, layer_ranking, target_subnets

    limits = {"depth": (model.num_layers, "model.num_layers"), "experts": (max(moe.num_experts, 1), "moe.num_experts"),
              "topk": (max(moe.router_topk, 1), "moe.router_topk")}
    for axis, (limit, source) in limits.items():
        bad = [v for v in getattr(elastic, axis) if not 1 <= v <= limit]
        require(not bad, f"elastic.{axis}", list(getattr(elastic, axis)),
               f"{bad} exceeds {source}={limit}: the supernet has no such sub-network; use values in 1..{limit}")
    width = moe.expert_ffn_hidden_size if moe.num_experts else model.ffn_hidden_size
    for f in elastic.ffn:
        kept = kept_channels(f, width)
        require(kept >= 1 and abs(kept - f * width) < 1e-6, "elastic.ffn", list(elastic.ffn),
               f"{f} x {width} FFN channels is not a whole number; use fractions like "
               f"{sorted({round(k / width, 6) for k in (width // 4, width // 2, width) if k})}")
    layer_ranking(model.num_layers, elastic.layer_order)  # a permutation of the layers, else ConfigError
    target_subnets(elastic, model, moe)  # every elastic.targets entry is a sub-network of this model


def check_elastic_vs_parallel(elastic, model, moe, par) -> None:
    """Every pipeline stage must keep at least one layer in every allowed depth."""
    if not elastic.enabled:
        return
    from megatron_ernie.elastic.subnet import choices, kept_layers, layer_ranking, target_subnets

    ranking = layer_ranking(model.num_layers, elastic.layer_order)
    per_stage = model.num_layers // (par.pipeline * par.virtual_pipeline)
    depths = {*choices(elastic, model, moe)["depth"], *(t.depth for t in target_subnets(elastic, model, moe))}
    for depth in sorted(depths):
        keep = kept_layers(depth, ranking)
        stages = {i // per_stage for i in keep}
        require(len(stages) == par.pipeline * par.virtual_pipeline, "elastic.depth", depth,
               f"leaves a pipeline stage without layers at pipeline*virtual_pipeline = "
               f"{par.pipeline * par.virtual_pipeline}; use depths >= that or set elastic.layer_order")


def check_fp8(fp8, model, par) -> None:
    from megatron_ernie.config.fp8 import validate_layer_counts

    validate_layer_counts(fp8, "fp8", model.num_layers, par.pipeline)
    require(not fp8.param_gather or par.distributed_optimizer, "fp8.param_gather", fp8.param_gather,
           "FP8 parameter all-gather needs parallel.distributed_optimizer = true")


def check_all(cfg, world: int) -> None:
    check_fp8(cfg.fp8, cfg.model, cfg.parallel)
    check_top1_routing(cfg.elastic, cfg.moe)
    check_model_vs_parallel(cfg.model, cfg.moe, cfg.parallel)
    check_moe_vs_parallel(cfg.model, cfg.moe, cfg.parallel)
    check_elastic_vs_parallel(cfg.elastic, cfg.model, cfg.moe, cfg.parallel)
    check_batch(cfg.train, cfg.parallel, world)


def check_rl_tasks(tasks) -> None:
    """Every [[rl.tasks]] entry names a registered task (importing its module first), so an
    unknown name fails at config load instead of in a reward worker minutes into a run."""
    from megatron_ernie.config.rl import TaskConfig

    if tuple(tasks) == (TaskConfig(),):  # the default: nothing to import for a pretraining config
        return
    from megatron_ernie.rl.tasks import resolve_task

    for i, task in enumerate(tasks):
        resolve_task(task, f"rl.tasks[{i}]")
