"""The elastic supernet's training objective: the sandwich step (elastic/train.py) behind train/objective.py.

Each optimizer step trains the largest, the smallest (unless
``sandwich_smallest`` is off), every declared target and ``sandwich_random``
random sub-networks (in-place distillation from the largest, its weight on the
``distill_ramp_iters`` schedule, optionally gated per token); before
``open_after`` only the largest.  Validation measures the full network; after
the last iteration the family table and Pareto plot of ``eval_subnets``
sub-networks are written.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from megatron_ernie.config.errors import require
from megatron_ernie.elastic import search
from megatron_ernie.elastic.model import apply_subnet
from megatron_ernie.elastic.params import subnet_size
from megatron_ernie.elastic.subnet import choices, full_subnet, sample_step, target_subnets
from megatron_ernie.elastic.train import Distill, elastic_train_step
from megatron_ernie.model.build import padded_vocab_size
from megatron_ernie.train.objective import Objective


class ElasticObjective(Objective):
    name = "elastic"

    def check(self, cfg) -> None:
        require(cfg.elastic.enabled, "elastic.enabled", False,
                "the elastic objective trains a supernet; set elastic.enabled = true or use the LM objective")

    def step(self, run, batches):
        cfg = run.cfg
        axis_choices = choices(cfg.elastic, cfg.model, cfg.moe)
        iteration = run.progress.iteration
        targets = target_subnets(cfg.elastic, cfg.model, cfg.moe)
        sampled = sample_step(cfg.elastic, axis_choices, iteration, cfg.run.seed, targets)
        distill = Distill(distill_weight_at(cfg.elastic, iteration), cfg.elastic.distill_gate)
        result, losses = elastic_train_step(run.model, run.optimizer, run.scheduler, batches, run.shape,
                                            run.groups, sampled, distill)
        vocab = padded_vocab_size(run.data.tokenizer.vocab_size, cfg.parallel.tensor)
        active = [subnet_size(cfg.model, cfg.moe, vocab, s, cfg.elastic.layer_order).active for _, s in sampled]
        scalars = {f"elastic/{k.replace('/', '_')}": v for k, v in losses.items() if k not in ("lm loss", "tokens")}
        scalars["elastic/active_params_mean"] = sum(active) / len(active)
        scalars["elastic/objective"] = result.loss  # the sandwich objective, distillation included
        scalars["elastic/distill_weight"] = distill.weight
        scalars["elastic/members"] = len(sampled)
        # the iteration line and train/loss report the largest sub-network's LM loss
        return dataclasses.replace(result, loss=losses.get("loss/largest", result.loss)), scalars

    def before_eval(self, run) -> None:
        use_full_model(run)

    def finish(self, run) -> None:
        if run.cfg.elastic.eval_subnets:
            write_family(run)


def distill_weight_at(elastic, iteration: int) -> float:
    """The KL weight of step ``iteration``: ``distill_weight`` x min(1, iteration / distill_ramp_iters),
    0 at the first step and the full weight from step ``distill_ramp_iters`` on (constant when 0).
    A ramp keeps the small members from imitating a largest that is, early on, no better than
    they are; it counts from the run's first step (with ``open_after`` the largest trains alone
    before, so a ramp shorter than ``open_after`` is already complete when the axes open)."""
    ramp = elastic.distill_ramp_iters
    return elastic.distill_weight * (min(1.0, iteration / ramp) if ramp else 1.0)


def use_full_model(run) -> None:
    full = full_subnet(run.cfg.model, run.cfg.moe)
    for chunk in run.model:
        apply_subnet(chunk, full)


def write_family(run) -> None:
    """Evaluate a spread of sub-networks and write the family table and Pareto plot."""
    rows = search.evaluate_family(run, run.cfg.elastic.eval_subnets)
    search.write_outputs(rows, Path(run.cfg.run.dir) / "elastic", "family")
    use_full_model(run)
