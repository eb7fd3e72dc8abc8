"""The parameters one rank holds, as megatron-core builds them, in its order.

Shapes follow megatron-core 0.16.1's GPT modules with the local (non-TE)
layer spec this project uses on CPU (and TE's fused variants, which hold the
same number of elements): RMSNorm weight (LayerNorm: weight and bias), a
fused QKV without bias (``(heads + 2 * query_groups) * head_dim`` rows, split
over TP), the output projection, a gated SwiGLU MLP (``fc1`` has ``2 * ffn``
rows), and per MoE layer a router matrix (replicated), ``num_experts / EP``
local experts split over expert-TP and an optional shared expert split over
TP.  The order is ``named_parameters()`` order, which megatron-core's DDP
walks in reverse to lay out its gradient buffers (memory.py needs it to
reproduce the distributed optimizer's padding and shards exactly).

Which ranks hold what: the embedding sits on pipeline rank 0 / chunk 0, the
final norm and output layer on the last rank / last chunk, and chunk ``c`` of
pipeline rank ``r`` holds layers ``[c * L/vpp + r * L/(pp*vpp), ...)``
(megatron-core ``get_transformer_layer_offset``).  All TP/EP/DP ranks of one
pipeline stage hold the same shapes, because the config checks demand even
splits.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from functools import lru_cache


@dataclass(frozen=True)
class Param:
    local_name: str  # within its decoder layer ("mlp.linear_fc1.weight"), or the full name outside layers
    numel: int
    expert: bool = False  # megatron-core ``allreduce = False``: reduced over expert-DP
    shared_embedding: bool = False  # tied embedding with PP > 1: its own DDP bucket
    layer: int = -1  # decoder layer index; -1 for embedding, final norm and output layer

    @property
    def name(self) -> str:
        return self.local_name if self.layer < 0 else f"decoder.layers.{self.layer}.{self.local_name}"

    @property
    def is_linear_weight(self) -> bool:
        return ".linear_" in self.local_name


def padded_vocab(vocab_size: int, tp: int) -> int:
    """model/build.py:padded_vocab_size, repeated here so planning needs no torch."""
    step = math.lcm(128, tp)
    return (vocab_size + step - 1) // step * step


def expert_params_take_expert_path(par) -> bool:
    """megatron-core marks routed experts ``allreduce=False`` at EP > 1; this project
    also does at EP = 1 with expert-TP < TP (model/build.py:reduce_experts_over_expert_dp)."""
    return par.expert > 1 or par.expert_tensor_size != par.tensor


def _norm(prefix: str, model) -> list[tuple]:
    names = ["weight"] if model.normalization == "RMSNorm" else ["weight", "bias"]
    return [(f"{prefix}.{n}", model.hidden_size, False) for n in names]


def _attention(model, tp: int) -> list[tuple]:
    h = model.hidden_size
    head_dim = h // model.num_attention_heads
    q = model.num_attention_heads * head_dim
    kv = model.num_query_groups * head_dim
    return [("self_attention.linear_proj.weight", h * q // tp, False),
            ("self_attention.linear_qkv.weight", (q + 2 * kv) // tp * h, False)]


def _mlp(prefix: str, h: int, ffn: int, tp: int, expert: bool = False) -> list[tuple]:
    return [(f"{prefix}.linear_fc1.weight", 2 * ffn // tp * h, expert),
            (f"{prefix}.linear_fc2.weight", h * (ffn // tp), expert)]


def _moe(model, moe, par) -> list[tuple]:
    h, expert = model.hidden_size, expert_params_take_expert_path(par)
    out = [("mlp.router.weight", moe.num_experts * h, False)]
    for i in range(moe.num_experts // par.expert):
        out += _mlp(f"mlp.experts.local_experts.{i}", h, moe.expert_ffn_hidden_size, par.expert_tensor_size, expert)
    if moe.shared_expert_ffn_hidden_size:
        out += _mlp("mlp.shared_experts", h, moe.shared_expert_ffn_hidden_size, par.tensor)
    return out


def is_moe_layer(layer: int, moe) -> bool:
    return moe.num_experts > 0 and layer >= moe.first_dense_layers


@lru_cache(maxsize=1024)
def _layer_template(moe_layer: bool, model, moe, par) -> tuple:
    """(local name, numel, expert) of every parameter of a dense or an MoE layer, in module order."""
    out = _norm("input_layernorm", model) + _attention(model, par.tensor) + _norm("pre_mlp_layernorm", model)
    if moe_layer:
        return tuple(out + _moe(model, moe, par))
    return tuple(out + _mlp("mlp", model.hidden_size, model.ffn_hidden_size, par.tensor))


@lru_cache(maxsize=65536)
def layer_params(layer: int, model, moe, par) -> tuple[Param, ...]:
    """One decoder layer (global index ``layer``) on one rank."""
    return tuple(Param(name, numel, expert, False, layer)
                 for name, numel, expert in _layer_template(is_moe_layer(layer, moe), model, moe, par))


@lru_cache(maxsize=1024)
def layer_linear_elements(moe_layer: bool, model, moe, par, with_experts: bool) -> int:
    """Elements of a layer's GEMM weights (routed experts' only if ``with_experts``)."""
    return sum(n for name, n, expert in _layer_template(moe_layer, model, moe, par)
               if ".linear_" in name and (with_experts or not expert))


def chunk_layers(num_layers: int, pp: int, vpp: int, pp_rank: int, chunk: int) -> range:
    """Global layer indices of one model chunk (megatron-core get_transformer_layer_offset)."""
    per_chunk = num_layers // (pp * vpp)
    start = chunk * (num_layers // vpp) + pp_rank * per_chunk
    return range(start, start + per_chunk)


def chunk_params(model, moe, par, vocab_size: int, pp_rank: int, chunk: int) -> list[Param]:
    """Every parameter of model chunk ``chunk`` on pipeline rank ``pp_rank``, in module order."""
    pp, vpp = par.pipeline, par.virtual_pipeline
    first, last = pp_rank == 0 and chunk == 0, pp_rank == pp - 1 and chunk == vpp - 1
    tied = not model.untie_embeddings_and_output_weights
    rows = padded_vocab(vocab_size, par.tensor) // par.tensor * model.hidden_size
    out = [Param("embedding.word_embeddings.weight", rows, shared_embedding=tied and pp > 1)] if first else []
    layer_shape = dataclasses.replace(par, pipeline=1, virtual_pipeline=1)  # a layer's shapes ignore PP
    for layer in chunk_layers(model.num_layers, pp, vpp, pp_rank, chunk):
        out += layer_params(layer, model, moe, layer_shape)
    if last:
        out += [Param(name, n) for name, n, _ in _norm("decoder.final_layernorm", model)]
        if not tied or pp > 1:
            out.append(Param("output_layer.weight", rows, shared_embedding=tied))
    return out


def param_shape_key(par):
    """The ParallelConfig fields that decide parameter shapes (others normalised, for caching)."""
    return dataclasses.replace(par, distributed_optimizer=False, overlap_grad_reduce=False,
                               sequence_parallel=False, expert_tensor=par.expert_tensor_size)


def rank_chunks(model, moe, par, vocab_size: int, pp_rank: int) -> tuple[tuple[Param, ...], ...]:
    """Every chunk of pipeline rank ``pp_rank`` (cached: the planner asks for it many times per layout)."""
    return _rank_chunks(model, moe, param_shape_key(par), vocab_size, pp_rank)


@lru_cache(maxsize=4096)
def _rank_chunks(model, moe, par, vocab_size: int, pp_rank: int) -> tuple[tuple[Param, ...], ...]:
    return tuple(tuple(chunk_params(model, moe, par, vocab_size, pp_rank, c)) for c in range(par.virtual_pipeline))
