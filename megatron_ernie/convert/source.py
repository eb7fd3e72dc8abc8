"""Find a checkpoint directory and read what it says about itself (no megatron import).

Accepted: a checkpoint directory (``.../iter_0000020``, holding ``meta.json``),
a checkpoints root holding ``latest``, or a run directory whose
``checkpoints/latest`` names one.  ``meta.json`` carries the iteration, the
data position and, under ``extra.config``, the resolved config the model was
built from: that config, not the caller, defines the tensor shapes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from megatron_ernie.config import loader
from megatron_ernie.config.errors import ConfigError
from megatron_ernie.config.schema import ErnieConfig
from megatron_ernie.convert.errors import ConvertError

META = "meta.json"
LATEST = "latest"


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    meta: dict
    config: ErnieConfig

    @property
    def weights_only(self) -> bool:
        return bool(self.meta.get("extra", {}).get("weights_only", False))


def resolve(path, field: str = "checkpoint") -> Path:
    path = Path(path)
    for root in (path, path / "checkpoints"):
        if (root / META).is_file():
            return root
        pointer = root / LATEST
        if pointer.is_file():
            named = root / pointer.read_text().strip()
            if not (named / META).is_file():
                raise ConvertError(f"{pointer} names {named.name}, which is incomplete or missing")
            return named
    if not path.exists():
        raise ConfigError(field, str(path), "no such directory")
    raise ConfigError(field, str(path), f"not a checkpoint: no {META} (is it still being written, "
                                        f"or a *.tmp directory?); pass a complete iter_* directory")


def open_checkpoint(path, field: str = "checkpoint") -> Checkpoint:
    path = resolve(path, field)
    try:
        meta = json.loads((path / META).read_text())
    except json.JSONDecodeError as err:
        raise ConvertError(f"{path / META} is not valid JSON ({err}); the checkpoint is damaged") from None
    raw = meta.get("extra", {}).get("config")
    if not isinstance(raw, dict):
        raise ConvertError(f"{path / META} has no extra.config; it was not written by megatron_ernie")
    return Checkpoint(path, meta, loader.build(ErnieConfig, raw))
