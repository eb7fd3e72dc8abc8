"""Turn a megatron-core GPTModel into a supernet and set its sub-network.

``elastic_extensions`` swaps the layer and router classes in the layer specs
and, after each chunk is built, attaches an ``ElasticState`` that knows the
chunk's elastic layers, routers and expert width masks.  ``apply_subnet``
then configures a chunk for one sub-network; the trainer calls it before each
micro-batch's forward (the subnet travels with the micro-batch).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from megatron.core.transformer.moe.router import TopKRouter
from megatron.core.transformer.transformer_layer import TransformerLayer
from megatron.core.utils import unwrap_model

from megatron_ernie.elastic.modules import ElasticTopKRouter, ElasticTransformerLayer, ExpertWidthMask
from megatron_ernie.elastic.subnet import Subnet, kept_channels, kept_layers, layer_ranking
from megatron_ernie.model.extensions import Extensions
from megatron_ernie.model.router import ErnieTopKRouter
from megatron_ernie.model.specs import substitute


@dataclass
class ElasticState:
    layers: dict = field(default_factory=dict)  # global 0-based index -> ElasticTransformerLayer
    routers: list = field(default_factory=list)
    masks: list = field(default_factory=list)  # ExpertWidthMask per local expert
    ffn_width: int = 0
    ranking: list = field(default_factory=list)


def _rewrite_layer(index: int, spec):
    swaps = {TransformerLayer: ElasticTransformerLayer, ErnieTopKRouter: ElasticTopKRouter,
             TopKRouter: ElasticTopKRouter}
    return substitute(spec, swaps)


def _expert_masks(chunk) -> list:
    from megatron.core.transformer.moe.experts import SequentialMLP

    masks = []
    for module in chunk.modules():
        if isinstance(module, SequentialMLP):
            for expert in module.local_experts:
                fc2 = expert.linear_fc2
                local = fc2.weight.shape[1]  # RowParallelLinear: input channels on this rank
                rank = fc2.tp_group.rank() if getattr(fc2, "tp_group", None) is not None else 0
                masks.append(ExpertWidthMask(fc2, rank * local))
    return masks


def attach_state(chunk, num_layers: int, ffn_width: int, layer_order: tuple = ()) -> ElasticState:
    state = ElasticState(ffn_width=ffn_width, ranking=layer_ranking(num_layers, layer_order))
    for module in chunk.modules():
        if isinstance(module, ElasticTransformerLayer):
            state.layers[module.layer_number - 1] = module
        elif isinstance(module, ElasticTopKRouter):
            state.routers.append(module)
    state.masks = _expert_masks(chunk)
    chunk.elastic_state = state
    return state


def elastic_extensions(elastic, model, moe) -> Extensions:
    def attach(chunk):
        attach_state(chunk, model.num_layers, moe.expert_ffn_hidden_size, elastic.layer_order)

    return Extensions(layer_spec=(_rewrite_layer,), post_build=(attach,))


def _state(chunk) -> ElasticState:
    module = unwrap_model(chunk)
    return module.elastic_state


def apply_subnet(chunk, subnet: Subnet) -> None:
    """Configure one model chunk (its layers, routers, experts) for ``subnet``."""
    state = _state(chunk)
    keep = kept_layers(subnet.depth, state.ranking)
    for index, layer in state.layers.items():
        layer.active = index in keep
    for router in state.routers:
        router.active_experts = subnet.experts
        router.topk = subnet.topk
    width = kept_channels(subnet.ffn, state.ffn_width)
    for mask in state.masks:
        mask.width = width
