"""Activation memory per micro-batch and the micro-batches in flight (estimates).

Method: Korthikanti et al. 2022, "Reducing Activation Recomputation in Large
Transformer Models" (§4): count the tensors autograd saves for backward in
one transformer layer, divide the sequence-parallel regions (norms, the
inputs of the column-parallel GEMMs, which megatron-core saves un-gathered and
re-gathers in backward) by TP when sequence parallelism is on and the
tensor-parallel regions (QKV, attention scores, FFN intermediates) by TP.
The paper's constant 34 sbh + 5 a s^2 b assumes MHA, a 4h GELU MLP and
dropout; here every term is written out for what this project builds: GQA
with the K/V heads expanded for megatron-core's unfused DotProductAttention,
RoPE, RMSNorm, SwiGLU (fc1 output, silu output and fc2 input) and no dropout
masks unless dropout > 0.  Selective recomputation drops the core-attention
terms (the paper's "5 a s^2 b"); full recomputation keeps only each layer's
input.

MoE layers (not in the paper): the router's fp32 logits and scores, and per
local expert row the GEMM inputs/outputs; a rank's experts receive
``tokens * topk * imbalance`` rows (balanced routing: imbalance = 1), gathered
over expert-TP.

In flight (Narayanan et al. 2021; Megatron-LM's theoretical_memory_usage):
1F1B keeps min(PP - r, m) micro-batches on pipeline rank r; the interleaved
schedule keeps PP * (1 + (PP - 1) / (PP * VPP)) of them on rank 0.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_ernie.plan.inventory import chunk_layers, is_moe_layer

RECOMPUTE = ("none", "selective", "full")
ATTENTION_KERNELS = ("flash", "unfused")


@dataclass(frozen=True)
class Shape:
    seq: int
    micro_batch: int
    act_bytes: int  # 2 for bf16, 4 for fp32
    tp: int
    sp: int  # TP when sequence parallel, else 1

    @property
    def tokens(self) -> int:
        return self.seq * self.micro_batch


def shape_of(model, moe, par, train) -> Shape:
    tp = par.tensor
    sp = tp if (par.sequence_parallel or (moe.num_experts > 0 and tp > 1)) else 1
    return Shape(model.seq_length, train.micro_batch_size, 2 if model.dtype == "bf16" else 4, tp, sp)


def attention_bytes(model, sh: Shape, recompute: str, kernel: str = "unfused") -> float:
    """Saved tensors of one self-attention block for one micro-batch.

    ``kernel``: "unfused" is megatron-core's DotProductAttention (the local
    spec, what runs on CPU): it materialises the a x s x s scores. "flash" is
    a fused kernel (TE on GPUs; Dao et al. 2022): it saves Q, K, V, the output
    and an fp32 log-sum-exp per row, and recomputes the scores in backward."""
    h, a, g = model.hidden_size, model.num_attention_heads, model.num_query_groups
    d = h // a
    t, e, n = sh.tp, sh.act_bytes, sh.tokens
    norm_and_qkv_in = 2 * n * h * e / sh.sp
    proj_in = n * a * d * e / t
    if kernel == "flash":
        return norm_and_qkv_in + n * (a + 2 * g) * d * e / t + proj_in + n * a / t * 4
    if recompute == "selective":  # core attention recomputed from the saved Q, K, V
        return norm_and_qkv_in + n * (a + 2 * g) * d * e / t + proj_in
    qkv_expanded = 3 * n * a * d * e / t  # Q and the K/V repeated to all heads
    scores = a * sh.seq * n * e / t  # softmax output, reused by probs @ V
    dropout_mask = a * sh.seq * n / t if model.attention_dropout > 0 else 0
    return norm_and_qkv_in + qkv_expanded + scores + dropout_mask + proj_in


def swiglu_bytes(rows: float, h: int, ffn_local: int, e: int, in_split: int) -> float:
    """fc1 input, fc1 output (2 ffn), silu output, fc2 input: a gated MLP's saved tensors."""
    return rows * e * (h / in_split + 4 * ffn_local)


def expert_rows(moe, par, sh: Shape, imbalance: float) -> float:
    """Rows a rank's local experts process: its tokens x topk, balanced over EP, gathered over expert-TP."""
    return sh.tokens / sh.sp * moe.router_topk * par.expert_tensor_size * imbalance


def mlp_bytes(layer: int, model, moe, par, sh: Shape, imbalance: float) -> float:
    h, e = model.hidden_size, sh.act_bytes
    norm_in = sh.tokens * h * e / sh.sp
    if not is_moe_layer(layer, moe):
        return norm_in + swiglu_bytes(sh.tokens, h, model.ffn_hidden_size // sh.tp, e, sh.sp)
    local = sh.tokens / sh.sp
    router = local * h * e + 2 * local * moe.num_experts * 4  # router input; fp32 logits and scores
    rows = expert_rows(moe, par, sh, imbalance)
    experts = swiglu_bytes(rows, h, moe.expert_ffn_hidden_size // par.expert_tensor_size, e, 1) + rows * h * e
    shared = 0
    if moe.shared_expert_ffn_hidden_size:
        shared = swiglu_bytes(sh.tokens, h, moe.shared_expert_ffn_hidden_size // sh.tp, e, sh.sp)
    return norm_in + router + experts + shared


def layer_bytes(layer: int, model, moe, par, sh: Shape, recompute: str = "none", imbalance: float = 1.0,
                kernel: str = "unfused") -> float:
    """One layer, one micro-batch."""
    if recompute == "full":
        return sh.tokens * model.hidden_size * sh.act_bytes / sh.sp
    return attention_bytes(model, sh, recompute, kernel) + mlp_bytes(layer, model, moe, par, sh, imbalance)


def head_bytes(model, sh: Shape, vocab_padded: int) -> float:
    """Last stage: final norm and output GEMM inputs, fp32 vocab-parallel softmax."""
    return 2 * sh.tokens * model.hidden_size * sh.act_bytes / sh.sp + sh.tokens * vocab_padded / sh.tp * 4


def microbatches_in_flight(pp: int, vpp: int, pp_rank: int, m: int) -> float:
    """Micro-batches whose activations (of all this rank's layers) are alive at the peak."""
    base = min(pp - pp_rank, m)
    return base if vpp == 1 else min(base * (1 + (pp - 1) / (pp * vpp)), m)


def rank_activation_bytes(model, moe, par, train, vocab_padded: int, pp_rank: int, m: int,
                          recompute: str = "none", imbalance: float = 1.0, kernel: str = "unfused") -> float:
    """Peak saved activations on one pipeline rank: per-micro-batch bytes x micro-batches in flight."""
    sh = shape_of(model, moe, par, train)
    pp, vpp = par.pipeline, par.virtual_pipeline
    layers = [i for c in range(vpp) for i in chunk_layers(model.num_layers, pp, vpp, pp_rank, c)]
    per_mb = sum(layer_bytes(i, model, moe, par, sh, recompute, imbalance, kernel) for i in layers)
    extra = 0.0
    if recompute == "full":  # one layer's activations rebuilt during its backward
        extra = max(layer_bytes(i, model, moe, par, sh, "none", imbalance, kernel) for i in layers)
    if pp_rank == pp - 1:
        extra += head_bytes(model, sh, vocab_padded)
    return per_mb * microbatches_in_flight(pp, vpp, pp_rank, m) + extra


def moe_dispatch_bytes(model, moe, par, sh: Shape, imbalance: float) -> float:
    """Transient all-to-all send/receive buffers of one MoE layer (permuted tokens, both ways)."""
    if moe.num_experts == 0:
        return 0.0
    return 2 * expert_rows(moe, par, sh, imbalance) * model.hidden_size * sh.act_bytes
