"""The ``[sft]`` section: where supervised (prompt, response) pairs come from (data/sft.py).

``source = "tasks"`` takes demonstrations from the RL task registry for every
task of ``rl.tasks`` (one task list per config, shared with the RL stages
that follow); a path ending in ``.jsonl`` reads one ``{"prompt", "response"}``
object per line. ``error_fraction`` makes a deliberately imperfect
demonstration set (exactly that share of the training demos is wrong, which
ones fixed by ``seed``), so that RL after SFT has room to improve.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_ernie.config.errors import require

OVERLONG = ("truncate", "drop")


@dataclass(frozen=True)
class SFTConfig:
    source: str = "tasks"  # "tasks" (rl.tasks demos), "judge"/"judge-items" (verdicts per answer/item), .jsonl
    num_examples: int = 1024  # training examples drawn from the tasks (source = "tasks"), split by task weight
    valid_examples: int = 64  # held out for validation: tasks: later indices, always correct; jsonl: last lines
    first_index: int = 1_000_000  # task example index of the first demo (RL prompts start at 0: no overlap)
    error_fraction: float = 0.0  # share of wrong training demonstrations (source = "tasks")
    seed: int = 0  # picks the wrong demos and shuffles the example order (per epoch)
    overlong: str = "truncate"  # prompt+response+EOT longer than model.seq_length+1: truncate (EOT unsupervised) | drop

    def validate(self, path: str) -> None:
        require(self.source in ("tasks", "judge", "judge-items") or self.source.endswith(".jsonl"), f"{path}.source",
                self.source, 'use "tasks" (demonstrations of rl.tasks), "judge" or "judge-items" (rubric-labelled '
                'verdicts on whole answers or on each listed item, for the rubric tasks of rl.tasks, '
                'rl/judge/data.py) or the path of a .jsonl file')
        require(self.num_examples >= 1, f"{path}.num_examples", self.num_examples, "use an integer >= 1")
        require(self.valid_examples >= 1, f"{path}.valid_examples", self.valid_examples,
                "use an integer >= 1 (validation needs held-out examples)")
        require(self.first_index >= 0, f"{path}.first_index", self.first_index, "use an integer >= 0")
        require(0.0 <= self.error_fraction <= 1.0, f"{path}.error_fraction", self.error_fraction,
                "must be in [0, 1] (the share of deliberately wrong demonstrations)")
        require(self.error_fraction == 0 or self.source == "tasks", f"{path}.error_fraction", self.error_fraction,
                'wrong demonstrations are made from the tasks\' demos; set it to 0 for a .jsonl source')
        require(self.seed >= 0, f"{path}.seed", self.seed, "use a non-negative integer")
        require(self.overlong in OVERLONG, f"{path}.overlong", self.overlong, f"allowed values are {list(OVERLONG)}")
