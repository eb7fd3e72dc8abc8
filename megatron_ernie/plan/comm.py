"""Communication per training step and rank, per process group (payload bytes).

"Payload" is the size of the full tensor a collective produces or consumes on
one rank: an all-gather's output, a reduce-scatter's input, an all-reduce's
buffer, an all-to-all's input, a p2p message.  Bytes on the wire per rank
follow from the ring algorithms: (n - 1) / n of the payload for all-gather,
reduce-scatter and all-to-all, 2 (n - 1) / n for all-reduce (``wire_bytes``).

Where each collective comes from (megatron-core 0.16.1):

* tp, with sequence parallelism (Korthikanti et al. 2022, §4.2.2): per layer
  and micro-batch, an all-gather before QKV and before fc1 and a
  reduce-scatter after the output projection and after fc2 in forward; in
  backward the conjugate of each (an all-gather of the reduce-scatter's
  gradient, a reduce-scatter of the all-gather's) plus the re-gather of the
  column-parallel input for its weight gradient: per block 3 all-gathers and
  2 reduce-scatters of s*b*h elements.
  Without sequence parallelism: one all-reduce per block forward and one
  backward (Shoeybi et al. 2019).  MoE layers: the shared expert as a dense
  MLP; the routed experts' tokens go through ep/etp (below).
* ep: the all-to-all dispatcher sends each of a rank's tokens to topk
  experts and back, forward and backward: 4 all-to-alls of
  tokens * topk * imbalance * h elements per MoE layer and micro-batch.
* etp: with expert-TP > 1 the dispatched rows are all-gathered over expert-TP
  before the experts and reduce-scattered after (and the conjugates backward).
  This MoE-under-TP token path is an estimate (benchmarks/plan_accuracy.py
  shows its error); every other term here matches a measured step exactly
  (tests/test_plan_dist.py), apart from scalars and routing metadata.
* tp, at the ends: the vocabulary-parallel embedding and the output layer
  (``_tp_ends``), and once per step the all-reduce of the gradients of the
  sequence-parallel replicated weights (norms, routers).
* pp: per micro-batch and chunk boundary one activation forward and one
  gradient backward (s*b*h/SP elements each way).  embd: tied embeddings with
  PP > 1 all-reduce the word-embedding gradient between first and last stage.
* dp / expert-dp: the fp32 main-grad buffer is all-reduced (or, with the
  distributed optimizer, reduce-scattered) once per step over the dense and the
  expert data-parallel groups; the distributed optimizer then all-gathers the
  updated parameters (param dtype) (megatron-core distributed optimizer docs).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from megatron_ernie.plan.activations import expert_rows, shape_of
from megatron_ernie.plan.inventory import chunk_layers, is_moe_layer, padded_vocab, rank_chunks
from megatron_ernie.plan.memory import GRAD_BYTES, dp_sizes, param_bytes_per_element, rank_buffers


@dataclass
class Traffic:
    """Payload bytes per group, per collective kind: {group: {kind: bytes}}."""

    groups: dict = field(default_factory=dict)

    def add(self, group: str, kind: str, nbytes: float) -> None:
        if nbytes:
            g = self.groups.setdefault(group, {})
            g[kind] = g.get(kind, 0) + nbytes

    def total(self, group: str) -> float:
        return sum(self.groups.get(group, {}).values())


def wire_bytes(kind: str, payload: float, n: int) -> float:
    """Bytes one rank sends in a ring collective over n ranks (p2p: the payload)."""
    if n <= 1 and kind != "p2p":
        return 0.0
    factor = {"all_reduce": 2 * (n - 1) / n, "p2p": 1.0}.get(kind, (n - 1) / n)
    return payload * factor


def _tp_layer(t: Traffic, dense_mlp: bool, shared: bool, elems: float, sp: bool) -> None:
    """One layer, one micro-batch, forward and backward, on the TP group."""
    blocks = 1 + int(dense_mlp or shared)  # attention, plus a TP-split MLP
    if sp:
        t.add("tp", "all_gather", 3 * blocks * elems)  # gather fwd, re-gather for wgrad, conjugate of RS
        t.add("tp", "reduce_scatter", 2 * blocks * elems)
    else:
        t.add("tp", "all_reduce", 2 * blocks * elems)


def _expert_layer(t: Traffic, moe, par, rows_elems: float) -> None:
    if par.expert > 1:
        t.add("ep", "all_to_all", 4 * rows_elems)
    if par.expert_tensor_size > 1:  # gather before, reduce-scatter after the experts, and the conjugates
        t.add("etp", "all_gather", 2 * rows_elems * par.expert_tensor_size)
        t.add("etp", "reduce_scatter", 2 * rows_elems * par.expert_tensor_size)


def step_traffic(model, moe, par, train, vocab_size: int, world: int, pp_rank: int = 0,
                 imbalance: float = 1.0, fp8=None) -> Traffic:
    """Payload bytes one rank of pipeline rank ``pp_rank`` hands to each group in one step."""
    sh = shape_of(model, moe, par, train)
    dp, edp = dp_sizes(par, world)
    m = train.global_batch_size // (train.micro_batch_size * dp)
    t, e = Traffic(), sh.act_bytes
    elems = sh.tokens * model.hidden_size * e
    rows = expert_rows(moe, par, sh, imbalance) / par.expert_tensor_size * model.hidden_size * e if moe.num_experts else 0
    for c in range(par.virtual_pipeline):
        for layer in chunk_layers(model.num_layers, par.pipeline, par.virtual_pipeline, pp_rank, c):
            moe_layer = is_moe_layer(layer, moe)
            if par.tensor > 1:
                _tp_layer(t, not moe_layer, moe_layer and moe.shared_expert_ffn_hidden_size > 0, m * elems, sh.sp > 1)
            if moe_layer:
                _expert_layer(t, moe, par, m * rows)
    if par.tensor > 1:
        _tp_ends(t, par, pp_rank, m * elems, sh.sp > 1)
        _sequence_parallel_grads(t, model, moe, par, vocab_size, pp_rank, sh.sp > 1)
    _pipeline(t, par, pp_rank, m, elems / sh.sp)
    _tied_embedding(t, model, par, vocab_size, pp_rank)
    _data_parallel(t, model, moe, par, vocab_size, world, pp_rank, fp8)
    return t


def _tp_ends(t: Traffic, par, pp_rank: int, elems: float, sp: bool) -> None:
    """The vocabulary-parallel embedding (first stage) and output layer (last stage).

    Embedding: its partial sums are reduce-scattered (SP) or all-reduced
    forward; SP gathers the gradient back.  Output layer: a column-parallel
    GEMM like QKV (all-gather forward, re-gather for wgrad, reduce-scatter of
    the input gradient) or, without SP, one all-reduce backward."""
    if pp_rank == 0:
        if sp:
            t.add("tp", "reduce_scatter", elems)
            t.add("tp", "all_gather", elems)
        else:
            t.add("tp", "all_reduce", elems)
    if pp_rank == par.pipeline - 1:
        if sp:
            t.add("tp", "all_gather", 2 * elems)
            t.add("tp", "reduce_scatter", elems)
        else:
            t.add("tp", "all_reduce", elems)


def _sequence_parallel_grads(t: Traffic, model, moe, par, vocab_size: int, pp_rank: int, sp: bool) -> None:
    """With SP each TP rank sees other tokens, so the replicated weights tagged sequence_parallel
    (norms, routers) have partial gradients: one all-reduce of their fp32 grads per step
    (megatron-core finalize_model_grads)."""
    if not sp:
        return
    n = sum(p.numel for params in rank_chunks(model, moe, par, vocab_size, pp_rank) for p in params
            if "layernorm" in p.local_name or "router" in p.local_name)
    t.add("tp", "all_reduce", n * GRAD_BYTES)


def _tied_embedding(t: Traffic, model, par, vocab_size: int, pp_rank: int) -> None:
    """Tied input/output embeddings with PP > 1: the first and last stage all-reduce the
    word-embedding gradient (fp32 main grad) over the embedding group once per step."""
    if model.untie_embeddings_and_output_weights or par.pipeline == 1 or 0 < pp_rank < par.pipeline - 1:
        return
    t.add("embd", "all_reduce", padded_vocab(vocab_size, par.tensor) // par.tensor * model.hidden_size * GRAD_BYTES)


def _pipeline(t: Traffic, par, pp_rank: int, m: int, message: float) -> None:
    """Sends of one rank: each chunk sends its output forward (not the last) and its grad backward (not the first)."""
    pp, vpp = par.pipeline, par.virtual_pipeline
    if pp == 1:
        return
    sends = 0
    for c in range(vpp):
        sends += not (pp_rank == pp - 1 and c == vpp - 1)
        sends += not (pp_rank == 0 and c == 0)
    t.add("pp", "p2p", sends * m * message)


def _data_parallel(t: Traffic, model, moe, par, vocab_size: int, world: int, pp_rank: int, fp8) -> None:
    """Gradient reduction and (distributed optimizer) parameter all-gather of every DDP buffer.

    megatron-core calls the collectives on one-rank groups too (payload, no
    wire traffic).  With expert-path parameters the optimizer is a
    ChainedOptimizer of a dense and an expert DistributedOptimizer, and each
    one's step re-gathers the parameters of every bucket of the model chunks
    (``start_param_sync(force_sync=True)``): measured twice per step in
    megatron-core 0.16.1, so the all-gather payload doubles."""
    pbytes = param_bytes_per_element(model, fp8)
    buffers = rank_buffers(model, moe, par, vocab_size, world, pp_rank)
    optimizers = 1 + any(b.expert for b in buffers)
    for buf in buffers:
        group = "expert_dp" if buf.expert else "dp"
        if par.distributed_optimizer:
            t.add(group, "reduce_scatter", buf.layout.numel * GRAD_BYTES)
            t.add(group, "all_gather", buf.layout.numel * pbytes * optimizers)
        else:
            t.add(group, "all_reduce", buf.layout.numel * GRAD_BYTES)
