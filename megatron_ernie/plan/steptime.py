"""Step-time estimate: compute roofline at a stated efficiency + exposed communication + bubble.

* Compute: training FLOPs = 3 x forward FLOPs (Narayanan et al. 2021, eq. 3:
  backward costs twice the forward), forward FLOPs per token per layer =
  2 x (matmul parameters a token touches) + 4 s h_attn for QK^T and PV
  (Megatron's count, no causal discount); MoE layers count the router, topk
  experts (times the stated routing imbalance: the busiest expert rank sets
  the pace) and the shared expert; the last stage adds the LM head.
  Selective recomputation adds the core attention's forward once more, full
  recomputation the whole forward.  A stage's FLOPs are shared evenly by its
  world / PP ranks (TP, EP and DP split the work evenly) and run at
  ``efficiency`` x the device's dense peak (FP8 peak for FP8 GEMMs with TE).
* Pipeline bubble (Narayanan et al. 2021): (PP - 1) / VPP micro-batch times.
* Exposed communication: TP, expert all-to-all / expert-TP collectives and
  pipeline p2p are not overlapped (no TE userbuffers in this project); the DP
  gradient reduction is hidden behind the last micro-batch's backward with
  ``overlap_grad_reduce``, fully exposed otherwise; the distributed
  optimizer's parameter all-gather is exposed.  Bandwidth: NVLink when the
  group's ranks share a node (megatron-core's rank order tp-cp-ep-dp-pp puts
  TP innermost, then EP, then DP), else InfiniBand; ring algorithms (comm.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_ernie.plan.comm import Traffic, wire_bytes
from megatron_ernie.plan.inventory import chunk_layers, is_moe_layer, padded_vocab


@dataclass(frozen=True)
class StepTime:
    compute_s: float
    bubble_s: float
    comm_s: float  # exposed

    @property
    def total_s(self) -> float:
        return self.compute_s + self.bubble_s + self.comm_s


def layer_forward_flops_per_token(layer: int, model, moe, imbalance: float = 1.0) -> float:
    h, a, g, s = model.hidden_size, model.num_attention_heads, model.num_query_groups, model.seq_length
    d = h // a
    attn = 2 * h * (a + 2 * g) * d + 2 * a * d * h + 4 * s * a * d
    if not is_moe_layer(layer, moe):
        return attn + 6 * h * model.ffn_hidden_size
    experts = moe.router_topk * 6 * h * moe.expert_ffn_hidden_size * imbalance
    return attn + 2 * h * moe.num_experts + experts + 6 * h * moe.shared_expert_ffn_hidden_size


def _recompute_extra(layer: int, model, moe, recompute: str, imbalance: float) -> float:
    if recompute == "full":
        return layer_forward_flops_per_token(layer, model, moe, imbalance)
    if recompute == "selective":
        return 4 * model.seq_length * model.hidden_size
    return 0.0


def stage_flops_per_token(model, moe, par, vocab_size: int, pp_rank: int, recompute: str = "none",
                          imbalance: float = 1.0) -> float:
    """Training FLOPs per token of one pipeline rank's layers (all its chunks)."""
    total = 0.0
    for c in range(par.virtual_pipeline):
        for layer in chunk_layers(model.num_layers, par.pipeline, par.virtual_pipeline, pp_rank, c):
            fwd = layer_forward_flops_per_token(layer, model, moe, imbalance)
            total += 3 * fwd + _recompute_extra(layer, model, moe, recompute, imbalance)
    if pp_rank == par.pipeline - 1:
        total += 3 * 2 * model.hidden_size * padded_vocab(vocab_size, par.tensor)
    return total


def peak_flops(device, model, fp8) -> float:
    """Dense peak of the GEMMs: FP8 with TE (if the device has it), bf16, or TF32 (half bf16) for fp32."""
    if fp8 is not None and fp8.recipe != "off" and fp8.backend == "te" and device.tflops_fp8 > 0:
        return device.tflops_fp8 * 1e12
    return device.tflops_bf16 * 1e12 * (1.0 if model.dtype == "bf16" else 0.5)


def group_bandwidth(group: str, par, world: int, device) -> float:
    """Bytes/s per rank: NVLink if the group's ranks share a node, else InfiniBand."""
    span = {"tp": par.tensor, "ep": par.expert * par.expert_tensor_size, "etp": par.expert_tensor_size,
            "dp": world // par.pipeline, "expert_dp": world // par.pipeline, "pp": world, "embd": world}[group]
    gbps = device.nvlink_gbps if span <= device.gpus_per_node else device.ib_gbps
    return gbps * 1e9


def group_size(group: str, par, world: int) -> int:
    dp = world // (par.tensor * par.pipeline * par.context)
    edp = world // (par.expert_tensor_size * par.expert * par.pipeline)
    return {"tp": par.tensor, "ep": par.expert, "etp": par.expert_tensor_size, "dp": dp,
            "expert_dp": edp, "pp": par.pipeline, "embd": 2}[group]


def comm_seconds(traffic: Traffic, par, world: int, device, kinds=None) -> dict[str, float]:
    """Seconds each group's traffic (of the given collective kinds) takes on the wire, before overlap."""
    out = {}
    for group, by_kind in traffic.groups.items():
        n = group_size(group, par, world)
        wire = sum(wire_bytes(k, payload, n) for k, payload in by_kind.items() if kinds is None or k in kinds)
        out[group] = wire / group_bandwidth(group, par, world, device)
    return out


GRAD_REDUCTIONS = ("all_reduce", "reduce_scatter")


def exposed_comm_seconds(traffic: Traffic, par, world: int, device, mb_s: float) -> float:
    secs = comm_seconds(traffic, par, world, device)
    in_step = sum(v for k, v in secs.items() if k not in ("dp", "expert_dp"))
    grads = comm_seconds(traffic, par, world, device, GRAD_REDUCTIONS)
    reduce_s = grads.get("dp", 0.0) + grads.get("expert_dp", 0.0)
    gather_s = secs.get("dp", 0.0) + secs.get("expert_dp", 0.0) - reduce_s
    if par.overlap_grad_reduce:  # hidden behind the last micro-batch's backward (2/3 of its time)
        reduce_s = max(0.0, reduce_s - 2 / 3 * mb_s)
    return in_step + reduce_s + gather_s


def step_time(model, moe, par, train, vocab_size: int, world: int, device, traffic: Traffic, fp8=None,
              efficiency: float = 0.4, recompute: str = "none", imbalance: float = 1.0) -> StepTime:
    """One optimizer step on the slowest pipeline rank (see the module docstring)."""
    dp = world // (par.tensor * par.pipeline * par.context)
    m = train.global_batch_size // (train.micro_batch_size * dp)
    tokens_mb = train.micro_batch_size * model.seq_length
    flops = max(stage_flops_per_token(model, moe, par, vocab_size, r, recompute, imbalance)
                for r in range(par.pipeline))
    # a micro-batch's work on a stage is split over TP x CP ranks (EP/ETP move work, they do not add it)
    mb_s = flops * tokens_mb / (par.tensor * par.context) / (peak_flops(device, model, fp8) * efficiency)
    bubble = (par.pipeline - 1) / par.virtual_pipeline * mb_s
    return StepTime(m * mb_s, bubble, exposed_comm_seconds(traffic, par, world, device, mb_s))
