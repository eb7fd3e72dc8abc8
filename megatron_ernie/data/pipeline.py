"""From a ``DataConfig`` to a tokenizer and train/valid/test datasets, in one call.

The order is: resolve the cache directory; for a corpus, prepare it (train a
tokenizer, tokenize, cache: ``prepare.py``); load the tokenizer; build
megatron-core GPT datasets (``datasets.py``). Corpora live under
``<cache>/corpora`` and megatron's sample indices under ``<cache>/indices``.
With ``torch.distributed`` initialised every rank calls ``setup_data``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from megatron_ernie.data.config import DataConfig
from megatron_ernie.data.datasets import build_gpt_datasets
from megatron_ernie.data.prepare import prepare_corpus
from megatron_ernie.data.tokenizer import ByteBPETokenizer, load_tokenizer


@dataclass(frozen=True)
class Data:
    """A tokenizer and the three splits (a split disabled by the split string is None)."""

    tokenizer: ByteBPETokenizer
    tokenizer_path: str
    train: Any
    valid: Any
    test: Any


def setup_data(config: DataConfig, seq_length: int, num_samples: Sequence[Optional[int]]) -> Data:
    """Tokenizer and datasets for ``config``; ``num_samples`` = (train, valid, test) counts."""
    cache_dir = config.resolved_cache_dir()
    if config.prefixes:
        config.check_files()
        tokenizer_path = config.tokenizer
        blend = list(zip(config.weights, config.prefixes)) if config.weights else list(config.prefixes)
    else:
        paths = prepare_corpus(os.path.join(cache_dir, "corpora"), config.corpus, config.vocab_size, config.json_key)
        tokenizer_path, blend = paths.tokenizer_path, paths.prefix
    tokenizer = load_tokenizer(tokenizer_path)
    train, valid, test = build_gpt_datasets(
        blend, config.split, seq_length, num_samples, config.seed, tokenizer, os.path.join(cache_dir, "indices")
    )
    return Data(tokenizer, tokenizer_path, train, valid, test)
