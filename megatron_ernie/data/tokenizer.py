"""A byte-level BPE tokenizer trained offline with Hugging Face ``tokenizers``.

Byte-level BPE (GPT-2, Radford et al. 2019) starts from the 256 byte values,
so any UTF-8 text encodes without an unknown token and decodes back to the
exact same string; merges are learned from the corpus. Two special tokens are
added first, so their ids are fixed: ``<|endoftext|>`` (id 0) ends every
document, and ``<|pad|>`` (id 1) pads short samples. The pad id differs from
the end-of-document id on purpose: megatron-core's ``MegatronDataset`` masks
the loss on pad ids, and would refuse to treat a pad id that collides with
another special token as padding.

Special-token text that occurs *inside* a document (say a corpus that quotes
``<|endoftext|>``) is encoded as ordinary bytes, so only the pipeline itself
inserts document boundaries.

``ByteBPETokenizer`` implements megatron-core's ``MegatronTokenizerBase``
interface and the attributes its datasets read: ``vocab_size`` (chooses the
token dtype), ``eod`` (GPTDataset masks/positions), ``pad`` and
``special_tokens_dict`` (MegatronDataset padding), and ``unique_identifiers``
(hashed into the names of megatron's cached sample indices; we use a hash of
the tokenizer's content so a copy saved in another run directory hits the
same cache).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from typing import Iterable, Sequence

from megatron.core.tokenizers import MegatronTokenizerBase
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from megatron_ernie.config.errors import ConfigError
from megatron_ernie.data.char_tokenizer import CharTokenizer, is_char_tokenizer_document
from megatron_ernie.data.config import MAX_VOCAB_SIZE, MIN_VOCAB_SIZE

EOD_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"


class ByteBPETokenizer(MegatronTokenizerBase):
    """A trained byte-level BPE tokenizer in the shape megatron-core expects."""

    def __init__(self, hf_tokenizer: Tokenizer, path: str = ""):
        super().__init__(path, config={})
        self._hf = hf_tokenizer
        self._hf.encode_special_tokens = True  # see the module docstring
        self.eod = _special_id(hf_tokenizer, EOD_TOKEN, path)
        self.pad = _special_id(hf_tokenizer, PAD_TOKEN, path)
        self.eos = self.eod
        self.special_tokens_dict = {"eod_token": self.eod, "pad_token": self.pad}
        self.sha256 = hashlib.sha256(hf_tokenizer.to_str().encode()).hexdigest()
        self.unique_identifiers = OrderedDict(
            [("class", type(self).__name__), ("sha256", self.sha256), ("vocab_size", self.vocab_size)]
        )

    @property
    def vocab_size(self) -> int:
        return self._hf.get_vocab_size(with_added_tokens=True)

    @property
    def eod_id(self) -> int:
        return self.eod

    @property
    def pad_id(self) -> int:
        return self.pad

    @property
    def vocab(self) -> dict[str, int]:
        return self._hf.get_vocab(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, without any special token."""
        return self._hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """``encode`` for many texts at once (parallel inside ``tokenizers``)."""
        return [e.ids for e in self._hf.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; special tokens appear as their text, e.g. ``<|endoftext|>``."""
        return self._hf.decode([int(i) for i in ids], skip_special_tokens=False)

    def tokenize(self, text: str) -> list[int]:
        return self.encode(text)

    def detokenize(self, ids: Iterable[int]) -> str:
        return self.decode(ids)

    def apply_chat_template(self, *args, **kwargs):
        raise NotImplementedError("the pretraining tokenizer has no chat template")

    def save(self, path: str) -> None:
        """Write ``tokenizer.json`` atomically (a reader never sees half a file)."""
        temporary = f"{path}.tmp-{os.getpid()}"
        self._hf.save(temporary)
        os.replace(temporary, path)


def train_tokenizer(documents: Iterable[str], vocab_size: int = 4096) -> ByteBPETokenizer:
    """Learn byte-level BPE merges from ``documents`` (deterministic for a given input).

    A small corpus may not support ``vocab_size`` merges; the result then has
    fewer tokens, and ``vocab_size`` of the result is the true size.
    """
    check_vocab_size(vocab_size)
    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOD_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    hf.train_from_iterator(documents, trainer)
    return ByteBPETokenizer(hf)


def load_tokenizer(path: str, field: str = "data.tokenizer"):
    """Load a ``tokenizer.json``: a byte-level BPE one (``ByteBPETokenizer.save``) or a character one
    (``data.char_tokenizer``), whichever the file holds. Both share ids 0 (end of text) and 1 (pad)."""
    if not os.path.isfile(path):
        fix = "no such tokenizer file; give a tokenizer.json saved by a run or by preprocessing"
        raise ConfigError(field, path, fix)
    document = _read_json(path, field)
    if is_char_tokenizer_document(document):
        return CharTokenizer(document["alphabet"], path)
    try:
        hf = Tokenizer.from_file(path)
    except Exception as error:  # tokenizers raises a bare Exception on bad JSON
        raise ConfigError(field, path, f"not a readable tokenizers file ({error})") from None
    return ByteBPETokenizer(hf, path)


def _read_json(path: str, field: str):
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ConfigError(field, path, f"not a readable tokenizers file (not UTF-8 JSON: {error})") from None
    except OSError as error:
        raise ConfigError(field, path, f"cannot read it ({error.strerror})") from None


def tokenizer_hash(path: str, field: str = "data.tokenizer") -> str:
    """SHA-256 of the tokenizer's content (vocabulary, merges, specials), not of the file's bytes."""
    return load_tokenizer(path, field).sha256


def require_same_tokenizer(ours: str, theirs: str, field: str) -> None:
    """Two models that meet (student and teacher, policy and judge, a stage and its input) must share ids.

    A different tokenizer silently turns every target into the wrong token, so
    a mismatch is refused before anything runs, naming both files.
    """
    a, b = tokenizer_hash(ours, field), tokenizer_hash(theirs, field)
    if a != b:
        raise ConfigError(field, theirs, f"its tokenizer (sha256 {b[:12]}) differs from {ours} (sha256 {a[:12]}); "
                          "every stage must use the tokenizer of the checkpoint the pipeline started from")


def check_vocab_size(vocab_size: int, field: str = "data.vocab_size") -> None:
    if not isinstance(vocab_size, int) or not MIN_VOCAB_SIZE <= vocab_size <= MAX_VOCAB_SIZE:
        raise ConfigError(field, vocab_size, f"use an integer from {MIN_VOCAB_SIZE} to {MAX_VOCAB_SIZE} (e.g. 4096)")


def _special_id(hf: Tokenizer, token: str, path: str) -> int:
    token_id = hf.token_to_id(token)
    if token_id is None:
        raise ConfigError(
            "data.tokenizer", path or "<in memory>", f"has no {token} token; use a tokenizer trained by megatron_ernie"
        )
    return token_id
