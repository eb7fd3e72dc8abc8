"""A generation engine holding a saved model: for teachers, judges and evaluation.

Post-training reads models from checkpoints in several roles that never train
them: a distillation teacher scoring the student's tokens, a judge, and
`ernie eval-tasks`. Each needs the same three things from a checkpoint
directory: the model config it was trained with (its ``config.toml``), the
tokenizer its ids mean (its ``tokenizer.json``) and the weights, in a
`MegatronEngine` built as the rollout builds it (the whole model, TP1, at the
requested dtype, no FP8 rewrite: a scorer computes exact probabilities).

Weights load through megatron-core's dist_checkpointing into the engine's own
model chunk (checkpoint/store.py). Keys are global and megatron-core reshards
on load, so a checkpoint saved at any TP/PP/EP layout (pretraining, an RL
trainer, an elastic extraction, an import or an offline reshard) loads here
unchanged; the padded vocabulary is layout-independent (lcm(128, TP)).
Optimizer state and RNG streams are not read.
"""

from __future__ import annotations

from pathlib import Path

import torch.distributed as dist

from megatron_ernie import config as C
from megatron_ernie.checkpoint import store
from megatron_ernie.checkpoint.store import CheckpointError
from megatron_ernie.config.errors import ConfigError

CONFIG_FILE = "config.toml"
TOKENIZER_FILE = "tokenizer.json"


def resolve_checkpoint(path, field: str = "checkpoint") -> Path:
    """The complete iter_N directory meant by `path`: itself, or what `latest` names in it or its checkpoints/."""
    path = Path(path)
    if not path.is_dir():
        raise ConfigError(field, str(path), "no such directory; give an iter_N checkpoint directory, "
                                            "a checkpoints directory or a run directory")
    if (path / store.META).is_file():
        return _complete(path)
    for root in (path, path / "checkpoints"):
        found = store.find_latest(root)  # raises CheckpointError if `latest` names a broken directory
        if found is not None:
            return _complete(found)
    raise CheckpointError(f"{path} holds no checkpoint: no {store.META} and no `latest` in it or in "
                          f"{path / 'checkpoints'}; pass a complete iter_* directory (a *.tmp one is "
                          "still being written) or a run directory whose checkpoints/latest names one")


def _complete(ckpt: Path) -> Path:
    """`ckpt` if its meta.json reads; a damaged one is a CheckpointError, not a JSON traceback."""
    try:
        store.read_meta(ckpt)
    except (ValueError, TypeError) as err:  # bad JSON, or fields that are not a Meta
        raise CheckpointError(f"{ckpt / store.META} is damaged ({str(err)[:200]}); load an earlier "
                              f"complete iter_* directory or re-save the checkpoint") from None
    return ckpt


def checkpoint_config(ckpt: Path):
    """The ErnieConfig the checkpoint was trained with (its config.toml), validated section by section."""
    file = ckpt / CONFIG_FILE
    if not file.is_file():
        raise CheckpointError(f"{ckpt} has no {CONFIG_FILE}: the model config cannot be known; copy the "
                              f"run's resolved {CONFIG_FILE} (written next to its checkpoints) into {ckpt}")
    cfg = C.load(file)
    C.validate(cfg)
    return cfg


def checkpoint_tokenizer(ckpt: Path, field: str = "checkpoint"):
    """The tokenizer saved with the checkpoint (byte-level BPE or character; ids 0 = end of text, 1 = pad)."""
    from megatron_ernie.data.tokenizer import load_tokenizer

    file = ckpt / TOKENIZER_FILE
    if not file.is_file():
        raise CheckpointError(f"{ckpt} has no {TOKENIZER_FILE}: its token ids cannot be interpreted; copy "
                              f"the tokenizer the model was trained with into {file}")
    return load_tokenizer(str(file), f"{field} ({TOKENIZER_FILE})")


def check_saved_shapes(ckpt: Path, expected: dict[str, tuple[int, ...]]) -> None:
    """Every weight the engine loads is saved in `ckpt` with the engine's global shape.

    Needed because a torch_dist load reads whatever region of a saved tensor
    overlaps the requested one: an embedding built for a larger vocabulary than
    the saved one would load without error, half of it left at its random init.
    Also finds missing or truncated shard files before megatron-core does.
    """
    from megatron_ernie.convert.dcp_io import DcpReader
    from megatron_ernie.convert.errors import ConvertError

    try:
        saved = DcpReader(ckpt).tensors()
    except ConvertError as err:
        raise CheckpointError(f"{ckpt} is damaged: {err}") from None
    missing = sorted(k for k in expected if k not in saved)
    wrong = {k: (saved[k].shape, tuple(v)) for k, v in expected.items() if k in saved and saved[k].shape != tuple(v)}
    if missing:
        raise CheckpointError(f"{ckpt} lacks {len(missing)} weights of its own config's model (e.g. {missing[0]!r}); "
                              f"its {CONFIG_FILE} does not describe the saved model: restore the run's config")
    if wrong:
        key, (have, want) = next(iter(wrong.items()))
        vocab = " (the vocabulary: its tokenizer.json is not the one the model was trained with)" \
            if "embedding" in key or "output_layer" in key else ""
        raise CheckpointError(f"{ckpt}: {len(wrong)} saved weights have other shapes than its {CONFIG_FILE} and "
                              f"{TOKENIZER_FILE} give{vocab}, e.g. {key!r} saved {have}, expected {want}; "
                              f"restore the checkpoint's own {CONFIG_FILE} and {TOKENIZER_FILE}")


def _solo_groups(seed: int):
    """megatron-core groups for this process alone (a world of one, created if none exists)."""
    from megatron_ernie.rl.rollout.worker import init_solo_world

    if dist.is_initialized() and dist.get_world_size() != 1:
        raise ValueError(f"engine_from_checkpoint: this process is in a torch world of {dist.get_world_size()}; "
                         "pass the megatron-core groups of a whole-model (TP1) replica as `groups`")
    return init_solo_world(seed)


def engine_from_checkpoint(path, dtype: str = "fp32", seed: int = 0, groups=None, field: str = "checkpoint"):
    """(MegatronEngine, tokenizer, ErnieConfig) of the checkpoint at `path` (iter_N, checkpoints or run dir).

    The engine serves the checkpoint's iteration as its policy version. `seed`
    seeds its sampler; `groups` are megatron-core groups of a TP1 model (by
    default this process alone, initialising torch.distributed if needed).
    """
    from megatron_ernie.rl.rollout.megatron_engine import MegatronEngine

    ckpt = resolve_checkpoint(path, field)
    cfg = checkpoint_config(ckpt)
    tokenizer = checkpoint_tokenizer(ckpt, field)
    groups = groups if groups is not None else _solo_groups(seed)
    engine = MegatronEngine(cfg.model, cfg.moe, groups, tokenizer.vocab_size, dtype=dtype, seed=seed)
    check_saved_shapes(ckpt, engine.weight_shapes())
    meta = store.load(ckpt, [engine.model], None, restore_rng=False)
    engine.model.eval()
    engine.policy_version = meta.iteration
    return engine, tokenizer, cfg
