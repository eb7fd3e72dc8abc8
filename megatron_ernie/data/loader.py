"""Deterministic, resumable micro-batches for one data-parallel rank.

The data position is one integer, ``consumed_samples``: how many samples all
ranks together have consumed (a multiple of the global batch size). Sample
order is fixed by the dataset itself (megatron's GPTDataset is already
shuffled by its seed), so the loader only decides which sample indices of
that order go where. The layout is Megatron-LM's
``MegatronPretrainingSampler``::

    global batch k covers dataset indices  [k*G, (k+1)*G)
    micro-batch m of DP rank r holds       k*G + m*(M*D) + r*M + [0, M)

with G the global batch size, M the micro-batch size, D the data-parallel
size and ``num_microbatches = G / (M*D)``. Consequences, both by
construction and tested:

* resume: starting at ``consumed_samples = k*G`` yields exactly the batches
  an uninterrupted run yields from batch k on;
* DP-invariance: the union over ranks of global batch k is the same G
  samples for any D, so runs with DP=1 and DP=2 see identical global batches
  (only their split into micro-batches differs).

Iteration stops when the next global batch does not fit entirely in the
dataset (a partial last batch is dropped, like ``drop_last``); size the
training split with ``num_samples >= iterations * G``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

from megatron_ernie.config.errors import ConfigError

BATCH_KEYS = ("tokens", "labels", "loss_mask", "position_ids")


@dataclass(frozen=True)
class BatchLayout:
    """How a global batch is cut into micro-batches and spread over DP ranks."""

    global_batch_size: int
    micro_batch_size: int
    dp_size: int = 1
    dp_rank: int = 0

    def __post_init__(self) -> None:
        self.validate("batch")

    def validate(self, path: str) -> None:
        for name in ("global_batch_size", "micro_batch_size", "dp_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{path}.{name}", getattr(self, name), "must be a positive integer")
        if not 0 <= self.dp_rank < self.dp_size:
            raise ConfigError(f"{path}.dp_rank", self.dp_rank, f"must be in [0, dp_size={self.dp_size})")
        if self.global_batch_size % (self.micro_batch_size * self.dp_size):
            raise ConfigError(
                f"{path}.global_batch_size", self.global_batch_size,
                f"must be a multiple of micro_batch_size * dp_size = {self.micro_batch_size * self.dp_size}",
            )

    @property
    def num_microbatches(self) -> int:
        return self.global_batch_size // (self.micro_batch_size * self.dp_size)

    def sample_indices(self, global_batch: int) -> list[list[int]]:
        """Dataset indices of this rank's micro-batches in global batch ``global_batch``."""
        start = global_batch * self.global_batch_size + self.dp_rank * self.micro_batch_size
        stride = self.micro_batch_size * self.dp_size
        return [
            list(range(start + m * stride, start + m * stride + self.micro_batch_size))
            for m in range(self.num_microbatches)
        ]


def iter_global_batches(dataset, layout: BatchLayout, consumed_samples: int = 0) -> Iterator[list[dict]]:
    """For each global batch from ``consumed_samples`` on: this rank's list of micro-batches.

    Each micro-batch is a dict of ``BATCH_KEYS`` tensors of shape
    [micro_batch_size, seq_length] (int64, except float32 ``loss_mask``).
    """
    if consumed_samples < 0 or consumed_samples % layout.global_batch_size:
        raise ConfigError(
            "consumed_samples", consumed_samples,
            f"must be a non-negative multiple of global_batch_size={layout.global_batch_size} "
            "(a position saved in a checkpoint)",
        )
    global_batch = consumed_samples // layout.global_batch_size
    while (global_batch + 1) * layout.global_batch_size <= len(dataset):
        yield [collate([dataset[i] for i in indices]) for indices in layout.sample_indices(global_batch)]
        global_batch += 1


def num_global_batches(dataset, layout: BatchLayout) -> int:
    """How many whole global batches the dataset holds."""
    return len(dataset) // layout.global_batch_size


def collate(samples: list[dict]) -> dict[str, torch.Tensor]:
    """Stack the training fields of samples into [batch, seq] tensors (extra keys dropped)."""
    return {key: torch.stack([sample[key] for sample in samples]) for key in BATCH_KEYS}
