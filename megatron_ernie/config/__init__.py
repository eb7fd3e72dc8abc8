"""Configuration: load TOML + overrides into the frozen tree, then validate."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from megatron_ernie.config.errors import ConfigError, require
from megatron_ernie.config.loader import apply_overrides, build, dumps, read_toml
from megatron_ernie.config.schema import ErnieConfig

__all__ = ["ConfigError", "ErnieConfig", "load", "validate", "dumps", "save_resolved"]


def load(path: str | Path | None = None, overrides=()) -> ErnieConfig:
    """Read a TOML file (or the defaults when None), apply --set overrides, build the tree."""
    raw = read_toml(path) if path else {}
    raw = apply_overrides(raw, overrides)
    return build(ErnieConfig, raw)


def validate(cfg: ErnieConfig, world_size: int | None = None) -> None:
    """Per-section rules, then cross-section rules (those need the world size)."""
    for f in dataclasses.fields(cfg):
        section = getattr(cfg, f.name)
        if hasattr(section, "validate"):
            section.validate(f.name)
    from megatron_ernie.config.checks import check_all, check_elastic_vs_model, check_rl_tasks

    if world_size is not None:
        require(world_size >= 1, "--world-size", world_size, "give the number of processes (>= 1)")
        check_all(cfg, world_size)
    check_elastic_vs_model(cfg.elastic, cfg.model, cfg.moe)  # needs no world size: show-config checks it too
    check_rl_tasks(cfg.rl.tasks)


def save_resolved(cfg: ErnieConfig, run_dir: str | Path) -> Path:
    path = Path(run_dir) / "config.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".toml.tmp")
    tmp.write_text(dumps(cfg))
    tmp.replace(path)
    return path
