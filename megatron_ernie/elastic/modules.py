"""megatron-core modules that can shrink at run time, swapped in through layer specs.

They behave exactly like their parents until a sub-network is set:

* ``ElasticTransformerLayer``: when inactive, returns its input (a copy, so
  pipeline stages can still send, free and backpropagate through it).
* ``ElasticTopKRouter``: scores only the first ``active_experts`` experts
  (the others get the lowest logit and are never selected) and routes each
  token to ``topk`` of them; softmax is over the selected experts as usual.
  Its load-balancing loss is that of a router with only the kept experts:
  megatron-core's losses are ``num_experts * sum_i f_i P_i`` with
  ``num_experts = config.num_moe_experts``; the masked experts have P_i = 0
  and f_i = 0, so the sum is the kept experts' and only the factor is wrong
  (E instead of E').  ``get_aux_loss_coeff`` scales the coefficient by E'/E,
  which makes the loss (and its gradient) exactly the E'-expert router's;
  the logged value is unscaled to match.
* ``ExpertWidthMask``: a forward pre-hook on an expert's ``linear_fc2`` that
  zeroes intermediate channels at or beyond the kept width.  Zeroed channels
  contribute nothing forward and receive no gradient, so the computation is
  exactly that of a narrower expert whose weights are a prefix of these.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.transformer_layer import TransformerLayer

from megatron_ernie.model.router import ErnieTopKRouter


class ElasticTransformerLayer(TransformerLayer):
    active: bool = True

    def forward(self, *args, **kwargs):
        if self.active:
            return super().forward(*args, **kwargs)
        hidden_states = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        return hidden_states.clone(), kwargs.get("context")


class ElasticTopKRouter(ErnieTopKRouter):
    active_experts: int | None = None  # None = all

    def gating(self, input: torch.Tensor):
        logits = super().gating(input)
        if self.active_experts is None or self.active_experts >= logits.shape[-1]:
            return logits
        dropped = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
        dropped[self.active_experts:] = True
        return logits.masked_fill(dropped, torch.finfo(logits.dtype).min)

    def kept_share(self) -> float:
        """E'/E: the kept experts' share of all experts (1 with none masked)."""
        if self.active_experts is None or self.active_experts >= self.num_experts:
            return 1.0
        return self.active_experts / self.num_experts

    def get_aux_loss_coeff(self, aux_loss_type: str) -> float:
        coeff = super().get_aux_loss_coeff(aux_loss_type)
        return coeff * self.kept_share()

    def attach_and_log_load_balancing_loss(self, activation, aux_loss_coeff, aux_loss, aux_loss_name,
                                           reduce_group, reduce_group_has_dp=False, valid_token_count=None):
        # megatron logs aux_loss / coeff: pass the unscaled coefficient so the log shows the kept
        # experts' loss E' * sum f_i P_i (the coefficient is only used for that division)
        return super().attach_and_log_load_balancing_loss(
            activation, aux_loss_coeff / self.kept_share(), aux_loss, aux_loss_name, reduce_group,
            reduce_group_has_dp=reduce_group_has_dp, valid_token_count=valid_token_count)


class ExpertWidthMask:
    """Keeps intermediate channels [0, width) of one expert (global channel indices)."""

    def __init__(self, linear_fc2, channel_offset: int):
        self.offset = channel_offset  # first global channel held by this (expert-TP) rank
        self.width: int | None = None
        self.handle = linear_fc2.register_forward_pre_hook(self)

    def __call__(self, module, inputs):
        x = inputs[0]
        local = x.shape[-1]
        if self.width is None or self.width >= self.offset + local:
            return None
        keep = (torch.arange(local, device=x.device) + self.offset) < self.width
        return (x * keep.to(x.dtype),) + tuple(inputs[1:])
