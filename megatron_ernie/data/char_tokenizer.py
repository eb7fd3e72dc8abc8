"""A character tokenizer: one id per character of a fixed alphabet.

Tiny models trained from scratch on a CPU (RL on arithmetic, SFT on task
demonstrations, the post-training pipeline) need a vocabulary small enough
that a random policy sometimes writes a correct answer: over a 15-character
alphabet it does, over a 258+ id byte-level BPE it almost never does. The
alphabet is built from the RL tasks' own text (rl/task_tokenizer.py) and
saved as ``tokenizer.json`` in every run directory and checkpoint, so every
later stage reloads the very same ids (``data.tokenizer.load_tokenizer``
reads this format as well as the BPE one).

Ids 0 and 1 are the end-of-text and pad ids, as in the BPE tokenizer.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterable

EOS, PAD = "<|endoftext|>", "<|pad|>"
FORMAT = "megatron_ernie.char_tokenizer/1"


class CharTokenizer:
    """One id per character; id 0 ends a text, id 1 pads (same ids as data.tokenizer's BPE)."""

    eod_id = eod = 0
    pad_id = pad = 1

    def __init__(self, alphabet: str, path: str = ""):
        chars = sorted(set(alphabet))
        if not chars:
            raise ValueError("CharTokenizer needs a non-empty alphabet")
        self.alphabet = "".join(chars)
        self.path = path
        self._ids = {c: i + 2 for i, c in enumerate(chars)}

    @classmethod
    def train(cls, texts: Iterable[str]) -> "CharTokenizer":
        return cls("".join(set("".join(texts))))

    @property
    def vocab_size(self) -> int:
        return len(self.alphabet) + 2

    @property
    def sha256(self) -> str:
        """Hash of the content (not of the file's bytes), so equal alphabets hash equal."""
        return hashlib.sha256(self._document().encode()).hexdigest()

    def encode(self, text: str) -> list[int]:
        try:
            return [self._ids[c] for c in text]
        except KeyError as exc:
            raise ValueError(f"character {exc.args[0]!r} is not in the task alphabet {self.alphabet!r}: "
                             "the tokenizer is built from the tasks' text, add the task that uses it") from None

    def decode(self, ids: Iterable[int]) -> str:
        """Text of the ids; special ids and ids outside the vocabulary decode to nothing."""
        return "".join(self.alphabet[i - 2] for i in map(int, ids) if 2 <= i < self.vocab_size)

    def _document(self) -> str:
        return json.dumps({"format": FORMAT, "alphabet": self.alphabet})

    def save(self, path: str | Path) -> None:
        """Write atomically (a reader never sees half a file)."""
        temporary = f"{path}.tmp-{os.getpid()}"
        Path(temporary).write_text(self._document())
        os.replace(temporary, path)

    @classmethod
    def load(cls, path: str | Path) -> "CharTokenizer":
        data = json.loads(Path(path).read_text())
        if not is_char_tokenizer_document(data):
            raise ValueError(f"{path} is not a character tokenizer file (format {data.get('format')!r})")
        return cls(data["alphabet"], str(path))


def is_char_tokenizer_document(data) -> bool:
    return isinstance(data, dict) and data.get("format") == FORMAT and isinstance(data.get("alphabet"), str)
