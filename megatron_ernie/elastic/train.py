"""One elastic training step: the sandwich of sub-networks in one pipeline schedule.

Every data micro-batch is repeated once per sampled sub-network (largest
first), and megatron-core's schedule runs the whole list as micro-batches, so
gradients of all sub-networks accumulate into one optimizer step and the
per-token loss normalisation stays exact under any TP/PP/EP/DP layout.  The
sub-network rides along in each micro-batch; ``forward_step`` configures the
model chunk before running it.

In-place distillation (Once-for-All): the largest sub-network's logits on a
micro-batch are kept (detached) on the last pipeline stage and the smaller
ones learn ``(1-a)*CE(labels) + a*KL(largest || sub)`` per token.  The KL is
computed on vocabulary-parallel logits without gathering the vocabulary.

The distillation gate (``elastic.distill_gate``) decides per token: a smaller
member distils only where the largest's CE on that token is lower than its
own (a teacher that is not better there teaches nothing) and learns plain CE
elsewhere.  Per token, not per micro-batch, so the objective does not depend
on how tokens are split into micro-batches or data-parallel ranks; both CEs
are full-vocabulary values (reduced over TP), so every TP rank takes the same
decision.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist
from megatron.core import tensor_parallel

from megatron_ernie.elastic.model import apply_subnet
from megatron_ernie.elastic.subnet import Subnet
from megatron_ernie.model.vocab_parallel import vocab_parallel_kl
from megatron_ernie.train import step as S

ROLES = ("largest", "smallest", "target", "random")


@dataclass
class TeacherCache:
    """Largest sub-network logits and per-token CE per data micro-batch, freed after its last user."""

    users: int
    logits: dict

    def put(self, mb: int, logits, ce) -> None:
        if self.users:
            self.logits[mb] = [(logits.detach(), ce.detach()), self.users]

    def take(self, mb: int):
        """(logits, per-token CE) of the largest on micro-batch ``mb``."""
        entry = self.logits[mb]
        entry[1] -= 1
        if entry[1] == 0:
            del self.logits[mb]
        return entry[0]


@dataclass(frozen=True)
class Distill:
    """How the smaller members learn from the largest: KL weight and the per-token gate."""

    weight: float
    gate: bool = False


def distilled_loss(ce, kl, teacher_ce, distill: Distill):
    """Per-token loss of a smaller member and where distillation applied (bool per token).

    ``(1-a)*CE + a*KL`` where the gate is open; with the gate on it is open only where the
    largest's CE is strictly lower than the member's own, and the token's loss is plain CE
    elsewhere."""
    if distill.gate:
        open_ = teacher_ce < ce.detach()
    else:
        open_ = torch.ones_like(ce, dtype=torch.bool)
    a = distill.weight * open_.to(ce.dtype)
    return (1 - a) * ce + a * kl, open_


def _loss(batch, cache: TeacherCache, distill: Distill, tp_group, logits):
    labels, mask = batch["labels"], batch["loss_mask"].float()
    # megatron's vocab-parallel CE rewrites its input in place: give it a copy, the
    # logits are still needed for the KL and (largest) as the teacher
    ce = tensor_parallel.vocab_parallel_cross_entropy(logits.float().clone(), labels)
    extra = {}
    if batch["role"] == "largest":
        cache.put(batch["mb"], logits, ce)
        per_token, kl = ce, torch.zeros_like(ce)
    else:
        teacher, teacher_ce = cache.take(batch["mb"])
        kl = vocab_parallel_kl(logits, teacher, tp_group) if distill.weight > 0 else torch.zeros_like(ce)
        per_token, open_ = distilled_loss(ce, kl, teacher_ce, distill)
        if distill.gate:
            extra["distill_gate_open"] = torch.stack([(open_.float() * mask).sum(), mask.sum()])
    total = (per_token * mask).sum()
    count = mask.sum()
    ce_sum, kl_sum = (ce.detach() * mask).sum(), (kl.detach() * mask).sum()
    return total, count.to(torch.int), {"lm loss": torch.stack([total.detach(), count]),
                                        f"loss/{batch['role']}": torch.stack([ce_sum, count]),
                                        "distill": torch.stack([kl_sum, count]), **extra}


def make_forward_step(cache: TeacherCache, distill: Distill, tp_group):
    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        apply_subnet(model, batch["subnet"])
        output = model(batch["tokens"], batch["position_ids"], None)
        return output, partial(_loss, batch, cache, distill, tp_group)

    return forward_step


def sandwich_batches(batches: list, sampled: list[tuple[str, Subnet]]) -> list:
    return [{**b, "subnet": subnet, "role": role, "mb": m}
            for m, b in enumerate(batches) for role, subnet in sampled]


def _reduce(loss_dicts, groups) -> dict[str, float]:
    keys = ["lm loss", "distill", "distill_gate_open", *(f"loss/{r}" for r in ROLES)]
    totals = torch.zeros(len(keys), 2)
    for d in loss_dicts:
        for i, k in enumerate(keys):
            if k in d:
                totals[i] += d[k]
    if loss_dicts:
        dist.all_reduce(totals, group=groups.pgs.dp_cp)
    if groups.dims.pp > 1:
        dist.broadcast(totals, src=dist.get_global_rank(groups.pgs.pp, groups.dims.pp - 1), group=groups.pgs.pp)
    return {k: (t[0] / t[1]).item() for k, t in zip(keys, totals) if t[1] > 0} | {"tokens": int(totals[0, 1])}


def elastic_train_step(model_chunks, optimizer, scheduler, batches, shape, groups, sampled, distill):
    """Sandwich step; returns (StepResult over all sub-networks, per-role losses).

    ``distill``: a ``Distill`` (or a bare KL weight: no gate)."""
    distill = distill if isinstance(distill, Distill) else Distill(float(distill))
    num_mb, seq, micro = shape
    cache = TeacherCache(users=len(sampled) - 1, logits={})
    for chunk in model_chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    loss_dicts = S.run_schedule(model_chunks, sandwich_batches(batches, sampled), (num_mb * len(sampled), seq, micro),
                                groups.dims, forward_only=False,
                                forward_step_func=make_forward_step(cache, distill, groups.pgs.tp))
    ok, grad_norm, _ = optimizer.step()
    if ok:
        scheduler.step(increment=1)
    losses = _reduce(loss_dicts, groups)
    result = S.StepResult(loss=losses.get("lm loss", float("nan")), tokens=losses["tokens"] // len(sampled),
                          grad_norm=grad_norm, skipped=not ok)
    return result, losses


@torch.no_grad()
def eval_subnet(model_chunks, batches, shape, groups, subnet: Subnet) -> S.StepResult:
    """Validation loss of one sub-network (plain LM loss, no distillation)."""
    for chunk in model_chunks:
        apply_subnet(chunk, subnet)
    return S.eval_step(model_chunks, batches, shape, groups)
