"""What one optimizer step computes, chosen once at setup (train/loop.py asks, never decides).

The loop is the same for every objective: fetch this rank's micro-batches of
the next global batch, let the objective run forward/backward through
megatron-core's schedule and step the optimizer, then log, evaluate and save.
What differs between plain language modelling, masked SFT (the same LM loss
on a data source whose ``loss_mask`` keeps only response tokens), the elastic
sandwich of sub-networks and distillation from a frozen teacher (train/distill.py) is only:

* ``step``: one optimizer step on a global batch -> (StepResult, extra scalars);
* ``before_eval``: put the model in the state validation measures (e.g. a
  supernet's full network);
* ``finish``: work after the last iteration (e.g. a supernet's family table);
* ``check``: refuse a config this objective cannot train, before any work;
* ``prepare``: build what it needs beside the model (a distillation teacher).

A new objective is a new file implementing this class, handed to
``loop.setup(cfg, objective=...)`` by its caller (the CLI). The loop imports
no feature package, so feature packages may import the loop freely.
"""

from __future__ import annotations

from megatron_ernie.config.errors import require
from megatron_ernie.train import step as S


class Objective:
    """The interface; ``step`` is the only method an objective must implement."""

    name = "objective"
    console: tuple[str, ...] = ()  # keys of step()'s extra scalars also shown on the iteration line

    def check(self, cfg) -> None:
        """Raise ConfigError for a config this objective cannot train (called first in setup)."""

    def prepare(self, run) -> None:
        """Build what the objective needs beside the model (e.g. a frozen teacher), once, after the model
        and the checkpoint it starts from have loaded and before anything is written into the run directory."""

    def step(self, run, batches) -> tuple[S.StepResult, dict]:
        raise NotImplementedError

    def before_eval(self, run) -> None:
        """Called before every validation pass."""

    def finish(self, run) -> None:
        """Called once after the last training iteration of a job that reached train.iters."""


class LMObjective(Objective):
    """Next-token cross-entropy over the tokens the batch's ``loss_mask`` keeps (train/step.py).

    Pretraining masks nothing; SFT's data source masks prompt, tool-output and
    padding tokens. Either way megatron-core's per-token loss normalises by the
    number of kept tokens of the whole global batch, exactly, at any layout.
    """

    name = "lm"

    def check(self, cfg) -> None:
        require(not cfg.elastic.enabled, "elastic.enabled", True,
                "the plain LM objective trains one network, not a supernet; train it with the elastic "
                "objective (megatron_ernie.elastic.objective.ElasticObjective, which `ernie pretrain` picks)")

    def step(self, run, batches) -> tuple[S.StepResult, dict]:
        return S.train_step(run.model, run.optimizer, run.scheduler, batches, run.shape, run.groups), {}
