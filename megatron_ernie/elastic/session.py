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
TOKENIZER_FILE = "tokenizer.json"  # carried in every checkpoint (train/loop.py, elastic/extract.py, imports)


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
    extracted sub-network, an import, a non-elastic run), at this launch's layout.

    Its data is the config's, checked to be tokenized with the checkpoint's own tokenizer
    (``check_data_tokenizer``) before any model is built."""
    import os

    from megatron_ernie.train import loop

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:  # no launcher, or a world of one: TP1/PP1/EP1 only
        overrides = [*SINGLE_PROCESS, *overrides]
    cfg, latest = run_config(path, overrides)
    data_source = _checked_data(cfg, latest, verify.read_meta_dict(latest))
    if cfg.elastic.enabled:
        from megatron_ernie.elastic.objective import ElasticObjective

        return loop.setup(cfg, ElasticObjective(), data_source)
    return loop.setup(cfg, data_source=data_source)


def _checked_data(cfg: C.ErnieConfig, checkpoint: Path, meta: dict):
    """The run's pretraining data source, refusing data of another tokenizer than the checkpoint's."""
    from megatron_ernie.train import loop

    make = loop.pretraining_data(cfg)

    def source(seq_length, num_samples):
        data = make(seq_length, num_samples)
        check_data_tokenizer(data, cfg.data, checkpoint, meta)
        return data
    return source


def check_data_tokenizer(data, data_cfg, checkpoint: Path, meta: dict) -> None:
    """The validation data must be tokenized with the checkpoint's own tokenizer.

    A model reads token ids, and the same ids from another tokenizer are other
    words: an import evaluated on the default corpus (which trains its own
    tokenizer) reported 8.12 nats for a model whose loss is 7.40, without a
    word.  Every checkpoint of ours carries its ``tokenizer.json``, so the check
    is exact (content hashes).  An import whose Hugging Face directory had no
    tokenizer.json that we read is evaluated only on data the user tokenized
    for it (``data.prefixes`` with its ``data.tokenizer``: the user's word);
    other checkpoints without one predate carried tokenizers and are trusted.
    """
    own = checkpoint / TOKENIZER_FILE
    wanted = _tokenizer_hash(own)
    if wanted is None:
        if _imported(meta) and not data_cfg.prefixes:
            raise ConfigError("data", _data_name(data_cfg), f"the checkpoint {checkpoint} has no {TOKENIZER_FILE} "
                              "that megatron_ernie reads (its Hugging Face directory brought none), so no corpus "
                              f"can be tokenized for its vocabulary here; {_fix(checkpoint, 'TOKENIZER.json')}")
        return
    if wanted != data.tokenizer.sha256:
        raise ConfigError("data", _data_name(data_cfg), f"is tokenized with {data.tokenizer_path} (sha256 "
                          f"{data.tokenizer.sha256[:12]}), but the checkpoint {checkpoint} has another vocabulary "
                          f"({own}, sha256 {wanted[:12]}): its loss there would be meaningless; {_fix(checkpoint, own)}"
                          + (", or import it again with --config <its run>/config.toml" if _imported(meta) else ""))


def _tokenizer_hash(path: Path) -> str | None:
    """Content hash of a tokenizer.json we can read; None when there is none, or a foreign one."""
    from megatron_ernie.data.tokenizer import tokenizer_hash

    if not path.is_file():
        return None
    try:
        return tokenizer_hash(str(path), str(path))
    except ConfigError:  # not JSON, or not our byte-BPE/character tokenizer (no end-of-text/pad tokens)
        return None


def _imported(meta: dict) -> bool:
    """Weights that came from a Hugging Face directory (convert/importer.py records the source)."""
    source = meta.get("extra", {}).get("source")
    return isinstance(source, dict) and source.get("format") == "huggingface"


def _data_name(data_cfg) -> str:
    if data_cfg.prefixes:
        return f"prefixes={list(data_cfg.prefixes)}, tokenizer={data_cfg.tokenizer}"
    return f"corpus={data_cfg.corpus}, vocab_size={data_cfg.vocab_size}"


def _fix(checkpoint: Path, tokenizer) -> str:
    """How to evaluate a model on text of one's own, tokenized with the model's vocabulary."""
    return (f"evaluate it on text (TEXT: a .txt/.jsonl file, or kjv) tokenized with its own tokenizer: "
            f"`ernie preprocess --input TEXT --output-prefix P --tokenizer {tokenizer}`, then "
            f"`ernie eval --run-dir {checkpoint} --set 'data.prefixes=[\"P\"]' --set data.tokenizer={tokenizer}`")
