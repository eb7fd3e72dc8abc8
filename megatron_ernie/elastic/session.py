"""Open a trained supernet for evaluation, search or extraction.

The run's resolved config (``<run>/config.toml``) is reloaded with the
parallel layout of *this* launch (any layout: checkpoints reshard on load)
and the run's latest checkpoint is loaded into a fresh process, which trains
nothing and writes nothing into the run directory.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from megatron_ernie import config as C
from megatron_ernie.checkpoint import store, verify
from megatron_ernie.config.errors import ConfigError

SINGLE_PROCESS = ["parallel.tensor=1", "parallel.pipeline=1", "parallel.virtual_pipeline=1", "parallel.expert=1",
                  "parallel.expert_tensor=0", "parallel.sequence_parallel=false",
                  "parallel.distributed_optimizer=false"]


def supernet_config(run_dir: str | Path, overrides=()) -> tuple[C.ErnieConfig, Path]:
    run_dir = Path(run_dir)
    if not (run_dir / "config.toml").is_file():
        raise ConfigError("--run-dir", str(run_dir), "no config.toml there; pass the run.dir of a pretraining run")
    latest = store.find_latest(run_dir / "checkpoints")
    if latest is None:
        raise ConfigError("--run-dir", str(run_dir), "has no checkpoint yet (no checkpoints/latest)")
    verify.check_structure(latest)  # meta.json, index, shards: named errors before any model is built
    cfg = C.load(run_dir / "config.toml", [
        f"checkpoint.load=\"{latest}\"", "checkpoint.resume=\"none\"", "checkpoint.load_optimizer=false",
        "log.tensorboard=false",
        f"run.dir=\"{tempfile.mkdtemp(prefix='ernie-open-')}\"", *overrides])
    if not cfg.elastic.enabled:
        raise ConfigError("--run-dir", str(run_dir), "was not trained with [elastic] enabled")
    return cfg, latest


def open_supernet(run_dir, overrides=(), single_process: bool = False):
    """A loaded ``Run`` (train/loop.py) of the supernet at this launch's layout.

    Without a launcher (no WORLD_SIZE), or when asked, it opens in one process
    at TP1/PP1/EP1.
    """
    import os

    from megatron_ernie.elastic.objective import ElasticObjective
    from megatron_ernie.train import loop

    if single_process or "WORLD_SIZE" not in os.environ:
        overrides = [*SINGLE_PROCESS, *overrides]
    cfg, _ = supernet_config(run_dir, overrides)
    return loop.setup(cfg, ElasticObjective())
