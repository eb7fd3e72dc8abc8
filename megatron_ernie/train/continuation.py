"""Continuing to train an extracted sub-network where its supernet stopped.

``ernie extract`` writes a weights-only checkpoint, and until now a run that
loaded it started like a fresh one: the data stream at sample 0 (re-reading
what the supernet saw first) and the LR schedule warming up to the config's
peak within a few steps (3.3x the supernet's final LR in the elastic
benchmark).  Pruning-then-continue recipes (Sheared-LLaMA, Minitron) instead
continue on fresh data at an LR at or below where the parent ended, after a
short warmup of 3-10% of the continuation.

The extracted checkpoint therefore records, in ``meta.extra["continuation"]``,
the supernet's data position and its final LR (``source_record``).  A run
whose ``checkpoint.load`` is such a checkpoint then:

* starts reading the data at the supernet's ``consumed_samples`` (rounded up
  to this run's global batch), unless ``checkpoint.load_data_position=false``;
* warms up over ``schedule.continue_warmup_fraction`` of ``train.iters`` to
  ``schedule.continue_peak_fraction`` x the supernet's final LR and decays to
  ``min(optimizer.min_lr, peak)`` (``continue_peak_fraction=0``: the config's
  own schedule).

Its own checkpoints are ordinary ones (their data position includes the
supernet's samples), so a requeued continuation resumes exactly.
SFT (``checkpoint.load_weights_only``) never continues a data position.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

from megatron_ernie import config as C
from megatron_ernie.checkpoint import verify

KEY = "continuation"


def source_record(run) -> dict:
    """What a continuation needs from the run being extracted: its data position and final LR."""
    p = run.progress
    return {"consumed_samples": p.consumed_samples, "consumed_tokens": p.consumed_tokens,
            "iteration": p.iteration, "global_batch_size": run.cfg.train.global_batch_size,
            "final_lr": float(run.optimizer.param_groups[0]["lr"]), "peak_lr": run.cfg.optimizer.lr}


def record_of(ck: C.schema.CheckpointConfig, path: Path | None) -> dict | None:
    """The continuation record of the checkpoint a run starts from, when it starts as a continuation:
    ``path`` is ``checkpoint.load`` itself (not the run's own latest), not loaded as SFT weights."""
    if path is None or ck.load_weights_only or not ck.load or Path(ck.load) != path:
        return None
    extra = verify.read_meta_dict(path).get("extra", {})
    return extra.get(KEY) if extra.get("weights_only") else None


def data_start(record: dict | None, ck, global_batch_size: int) -> int:
    """The sample a continuation reads first: the source's position, rounded up to whole global
    batches of this run (the loader starts at batch boundaries; the skipped samples are unseen)."""
    if record is None or not ck.load_data_position:
        return 0
    return math.ceil(record["consumed_samples"] / global_batch_size) * global_batch_size


def schedule(cfg: C.ErnieConfig, record: dict | None):
    """(optimizer config, schedule config) of the run: a continuation's warms up to a fraction of
    its source's final LR and decays to min_lr; any other run's are the config's."""
    frac = cfg.schedule.continue_peak_fraction
    if record is None or frac == 0:
        return cfg.optimizer, cfg.schedule
    peak = frac * record["final_lr"]
    optim = dataclasses.replace(cfg.optimizer, lr=peak, min_lr=min(cfg.optimizer.min_lr, peak))
    warmup = round(cfg.schedule.continue_warmup_fraction * cfg.train.iters)
    return optim, dataclasses.replace(cfg.schedule, warmup_iters=warmup)


_LR_KEYS = ("lr", "max_lr", "min_lr")


def lr_bounds(optimizer) -> list[dict]:
    """Each parameter group's LR settings (megatron-core's scheduler reads max_lr/min_lr from the groups)."""
    return [{k: g[k] for k in _LR_KEYS if k in g} for g in optimizer.param_groups]


def restore_lr_bounds(optimizer, bounds: list[dict]) -> None:
    """Put this run's LR settings back after loading optimizer state into a new run: the state of an
    extracted checkpoint (``ernie extract --optimizer``) carries the groups it was saved with, whose
    max_lr would otherwise override the continuation's schedule."""
    for group, saved in zip(optimizer.param_groups, bounds):
        group.update(saved)
