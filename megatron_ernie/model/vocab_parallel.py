"""KL divergences on logits sharded over the vocabulary (tensor parallelism), without gathering them.

With TP > 1 megatron-core's output layer leaves each rank a contiguous slice
of the (padded) vocabulary. A full-vocabulary softmax would need an all-gather
of [tokens, V] logits per micro-batch; instead every sum over the vocabulary
is a local sum plus an all-reduce of a [tokens] tensor.

Gradients: megatron's `reduce_from_tensor_model_parallel_region` all-reduces
forward and is the identity backward. That is exact only when each reduced
quantity enters the loss with a coefficient that is the same on every TP
rank, so the formulas below are written as functions of reduced sums only
(never "sum of per-shard KL terms", which would give each rank only its
shard's share of the log-sum-exp gradient).

Used by the elastic supernet's in-place distillation (forward KL) and by
on-policy distillation in RL (reverse KL, megatron_ernie/rl/algorithms.py).
With `tp_group` None or of size 1 the functions are plain single-device math.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import tensor_parallel


def _is_parallel(tp_group) -> bool:
    return tp_group is not None and tp_group.size() > 1


def reduce_over_vocab(value: torch.Tensor, tp_group) -> torch.Tensor:
    """Sum of `value` over the TP ranks (identity backward); unchanged without TP."""
    if not _is_parallel(tp_group):
        return value
    return tensor_parallel.reduce_from_tensor_model_parallel_region(value, group=tp_group)


def shift_by_global_max(logits: torch.Tensor, tp_group) -> torch.Tensor:
    """logits minus the (detached) maximum over the whole vocabulary, so exp() never overflows.

    A rank whose shard is empty (only padding columns were cut away) contributes -inf.
    """
    if logits.shape[-1]:
        peak = logits.detach().max(dim=-1, keepdim=True).values
    else:
        peak = logits.new_full((*logits.shape[:-1], 1), float("-inf")).detach()
    if _is_parallel(tp_group):
        dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=tp_group)
    return logits - peak


def vocab_parallel_kl(student, teacher, tp_group):
    """KL(teacher || student) per token on logits sharded over the vocabulary (TP).

    Written as  sum p_t log p_t  -  sum p_t z_s  +  logsumexp(z_s)  (using
    sum p_t = 1) so that every all-reduced quantity enters the loss with a
    coefficient that is the same on all TP ranks (see the module docstring).
    The teacher is a constant (no gradient).
    """
    reduce = tensor_parallel.reduce_from_tensor_model_parallel_region

    with torch.no_grad():
        t = shift_by_global_max(teacher.float(), tp_group)
        t_lse = reduce(t.exp().sum(dim=-1, keepdim=True), group=tp_group).log()
        p_t = (t - t_lse).exp()
        neg_entropy = reduce((p_t * (t - t_lse)).sum(dim=-1), group=tp_group)
    s = shift_by_global_max(student.float(), tp_group)
    s_lse = reduce(s.exp().sum(dim=-1), group=tp_group).log()
    cross = reduce((p_t * s).sum(dim=-1), group=tp_group)
    return neg_entropy - cross + s_lse


def vocab_parallel_reverse_kl(student_logits: torch.Tensor, teacher_logprobs: torch.Tensor,
                              tp_group=None) -> torch.Tensor:
    """KL(student || teacher) = sum_v p_s(v) (log p_s(v) - log p_t(v)) per position, vocabulary-sharded.

    student_logits: this rank's shard of the student's logits [..., V_local];
    teacher_logprobs: the teacher's log-softmax over the same columns [..., V_local]
    (a constant: the teacher is frozen, no gradient flows into it). Columns that
    are not real tokens (vocabulary padding) must be cut from both by the caller,
    so the student puts no probability mass on them, as in the sampled log-probs.

    With s = z - max z, Z = sum_v e^s and A = sum_v e^s (s - log p_t):
        KL = sum_v (e^s / Z)(s - log Z - log p_t) = A / Z - log Z,
    a function of the two reduced sums A and Z only, so the identity-backward
    all-reduce gives every shard its exact gradient.
    """
    if student_logits.shape != teacher_logprobs.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher log-probs "
                         f"{tuple(teacher_logprobs.shape)} must cover the same positions and vocabulary columns")
    s = shift_by_global_max(student_logits.float(), tp_group)
    e = s.exp()
    total = reduce_over_vocab(e.sum(dim=-1), tp_group)
    weighted = reduce_over_vocab((e * (s - teacher_logprobs.detach().float())).sum(dim=-1), tp_group)
    return weighted / total - total.log()
