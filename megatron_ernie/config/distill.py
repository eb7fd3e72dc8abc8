"""The ``[distill]`` section: knowledge distillation from a frozen teacher during pretraining.

Each token's loss becomes ``(1 - weight) * CE(labels) + weight * T^2 * KL(p_T || p_S)``
(Hinton et al. 2015, "Distilling the Knowledge in a Neural Network": softmaxes at
temperature T, the T^2 keeping the gradient's scale independent of T), with the
teacher's logits from a checkpoint loaded once, read-only, at the student's
parallel layout (train/teacher.py). The motivating case is continuing an
extracted sub-network with its frozen supernet as the teacher (Minitron,
Flextron: logit distillation at a weight >= the label loss); any student and
teacher of the same tokenizer work, of any sizes.

``teacher = ""`` (the default) turns distillation off; ``ernie pretrain
--teacher CHECKPOINT`` sets it. An elastic supernet distils in place from its
own largest sub-network instead (``elastic.distill_weight``).
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_ernie.config.errors import require


@dataclass(frozen=True)
class DistillConfig:
    teacher: str = ""  # a checkpoint: an iter_N directory, a checkpoints/ directory or a run directory; "" = off
    weight: float = 0.5  # KL weight w: loss = (1 - w) * CE + w * T^2 * KL(teacher || student), per token
    temperature: float = 1.0  # softmax temperature T of both models inside the KL

    @property
    def enabled(self) -> bool:
        return bool(self.teacher)

    def validate(self, path: str) -> None:
        require(0.0 <= self.weight <= 1.0, f"{path}.weight", self.weight,
                "must be in [0, 1]: 0 trains on the labels only (the KL is still logged), 1 on the teacher only")
        require(self.temperature > 0, f"{path}.temperature", self.temperature,
                "must be > 0 (1 compares the models' own distributions; > 1 softens both)")
