"""Exact parameter counts and FLOPs per token of a (sub-)network, from the config.

The counts mirror the megatron-core GPT modules this project builds (RMSNorm
weights, fused QKV without biases, gated SwiGLU MLPs, untied embeddings by
default, a router matrix per MoE layer) and are checked against the
parameters of a built model by the tests, so the search's budget and the
extracted checkpoint's size agree exactly.  "Active" counts what one token
touches: everything except the experts it is not routed to.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_ernie.elastic.subnet import Subnet, kept_channels, kept_layers, layer_ranking


@dataclass(frozen=True)
class Size:
    total: int
    active: int
    flops_per_token: int  # forward matmul FLOPs (2 x active matmul params), attention scores excluded


def _attention(h: int, heads: int, groups: int) -> int:
    head_dim = h // heads
    return h * (h + 2 * groups * head_dim) + h * h + 2 * h  # qkv, proj, two norms


def _moe_layer(h: int, experts: int, topk: int, width: int, shared: int) -> tuple[int, int]:
    expert = 3 * h * width
    shared_params = 3 * h * shared
    router = experts * h
    return router + experts * expert + shared_params, router + topk * expert + shared_params


def subnet_size(model, moe, vocab_size: int, subnet: Subnet, layer_order=()) -> Size:
    h = model.hidden_size
    embed = vocab_size * h * (2 if model.untie_embeddings_and_output_weights else 1) + h  # + final norm
    total = active = embed
    matmul_active = vocab_size * h  # output layer
    keep = kept_layers(subnet.depth, layer_ranking(model.num_layers, layer_order))
    for layer in sorted(keep):
        attn = _attention(h, model.num_attention_heads, model.num_query_groups)
        if moe.num_experts == 0 or layer < moe.first_dense_layers:
            mlp_total = mlp_active = 3 * h * model.ffn_hidden_size
        else:
            width = kept_channels(subnet.ffn, moe.expert_ffn_hidden_size)
            mlp_total, mlp_active = _moe_layer(h, subnet.experts, subnet.topk, width,
                                               moe.shared_expert_ffn_hidden_size)
        total += attn + mlp_total
        active += attn + mlp_active
        matmul_active += attn - 2 * h + mlp_active
    return Size(total, active, 2 * matmul_active)
