"""Documents to megatron-core indexed dataset: tokenize, append end-of-document, write, verify.

Every document becomes its token ids followed by one ``<|endoftext|>`` id, the
Megatron-LM convention (``preprocess_data.py --append-eod``): GPTDataset
packs documents back to back into fixed-length samples, and the end token is
what tells the model that a new document starts.

``main(argv)`` is the command line (``tools/preprocess_data.py``, and
``ernie preprocess``); the functions below it are the API.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from itertools import islice
from typing import Iterable, Iterator

from megatron_ernie.config.errors import ConfigError
from megatron_ernie.config.outputs import check_writable_prefix
from megatron_ernie.data.corpus import BUILTIN_SOURCES, CorpusError, iter_documents
from megatron_ernie.data.indexed import verify_indexed_dataset, write_indexed_dataset
from megatron_ernie.data.tokenizer import ByteBPETokenizer, load_tokenizer, train_tokenizer

_ENCODE_BATCH = 256  # documents per encode_batch call: parallel, yet bounded memory


@dataclass(frozen=True)
class PreprocessResult:
    """Where the outputs are and how much they hold."""

    prefix: str
    tokenizer_path: str
    documents: int
    tokens: int


def tokenize_documents(documents: Iterable[str], tokenizer: ByteBPETokenizer) -> Iterator[list[int]]:
    """Token ids of each document, each ending with the end-of-document id."""
    documents = iter(documents)
    while batch := list(islice(documents, _ENCODE_BATCH)):
        for ids in tokenizer.encode_batch(batch):
            yield ids + [tokenizer.eod]


def preprocess(
    source: str,
    output_prefix: str,
    tokenizer_path: str | None = None,
    vocab_size: int = 4096,
    json_key: str = "text",
    tokenizer_out: str | None = None,
) -> PreprocessResult:
    """Tokenize ``source`` (built-in name or .txt/.jsonl path) into ``<output_prefix>.bin/.idx``.

    With ``tokenizer_path`` the tokenizer is reused; otherwise one of
    ``vocab_size`` is trained on the same source and saved to
    ``tokenizer_out`` (default ``<output_prefix>.tokenizer.json``). The source
    is read twice (train, then encode) so memory stays bounded.
    """
    check_writable_prefix("--output-prefix", output_prefix)
    if tokenizer_out:
        check_writable_prefix("--tokenizer-out", tokenizer_out)
    os.makedirs(os.path.dirname(os.path.abspath(output_prefix)), exist_ok=True)
    if tokenizer_path:
        tokenizer = load_tokenizer(tokenizer_path, field="--tokenizer")
    else:
        tokenizer = train_tokenizer(iter_documents(source, json_key, field="--input"), vocab_size)
        tokenizer_path = tokenizer_out or f"{output_prefix}.tokenizer.json"
        os.makedirs(os.path.dirname(os.path.abspath(tokenizer_path)), exist_ok=True)
        tokenizer.save(tokenizer_path)
    token_documents = tokenize_documents(iter_documents(source, json_key, field="--input"), tokenizer)
    stats = write_indexed_dataset(output_prefix, token_documents, tokenizer.vocab_size)
    verify_indexed_dataset(output_prefix, stats)
    return PreprocessResult(output_prefix, tokenizer_path, stats.documents, stats.tokens)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Tokenize a corpus into megatron-core indexed dataset files (<prefix>.bin/.idx)."
    )
    parser.add_argument("--input", required=True, help=f"built-in corpus {BUILTIN_SOURCES} or a .txt/.jsonl path")
    parser.add_argument("--output-prefix", required=True, help="writes <prefix>.bin and <prefix>.idx")
    parser.add_argument("--tokenizer", default=None, help="reuse this tokenizer.json instead of training one")
    parser.add_argument("--vocab-size", type=int, default=4096, help="vocabulary size when training (default 4096)")
    parser.add_argument(
        "--tokenizer-out", default=None, help="where a trained tokenizer goes (default <prefix>.tokenizer.json)"
    )
    parser.add_argument("--json-key", default="text", help="the field of each JSONL line that holds the text")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Command line entry; returns the exit status (2 for bad input)."""
    args = build_parser().parse_args(argv)
    try:
        result = preprocess(
            args.input, args.output_prefix, args.tokenizer, args.vocab_size, args.json_key, args.tokenizer_out
        )
    except (ConfigError, CorpusError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"documents: {result.documents}")
    print(f"tokens: {result.tokens} (including one end-of-document token per document)")
    print(f"data: {result.prefix}.bin {result.prefix}.idx")
    print(f"tokenizer: {result.tokenizer_path}")
    return 0
