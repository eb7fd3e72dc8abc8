"""Token documents to and from megatron-core's indexed dataset (``.bin`` + ``.idx``).

The format is megatron-core's own (``megatron.core.datasets.indexed_dataset``):
``<prefix>.bin`` holds every token id back to back; ``<prefix>.idx`` holds the
dtype, each sequence's length and byte offset, and the document boundaries.
We store one sequence per document, as Megatron-LM's ``preprocess_data.py``
does without sentence splitting; GPTDataset splits train/valid/test by
sequence, so here by document. Ids are stored as uint16 when the vocabulary
fits (megatron's ``DType.optimal_dtype``), which halves the file.

While writing we hash every document's ids; ``verify_indexed_dataset`` reads
the files back through megatron-core's reader and compares the hash, so a
round-trip check costs one pass and no second copy of the corpus in memory.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy
from megatron.core.datasets.indexed_dataset import DType, IndexedDataset, IndexedDatasetBuilder


@dataclass(frozen=True)
class IndexedStats:
    """What an indexed dataset holds: counts and a hash of all token ids."""

    documents: int
    tokens: int
    sha256: str


def write_indexed_dataset(prefix: str, documents: Iterable[Sequence[int]], vocab_size: int) -> IndexedStats:
    """Write ``<prefix>.bin/.idx``, one sequence per document, and return its stats."""
    dtype = DType.optimal_dtype(vocab_size)
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=dtype)
    digest, count, tokens = hashlib.sha256(), 0, 0
    for ids in documents:
        array = numpy.asarray(ids, dtype=dtype)
        builder.add_document(array, [array.size])
        _hash_document(digest, array)
        count, tokens = count + 1, tokens + array.size
    builder.finalize(f"{prefix}.idx")
    return IndexedStats(count, tokens, digest.hexdigest())


def read_indexed_stats(prefix: str) -> IndexedStats:
    """Stats of an existing indexed dataset, read through megatron-core's reader."""
    dataset = IndexedDataset(prefix, mmap=True)
    digest = hashlib.sha256()
    for index in range(len(dataset)):
        _hash_document(digest, dataset[index])
    tokens = int(dataset.sequence_lengths.sum())
    return IndexedStats(len(dataset), tokens, digest.hexdigest())


def read_document(prefix_or_dataset, index: int) -> list[int]:
    """The token ids of one document (for inspection and tests)."""
    dataset = prefix_or_dataset
    if isinstance(dataset, str):
        dataset = IndexedDataset(dataset, mmap=True)
    return [int(i) for i in dataset[index]]


def verify_indexed_dataset(prefix: str, expected: IndexedStats) -> None:
    """Fail unless the files at ``prefix`` hold exactly what was written."""
    found = read_indexed_stats(prefix)
    if found != expected:
        raise RuntimeError(f"indexed dataset {prefix} does not round-trip: wrote {expected}, read {found}")


def _hash_document(digest, ids: numpy.ndarray) -> None:
    """Hash ids independent of storage dtype, with a length so boundaries count."""
    as_int64 = numpy.asarray(ids, dtype=numpy.int64)
    digest.update(numpy.int64(as_int64.size).tobytes())
    digest.update(as_int64.tobytes())
