"""Build the ERNIE-style MoE GPT model on megatron-core.

Fixed order, one function each: TransformerConfig from our sections ->
layer specs -> one GPTModel per virtual-pipeline chunk -> layout-invariant
initialisation -> megatron-core DDP.  The caller passes the process groups.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

from megatron_ernie.model import init as model_init
from megatron_ernie.model.extensions import Extensions
from megatron_ernie.model.specs import decoder_block_spec, transformer_engine_usable

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def padded_vocab_size(vocab_size: int, tp: int, multiple: int = 128) -> int:
    """Pad the vocabulary to a multiple of 128 that TP also divides.

    Padding rows take part in the softmax, so the padded size must not change
    with the layout: unlike megatron-LM (128*TP) we pad to lcm(128, TP), which
    is 128 for every power-of-two TP.
    """
    step = math.lcm(multiple, tp)
    return ((vocab_size + step - 1) // step) * step


def _moe_fields(model, moe) -> dict:
    if moe.num_experts == 0:
        return {}
    freq = [0] * moe.first_dense_layers + [1] * (model.num_layers - moe.first_dense_layers)
    balancing = moe.load_balancing
    return dict(
        num_moe_experts=moe.num_experts,
        moe_router_topk=moe.router_topk,
        moe_ffn_hidden_size=moe.expert_ffn_hidden_size,
        moe_shared_expert_intermediate_size=moe.shared_expert_ffn_hidden_size or None,
        moe_layer_freq=freq,
        moe_router_score_function=moe.score_function,
        moe_router_pre_softmax=moe.router_pre_softmax,
        moe_router_load_balancing_type=balancing,
        moe_aux_loss_coeff=moe.aux_loss_coeff if balancing != "none" else 0.0,
        moe_z_loss_coeff=moe.z_loss_coeff or None,
        moe_router_enable_expert_bias=moe.expert_bias,
        moe_router_bias_update_rate=moe.expert_bias_update_rate,
        moe_token_dispatcher_type=moe.token_dispatcher,
        moe_grouped_gemm=moe.grouped_gemm,
        moe_router_dtype="fp32",
    )


def _cpu_safe_fields(on_gpu: bool) -> dict:
    """Fusions that need CUDA kernels (or JIT-compile for seconds on CPU) stay off on CPU."""
    fused = on_gpu
    return dict(
        bias_activation_fusion=fused, masked_softmax_fusion=fused, bias_dropout_fusion=fused,
        apply_rope_fusion=fused, gradient_accumulation_fusion=False, persist_layer_norm=False,
        use_cpu_initialization=not on_gpu,
    )


def transformer_config(model, moe, par, **extra) -> TransformerConfig:
    """Map our model/moe/parallel sections onto megatron-core's TransformerConfig."""
    dtype = _DTYPES[model.dtype]
    sequence_parallel = par.sequence_parallel or (moe.num_experts > 0 and par.tensor > 1)
    fields = dict(
        num_layers=model.num_layers, hidden_size=model.hidden_size,
        num_attention_heads=model.num_attention_heads, num_query_groups=model.num_query_groups,
        ffn_hidden_size=model.ffn_hidden_size, normalization=model.normalization,
        layernorm_epsilon=model.norm_epsilon, gated_linear_unit=True, activation_func=F.silu,
        add_bias_linear=False, init_method_std=model.init_method_std,
        hidden_dropout=model.hidden_dropout, attention_dropout=model.attention_dropout,
        tensor_model_parallel_size=par.tensor, pipeline_model_parallel_size=par.pipeline,
        virtual_pipeline_model_parallel_size=par.virtual_pipeline if par.virtual_pipeline > 1 else None,
        expert_model_parallel_size=par.expert, expert_tensor_parallel_size=par.expert_tensor_size,
        context_parallel_size=par.context, sequence_parallel=sequence_parallel,
        pipeline_dtype=dtype, params_dtype=dtype, bf16=dtype is torch.bfloat16,
        deallocate_pipeline_outputs=True, calculate_per_token_loss=True,
        # gloo matches point-to-point messages between two ranks in posting order; the
        # batched p2p path posts them in an order that swaps activations and grads
        # when PP=2 with interleaving (both neighbours are the same rank).
        batch_p2p_comm=torch.cuda.is_available(),
        # megatron-core 0.16's default ("full") is a deprecated spelling of [] that warns on every
        # config built; [] is the same setting (no CUDA graphs are captured unless cuda_graph_impl is set)
        cuda_graph_scope=[],
        **_moe_fields(model, moe), **_cpu_safe_fields(torch.cuda.is_available()),
    )
    fields.update(extra)
    return TransformerConfig(**fields)


def _block_spec(tconfig, use_te: bool, vp_stage, ext: Extensions):
    """This chunk's decoder block spec, with each layer rewritten by the extensions."""
    block = decoder_block_spec(tconfig, use_te, vp_stage)
    if not ext.layer_spec:
        return block
    offset = get_transformer_layer_offset(tconfig, vp_stage=vp_stage)
    layers = [ext.rewrite_layer(offset + i, spec) for i, spec in enumerate(block.layer_specs)]
    return dataclasses.replace(block, layer_specs=layers)


def build_chunks(tconfig, model, groups, vocab_size: int, ext: Extensions = Extensions()) -> list:
    """One GPTModel per virtual-pipeline chunk owned by this rank."""
    from megatron_ernie.runtime.groups import set_virtual_pipeline_rank

    use_te = transformer_engine_usable()
    chunks = []
    for chunk in range(groups.dims.vpp):
        vp_stage = chunk if groups.dims.vpp > 1 else None
        set_virtual_pipeline_rank(vp_stage)
        pre, post = groups.stage_has(chunk)
        chunks.append(GPTModel(
            config=tconfig,
            transformer_layer_spec=_block_spec(tconfig, use_te, vp_stage, ext),
            vocab_size=vocab_size, max_sequence_length=model.seq_length,
            pre_process=pre, post_process=post,
            share_embeddings_and_output_weights=not model.untie_embeddings_and_output_weights,
            position_embedding_type="rope", rotary_base=model.rotary_base,
            vp_stage=vp_stage, pg_collection=groups.pgs,
        ))
        ext.after_build(chunks[-1])
    set_virtual_pipeline_rank(0 if groups.dims.vpp > 1 else None)
    return chunks


def wrap_ddp(chunks, tconfig, par, extra: dict | None = None) -> list:
    """megatron-core DDP (contiguous grad buffers; shards state with the distributed optimizer)."""
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=par.overlap_grad_reduce,
        use_distributed_optimizer=par.distributed_optimizer, **(extra or {}),
    )
    return [DistributedDataParallel(tconfig, ddp_config, chunk,
                                    disable_bucketing=(i > 0)) for i, chunk in enumerate(chunks)]


def attach_grad_hooks(tconfig, ddp_chunks) -> None:
    """Tell megatron-core's schedules how to finish a step.

    ``finalize_model_grads`` all-reduces gradients over data-parallel ranks,
    sums sequence-parallel norm grads over TP, syncs tied embeddings over PP
    and divides by the global token count (per-token loss).  Without it the
    schedule silently skips all of that.
    """
    from megatron.core.distributed import finalize_model_grads

    tconfig.finalize_model_grads_func = finalize_model_grads
    no_sync = [chunk.no_sync for chunk in ddp_chunks]
    tconfig.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
    if ddp_chunks[0].ddp_config.overlap_grad_reduce:
        grad_sync = [chunk.start_grad_sync for chunk in ddp_chunks]
        tconfig.grad_sync_func = grad_sync[0] if len(grad_sync) == 1 else grad_sync


def reduce_experts_over_expert_dp(chunks, dims) -> None:
    """Let megatron-core's DDP reduce routed-expert gradients over the expert-DP group at EP = 1 too.

    megatron-core 0.16.1 marks expert weights `allreduce = False` (their gradients
    go to DDP's expert buffers, reduced over expert-DP = TP/ETP x DP ranks) only
    when expert_model_parallel_size > 1. At EP = 1 they are reduced like dense
    weights, over DP alone. That is the same thing while ETP = TP, but with
    expert_tensor < tensor every TP rank holds a whole copy of each expert and
    computes its gradient from its own sequence-parallel tokens, so the copies
    drift apart: measured at TP2/ETP1 on 4 ranks, the two TP ranks' expert
    weights differed by ~20% after one step, and the loss by 2e-4. Marking them
    as megatron does at EP > 1 gives them the expert path in DDP, the
    optimizer and the grad norm.
    """
    if dims.ep > 1 or dims.etp == dims.tp:
        return
    from megatron.core.transformer.moe.moe_layer import MoELayer

    for chunk in chunks:
        for module in chunk.modules():
            if isinstance(module, MoELayer):
                for param in module.experts.parameters():
                    param.allreduce = False


def build_model(model, moe, par, groups, vocab_size: int, seed: int, ext: Extensions = Extensions()):
    """Returns (tconfig, ddp_chunks). Weights depend only on ``seed``, not on the layout."""
    tconfig = transformer_config(model, moe, par, **ext.tconfig)
    chunks = build_chunks(tconfig, model, groups, padded_vocab_size(vocab_size, par.tensor), ext)
    model_init.init_layout_invariant(chunks, seed, model.init_method_std, model.num_layers)
    reduce_experts_over_expert_dp(chunks, groups.dims)
    ddp_chunks = wrap_ddp(chunks, tconfig, par, ext.ddp)
    attach_grad_hooks(tconfig, ddp_chunks)
    return tconfig, ddp_chunks
