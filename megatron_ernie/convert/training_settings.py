"""The training settings that travel with an exported model, so its import evaluates like the original.

A Hugging Face directory describes the network (``config.json``) and its
vocabulary (``tokenizer.json``), but not what the model was trained and
validated on.  Without that, an import fell back to the default ``[data]``
(another corpus or vocabulary size, so another tokenizer) and ``[train]``
(other evaluation batches), and ``ernie eval`` of the import measured
something else than ``ernie eval`` of the checkpoint it came from.

So ``ernie convert to-hf`` writes the ``[data]``, ``[train]``, ``[optimizer]``
and ``[schedule]`` sections of the exported checkpoint's config next to
``config.json`` (Hugging Face loaders ignore the extra file), and
``ernie convert from-hf`` starts from them when no ``--config`` is given.
Left out on purpose: ``[run]`` and ``[checkpoint]`` (where the original run
lived: an import must never write into it), ``[parallel]`` and ``[slurm]``
(the original's hardware), ``[model]``/``[moe]`` (``config.json`` owns the
architecture), ``[elastic]`` (a Hugging Face model is one plain network) and
``[fp8]`` (the exported weights are plain tensors).
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from megatron_ernie.config import loader
from megatron_ernie.config.errors import ConfigError
from megatron_ernie.config.schema import OptimizerConfig, ScheduleConfig, TrainConfig
from megatron_ernie.convert.staging import write_text_synced
from megatron_ernie.data.config import DataConfig

SETTINGS_FILE = "megatron_ernie_training.toml"


@dataclass(frozen=True)
class TrainingSettings:
    """The carried sections, with the same names and types as in the full config tree."""

    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)


def write_settings(cfg, out_dir: Path) -> str:
    """Write the carried sections of ``cfg`` (our full config) into ``out_dir``; returns the file name."""
    settings = TrainingSettings(cfg.data, cfg.train, cfg.optimizer, cfg.schedule)
    write_text_synced(Path(out_dir) / SETTINGS_FILE, loader.dumps(settings))
    return SETTINGS_FILE


def read_settings(hf_dir: Path) -> dict:
    """The carried sections as a raw config mapping ({} when the directory has none: not our export).

    Checked against the schema here, so a damaged file is an error naming it, not a
    wrong key reported as if the user had typed it."""
    path = Path(hf_dir) / SETTINGS_FILE
    if not path.is_file():
        return {}
    try:
        raw = tomllib.loads(loader.decode_utf8(path, str(path)))
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(str(path), "", f"is not valid TOML ({err}); delete it to import with the default "
                                         "training settings, or pass --config") from None
    try:
        loader.build(TrainingSettings, raw)
    except ConfigError as err:
        raise ConfigError(f"{path}:{err.field}", err.value, f"{err.fix}; delete the file to import with "
                                                            "the default training settings, or pass --config") from None
    return raw
