"""The ``[data]`` section of the config: what to train on and how to split it.

Two ways to name the data:

* ``corpus``: a built-in corpus (``"kjv"``, ``"stdlib"``) or a .txt/.jsonl
  file. A byte-level BPE tokenizer of ``vocab_size`` is trained on it, the
  corpus is tokenized, and both are cached under ``cache_dir`` (see
  ``prepare.py``); ``tokenizer`` must then stay empty, so tokenizer and data
  always match.
* ``prefixes``: already preprocessed ``<prefix>.bin/.idx`` files (from
  ``tools/preprocess_data.py``) with the ``tokenizer`` they were made with,
  and optional blend ``weights`` (empty: proportional to size).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from megatron_ernie.config.errors import ConfigError
from megatron_ernie.data.corpus import BUILTIN_SOURCES
from megatron_ernie.data.index_check import check_indexed_files

CACHE_ENV = "ERNIE_DATA_CACHE"
MIN_VOCAB_SIZE = 256 + 2  # every byte, plus the end-of-document and pad tokens
MAX_VOCAB_SIZE = 1 << 20
_SPLIT_PATTERN = re.compile(r"^\s*\d+(\.\d+)?(\s*,\s*\d+(\.\d+)?){0,2}\s*$")


def check_split(split, field: str = "data.split") -> None:
    """Megatron's split string: up to three non-negative weights (train,valid,test), positive sum."""
    if not isinstance(split, str) or not _SPLIT_PATTERN.match(split) or sum(map(float, split.split(","))) <= 0:
        raise ConfigError(field, split, "use up to three non-negative weights like '969,30,1' (0 disables a split)")


@dataclass(frozen=True)
class DataConfig:
    corpus: str = "kjv"  # built-in name or .txt/.jsonl path; unused when prefixes are set
    prefixes: tuple[str, ...] = ()  # preprocessed data; overrides corpus
    weights: tuple[float, ...] = ()  # blend weights for prefixes; empty = by size
    tokenizer: str = ""  # tokenizer.json of the prefixes (required with prefixes)
    vocab_size: int = 4096  # when a tokenizer is trained for corpus
    json_key: str = "text"  # the text field of .jsonl lines
    split: str = "969,30,1"  # train,valid,test shares of the documents
    seed: int = 1234  # shuffles documents and samples
    cache_dir: str = ""  # "" = $ERNIE_DATA_CACHE or ~/.cache/megatron_ernie/data

    def validate(self, path: str) -> None:
        if not self.prefixes:
            self._validate_corpus(path)
        else:
            self._validate_prefixes(path)
        if not MIN_VOCAB_SIZE <= self.vocab_size <= MAX_VOCAB_SIZE:
            fix = f"use {MIN_VOCAB_SIZE}..{MAX_VOCAB_SIZE}, e.g. 4096"
            raise ConfigError(f"{path}.vocab_size", self.vocab_size, fix)
        check_split(self.split, f"{path}.split")

    def _validate_corpus(self, path: str) -> None:
        if self.tokenizer:
            fix = "leave it empty with a corpus (one is trained for it); it goes with prefixes"
            raise ConfigError(f"{path}.tokenizer", self.tokenizer, fix)
        if self.corpus in BUILTIN_SOURCES:
            return
        if not self.corpus.endswith((".txt", ".jsonl")):
            raise ConfigError(f"{path}.corpus", self.corpus, f"use {BUILTIN_SOURCES} or a .txt/.jsonl file")
        if not os.path.isfile(self.corpus):
            raise ConfigError(f"{path}.corpus", self.corpus, "no such file")

    def _validate_prefixes(self, path: str) -> None:
        if not self.tokenizer:
            fix = "give the tokenizer.json the prefixes were made with"
            raise ConfigError(f"{path}.tokenizer", self.tokenizer, fix)
        if self.weights and len(self.weights) != len(self.prefixes):
            fix = f"give one weight per prefix ({len(self.prefixes)}) or none"
            raise ConfigError(f"{path}.weights", self.weights, fix)
        if any(w < 0 for w in self.weights) or (self.weights and sum(self.weights) <= 0):
            raise ConfigError(f"{path}.weights", self.weights, "weights must be >= 0 with a positive sum")

    def check_files(self, path: str = "data") -> None:
        """The preprocessed files are whole (each .bin as long as its .idx says).  Not part of
        ``validate``: a cluster config is validated on machines without its data; jobs call this."""
        for i, prefix in enumerate(self.prefixes):
            check_indexed_files(prefix, f"{path}.prefixes[{i}]")

    def resolved_cache_dir(self) -> str:
        """The cache directory to use (the field, else the environment, else the user cache)."""
        if self.cache_dir:
            return self.cache_dir
        default = os.path.join(os.path.expanduser("~"), ".cache", "megatron_ernie", "data")
        return os.environ.get(CACHE_ENV, default)
