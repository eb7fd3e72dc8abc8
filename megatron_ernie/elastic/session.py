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


def locate(path: str | Path) -> tuple[Path, Path]:
    """(config.toml, checkpoint directory) of a run directory (its latest checkpoint), a checkpoints/
    root, or one checkpoint directory (an iter_* directory or an import: its own config.toml)."""
    path = Path(path)
    if (path / store.META).is_file():
        config, latest = path / "config.toml", path
    else:
        root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
        config = (root.parent if root.name == "checkpoints" else path) / "config.toml"
        latest = store.find_latest(root)
        if latest is None:
            raise ConfigError("--run-dir", str(path), "has no checkpoint (no meta.json, no checkpoints/latest); "
                                                      "pass a run directory or a checkpoint directory")
    if not config.is_file():
        raise ConfigError("--run-dir", str(path), f"no {config.name} at {config.parent}; pass the run.dir of a "
                                                  "training run or a checkpoint directory")
    verify.check_structure(latest)  # meta.json, index, shards: named errors before any model is built
    return config, latest


def run_config(path: str | Path, overrides=()) -> tuple[C.ErnieConfig, Path]:
    """The config of the run or checkpoint at ``path``, set up to load it read-only, and the checkpoint."""
    config, latest = locate(path)
    cfg = C.load(config, [
        f"checkpoint.load=\"{latest}\"", "checkpoint.resume=\"none\"", "checkpoint.load_optimizer=false",
        "log.tensorboard=false",
        f"run.dir=\"{tempfile.mkdtemp(prefix='ernie-open-')}\"", *overrides])
    return cfg, latest


def supernet_config(run_dir: str | Path, overrides=()) -> tuple[C.ErnieConfig, Path]:
    cfg, latest = run_config(run_dir, overrides)
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


def open_any(path, overrides=()):
    """A loaded ``Run`` of any checkpoint: a supernet (elastic objective) or a plain model (an
    extracted sub-network, an import, a non-elastic run), at this launch's layout."""
    import os

    from megatron_ernie.train import loop

    if "WORLD_SIZE" not in os.environ:
        overrides = [*SINGLE_PROCESS, *overrides]
    cfg, _ = run_config(path, overrides)
    if cfg.elastic.enabled:
        from megatron_ernie.elastic.objective import ElasticObjective

        return loop.setup(cfg, ElasticObjective())
    return loop.setup(cfg)
