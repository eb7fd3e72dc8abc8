"""The distillation objective: next-token CE mixed with a KL toward a frozen teacher (``[distill]``).

Per token, on the tokens the batch's ``loss_mask`` keeps:

    loss = (1 - w) * CE(labels, student) + w * T^2 * KL(softmax(z_T / T) || softmax(z_S / T))

(Hinton et al. 2015; the forward KL of in-place distillation in
elastic/train.py, which this mirrors for a teacher that is a separate frozen
model). Each step first runs the teacher's forward-only pipeline schedule
over the step's micro-batches (train/teacher.py), keeping its
vocabulary-parallel logits per micro-batch on the last stage, then the
student's schedule, whose loss function takes the micro-batch's teacher logits
by index. The KL is computed on vocabulary-parallel logits without gathering
the vocabulary (model/vocab_parallel.py), and the sums go through
megatron-core's per-token normalisation, so the step is the same function at
any TP/PP/EP/DP layout.

``train/loss`` (and the iteration line's loss) stays the label CE, comparable
with runs without a teacher; the KL term is ``train/distill_kl`` (also on the
iteration line) and the mixed objective ``train/distill_objective``. With
``weight = 0`` the KL is still computed and logged, and the student trains
exactly as without a teacher.
"""

from __future__ import annotations

import torch
from megatron.core import tensor_parallel

from megatron_ernie.model.vocab_parallel import vocab_parallel_kl
from megatron_ernie.train import step as S
from megatron_ernie.train import teacher as T
from megatron_ernie.train.objective import LMObjective

KEYS = ("objective", "ce", "kl")


def distill_kl(student, teacher, temperature: float, tp_group):
    """T^2 * KL(teacher || student) per token at temperature T (vocabulary-parallel, teacher constant)."""
    if temperature == 1.0:
        return vocab_parallel_kl(student, teacher, tp_group)
    return temperature ** 2 * vocab_parallel_kl(student / temperature, teacher / temperature, tp_group)


def _loss(batch, teacher_logits: list, weight: float, temperature: float, tp_group, logits):
    """(sum of per-token losses, kept tokens, {name: [sum, count]}) of one micro-batch, as train/step.py's."""
    # megatron's vocab-parallel CE rewrites its input in place: the logits are still needed for the KL
    ce = tensor_parallel.vocab_parallel_cross_entropy(logits.float().clone(), batch["labels"])
    teacher, teacher_logits[batch["mb"]] = teacher_logits[batch["mb"]], None  # freed once used
    kl = distill_kl(logits, teacher, temperature, tp_group)
    mask = batch["loss_mask"].float().view(-1)
    total = torch.sum(((1 - weight) * ce + weight * kl).view(-1) * mask)
    count = mask.sum().to(torch.int)
    tokens = count.detach().float()

    def pair(x):
        return torch.stack([torch.sum(x.detach().view(-1) * mask), tokens])

    return total, count, {"objective": torch.stack([total.detach(), tokens]), "ce": pair(ce), "kl": pair(kl)}


def make_forward_step(teacher_logits: list, weight: float, temperature: float, tp_group):
    """megatron-core's forward_step_func for the student: its logits, and the distillation loss."""
    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        output = model(batch["tokens"], batch["position_ids"], None)
        return output, lambda logits: _loss(batch, teacher_logits, weight, temperature, tp_group, logits)

    return forward_step


class DistillObjective(LMObjective):
    """Plain LM training with a frozen teacher's logits mixed into each token's loss (``[distill]``)."""

    name = "distill"
    console = ("train/distill_kl",)

    def __init__(self):
        self.teacher: T.Teacher | None = None
        self._placed = None

    def check(self, cfg) -> None:
        import torch.distributed as dist

        self._checkpoint, self._placed = T.check(cfg, dist.get_world_size())
        super().check(cfg)

    def prepare(self, run) -> None:
        self.teacher = T.load(self._placed, self._checkpoint, run.groups, run.data.tokenizer)

    def step(self, run, batches) -> tuple[S.StepResult, dict]:
        d = run.cfg.distill
        numbered = [{**b, "mb": i} for i, b in enumerate(batches)]
        teacher_logits = T.logits(self.teacher, batches, run.shape, run.groups.dims)
        forward_step = make_forward_step(teacher_logits, d.weight, d.temperature, run.groups.pgs.tp)
        loss_dicts, ok, grad_norm = S.forward_backward_update(run.model, run.optimizer, run.scheduler, numbered,
                                                              run.shape, run.groups, forward_step)
        means, tokens = S.reduce_token_means(loss_dicts, run.groups, KEYS)
        result = S.StepResult(loss=means["ce"], tokens=tokens, grad_norm=grad_norm, skipped=not ok)
        return result, {"train/distill_kl": means["kl"], "train/distill_objective": means["objective"]}
