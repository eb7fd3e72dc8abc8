"""Train/valid/test GPT datasets from indexed data, through megatron-core's own builder.

``build_gpt_datasets`` hands a ``GPTDatasetConfig`` to megatron-core's
``BlendedMegatronDatasetBuilder``. The documents of each prefix are split
into train/valid/test by the split string ("969,30,1" means 96.9 % / 3 % /
0.1 % of the documents, in order). Each split's ``GPTDataset`` shuffles its
documents, packs them back to back and cuts samples of ``seq_length + 1``
tokens; a sample ``i`` gives ``tokens = s[:-1]``, ``labels = s[1:]``, a
float ``loss_mask`` of ones and ``position_ids = 0..seq_length-1``. No
attention mask is built (the model uses a causal mask type). A blend of
several prefixes yields a ``BlendedDataset`` whose samples also carry a
``dataset_id``.

Megatron caches the document/sample/shuffle indices as ``.npy`` files in
``cache_dir``, named by an MD5 of the dataset path, seed, sequence length,
split, sample count and tokenizer; a later run with the same settings
reuses them.

Distributed behaviour (megatron-core 0.16): with ``torch.distributed``
initialised every rank must call ``build_gpt_datasets``; global rank 0
builds and writes the index files first, a barrier follows, then the other
ranks read them. ``cache_dir`` must therefore be on a file system all ranks
see. We build on every rank (``is_built_on_rank`` is always true): samples
are small and every rank's loader reads its own slice. Without
``torch.distributed`` the single process builds directly, except that
megatron-core's ``BlendedDataset`` calls ``torch.distributed.get_rank()``
unguarded when its cache misses, so for blends we open a private
one-process gloo group for the duration of the build.

Megatron-core writes its index files non-atomically, so the building process
(rank 0, or the single process) holds a lock file in ``cache_dir`` to keep
two jobs that share the cache from reading each other's half-written files.
"""

from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager, nullcontext
from typing import Optional, Sequence, Union

import numpy
import torch
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.blended_megatron_dataset_config import (
    convert_split_vector_to_split_matrix,
    parse_and_normalize_split,
)
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_ernie.config.errors import ConfigError
from megatron_ernie.data.config import check_split

SPLIT_NAMES = ("train", "valid", "test")
Blend = Union[str, Sequence[str], Sequence[tuple[float, str]]]
_MAX_BIN_BYTES_TO_SCAN = 2 << 30  # token-range check reads the whole .bin: skip beyond 2 GiB


def check_dataset_helpers() -> None:
    """Fail clearly if megatron-core's compiled sample-index helpers do not load."""
    try:
        from megatron.core.datasets import helpers_cpp  # noqa: F401  (shipped precompiled in the wheel)
    except ImportError as error:
        raise RuntimeError(
            f"megatron-core's C++ dataset helpers do not load ({error}); reinstall the megatron-core "
            "wheel for this Python, or build them once with megatron.core.datasets.utils.compile_helpers()"
        ) from None


def build_gpt_datasets(
    blend: Blend,
    split: str,
    seq_length: int,
    num_samples: Sequence[Optional[int]],
    seed: int,
    tokenizer,
    cache_dir: str,
) -> tuple:
    """(train, valid, test) datasets; a split whose weight is 0 comes back as None.

    ``blend`` is one prefix, a list of prefixes (blended by size) or a list
    of (weight, prefix) pairs.
    ``num_samples`` gives the minimum samples per split (None: one epoch;
    megatron repeats epochs to reach larger counts).
    """
    prefixes, weights = normalise_blend(blend)
    _check_arguments(split, seq_length, num_samples, weights)
    check_dataset_helpers()
    for prefix in prefixes:
        _check_prefix(prefix, split, tokenizer.vocab_size)
    config = _gpt_config(prefixes, weights, split, seq_length, seed, tokenizer, cache_dir)
    builder = BlendedMegatronDatasetBuilder(GPTDataset, list(num_samples), lambda: True, config)
    os.makedirs(cache_dir, exist_ok=True)
    with _builder_lock(cache_dir), _process_group_for_blend(len(prefixes) > 1):
        return tuple(builder.build())


def normalise_blend(blend: Blend) -> tuple[list[str], Optional[list[float]]]:
    """megatron's (prefixes, weights) form.

    A single prefix has no weights; a list of bare prefixes is blended in
    proportion to their sizes (weights None).
    """
    if isinstance(blend, (str, os.PathLike)):
        return [os.fspath(blend)], None
    items = list(blend)
    if not items:
        raise ConfigError("data.prefixes", items, "give at least one data prefix")
    if all(isinstance(item, (str, os.PathLike)) for item in items):
        return [os.fspath(item) for item in items], None
    weights = [float(weight) for weight, _ in items]
    if any(weight < 0 for weight in weights) or sum(weights) <= 0:
        raise ConfigError("data.weights", weights, "weights must be >= 0 with a positive sum")
    prefixes = [os.fspath(prefix) for _, prefix in items]
    return prefixes, (weights if len(prefixes) > 1 else None)


def split_document_ranges(split: str, num_documents: int) -> list[Optional[range]]:
    """The documents each split gets, with megatron-core's own rounding (None: split disabled)."""
    matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(split))
    ranges = []
    for bookends in matrix:
        if bookends is None:
            ranges.append(None)
        else:
            ranges.append(range(round(bookends[0] * num_documents), round(bookends[1] * num_documents)))
    return ranges


def _gpt_config(prefixes, weights, split, seq_length, seed, tokenizer, cache_dir) -> GPTDatasetConfig:
    return GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=(prefixes, weights),
        split=split,
        path_to_cache=cache_dir,
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
    )


def _check_arguments(split, seq_length, num_samples, weights) -> None:
    check_split(split)
    if not isinstance(seq_length, int) or seq_length < 1:
        raise ConfigError("seq_length", seq_length, "use a positive integer")
    if len(num_samples) != 3 or any(n is not None and (not isinstance(n, int) or n < 0) for n in num_samples):
        raise ConfigError("num_samples", num_samples, "give (train, valid, test) sample counts: integers >= 0 or None")
    if weights is not None and None in num_samples:
        raise ConfigError("num_samples", num_samples, "a weighted blend needs an integer count for every split")


def _check_prefix(prefix: str, split: str, vocab_size: int) -> None:
    """Existence, non-empty splits, and token ids that fit the tokenizer."""
    if not (os.path.isfile(f"{prefix}.bin") and os.path.isfile(f"{prefix}.idx")):
        fix = "no <prefix>.bin/.idx there; create them with tools/preprocess_data.py"
        raise ConfigError("data.prefixes", prefix, fix)
    indexed = IndexedDataset(prefix, mmap=True)
    for name, documents in zip(SPLIT_NAMES, split_document_ranges(split, len(indexed))):
        if documents is not None and len(documents) == 0:
            raise ConfigError(
                "data.split", split,
                f"leaves the {name} split of {prefix} ({len(indexed)} documents) empty; "
                "give it a larger share, or weight 0 to disable it",
            )
    _check_token_range(prefix, indexed, vocab_size)


def _check_token_range(prefix: str, indexed: IndexedDataset, vocab_size: int) -> None:
    """Catch data tokenized with another vocabulary before it indexes past the embedding."""
    if os.path.getsize(f"{prefix}.bin") > _MAX_BIN_BYTES_TO_SCAN:
        return
    tokens = numpy.memmap(f"{prefix}.bin", dtype=indexed.index.dtype, mode="r")
    largest = int(tokens.max()) if tokens.size else -1
    if largest >= vocab_size:
        raise ConfigError(
            "data.tokenizer", vocab_size,
            f"{prefix} holds token id {largest}, beyond this tokenizer's vocabulary; "
            "use the tokenizer the data was made with",
        )


@contextmanager
def _builder_lock(cache_dir: str):
    """Held by the process that writes megatron's index files (rank 0 or the only one)."""
    builds = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
    if not builds:
        yield
        return
    with open(os.path.join(cache_dir, ".build.lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _process_group_for_blend(is_blend: bool):
    """A throw-away one-process group, because BlendedDataset calls get_rank() unguarded."""
    if not is_blend or torch.distributed.is_initialized():
        return nullcontext()
    return _one_process_group()


@contextmanager
def _one_process_group():
    torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        torch.distributed.destroy_process_group()
