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

Constants that depend on implementation details (fp32 norm statistics,
the gated unit's intermediates) were read off saved-tensor hooks on this
build (tests/dist/plan_probes.py) and are marked where used.

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
    te_norm: bool = False  # TE's fused LayerNormLinear (GPUs) instead of torch's norm (CPU)

    @property
    def tokens(self) -> int:
        return self.seq * self.micro_batch


def shape_of(model, moe, par, train, kernel: str = "unfused") -> Shape:
    tp = par.tensor
    sp = tp if (par.sequence_parallel or (moe.num_experts > 0 and tp > 1)) else 1
    return Shape(model.seq_length, train.micro_batch_size, 2 if model.dtype == "bf16" else 4, tp, sp,
                 te_norm=kernel == "flash")


def norm_bytes(model, sh: Shape) -> float:
    """torch's RMSNorm upcasts to fp32 and saves the fp32 input and normalised input plus one fp32
    statistic per token, whatever the model dtype; LayerNorm (a fused kernel) saves its input and
    two fp32 statistics (measured with saved-tensor hooks).  TE's fused norm+GEMM (GPUs) keeps the
    input and the normalised output in the model dtype and fp32 statistics (estimate)."""
    if sh.te_norm:
        return (2 * model.hidden_size * sh.act_bytes + 8) * sh.tokens / sh.sp
    if model.normalization == "LayerNorm":
        return (model.hidden_size * sh.act_bytes + 8) * sh.tokens / sh.sp
    return (2 * model.hidden_size + 1) * sh.tokens * 4 / sh.sp


def attention_bytes(model, sh: Shape, recompute: str, kernel: str = "unfused") -> float:
    """Saved tensors of one self-attention block (with its norm) for one micro-batch.

    ``kernel``: "unfused" is megatron-core's DotProductAttention (the local
    spec, what runs on CPU): the QKV GEMM output, K and V repeated to all
    heads, the fp32 softmax output (and its cast for probs @ V below fp32).
    "flash" is a fused kernel (TE on GPUs; Dao et al. 2022): Q, K, V, the
    output and an fp32 log-sum-exp per row; the scores are recomputed."""
    h, a, g = model.hidden_size, model.num_attention_heads, model.num_query_groups
    d = h // a
    t, e, n = sh.tp, sh.act_bytes, sh.tokens
    qkv_in = n * h * e / sh.sp  # the column-parallel GEMM saves its input un-gathered
    qkv_out = n * (a + 2 * g) * d * e / t
    proj_in = n * a * d * e / t
    base = norm_bytes(model, sh) + qkv_in + qkv_out + proj_in
    if kernel == "flash":
        return base + n * a / t * 4
    if recompute == "selective":  # core attention recomputed from the saved Q, K, V
        return base
    kv_repeated = 2 * n * a * d * e / t
    scores = a * sh.seq * n / t * (4 + (e if e < 4 else 0))  # fp32 softmax, plus probs in the model dtype
    dropout_mask = a * sh.seq * n / t if model.attention_dropout > 0 else 0
    return base + kv_repeated + scores + dropout_mask


def gated_mlp_bytes(rows: float, ffn_local: int, e: int, probs: bool = False) -> float:
    """A SwiGLU MLP's saved intermediates per row: fc1 output (2 ffn), two ffn-wide tensors of the
    gated unit and the fc2 input; routed experts save one more (the output scaled by the routing
    probability) and the probability (measured with saved-tensor hooks on this build)."""
    return rows * e * ((6 if probs else 5) * ffn_local + (1 if probs else 0))


def expert_rows(moe, par, sh: Shape, imbalance: float) -> float:
    """Rows a rank's local experts process: its tokens x topk, balanced over EP, gathered over expert-TP."""
    return sh.tokens / sh.sp * moe.router_topk * par.expert_tensor_size * imbalance


def mlp_bytes(layer: int, model, moe, par, sh: Shape, imbalance: float) -> float:
    h, e = model.hidden_size, sh.act_bytes
    local = sh.tokens / sh.sp
    norm_and_in = norm_bytes(model, sh) + local * h * e  # fc1 / router input
    if not is_moe_layer(layer, moe):
        return norm_and_in + gated_mlp_bytes(sh.tokens, model.ffn_hidden_size // sh.tp, e)
    router = local * moe.num_experts * 4  # fp32 logits
    rows = expert_rows(moe, par, sh, imbalance)
    experts = rows * h * e + gated_mlp_bytes(rows, moe.expert_ffn_hidden_size // par.expert_tensor_size, e, True)
    shared = 0
    if moe.shared_expert_ffn_hidden_size:
        shared = gated_mlp_bytes(sh.tokens, moe.shared_expert_ffn_hidden_size // sh.tp, e)  # input: the router's
    return norm_and_in + router + experts + shared


def layer_bytes(layer: int, model, moe, par, sh: Shape, recompute: str = "none", imbalance: float = 1.0,
                kernel: str = "unfused") -> float:
    """One layer, one micro-batch."""
    if recompute == "full":
        return sh.tokens * model.hidden_size * sh.act_bytes / sh.sp
    return attention_bytes(model, sh, recompute, kernel) + mlp_bytes(layer, model, moe, par, sh, imbalance)


def head_bytes(model, sh: Shape, vocab_padded: int) -> float:
    """Last stage: final norm, the output GEMM's input, fp32 vocab-parallel logits for the loss."""
    return norm_bytes(model, sh) + sh.tokens * model.hidden_size * sh.act_bytes / sh.sp + \
        sh.tokens * vocab_padded / sh.tp * 4


def microbatches_in_flight(pp: int, vpp: int, pp_rank: int, m: int) -> float:
    """Micro-batches whose activations (of all this rank's layers) are alive at the peak."""
    base = min(pp - pp_rank, m)
    return base if vpp == 1 else min(base * (1 + (pp - 1) / (pp * vpp)), m)


def rank_activation_bytes(model, moe, par, train, vocab_padded: int, pp_rank: int, m: int,
                          recompute: str = "none", imbalance: float = 1.0, kernel: str = "unfused") -> float:
    """Peak saved activations on one pipeline rank: per-micro-batch bytes x micro-batches in flight."""
    sh = shape_of(model, moe, par, train, kernel)
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
