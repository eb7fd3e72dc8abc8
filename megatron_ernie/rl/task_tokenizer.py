"""A character tokenizer learned from the RL tasks' own text.

A policy trained from scratch on a CPU has to find a correct answer by chance
before GRPO can reinforce it: with a byte-level BPE vocabulary (>= 258 ids,
padded to 384) a random model almost never writes "19" after "12+7=". Over
the arithmetic task's alphabet ("0123456789+-=" plus end-of-text and pad, 15
ids) it does in a few percent of samples, which is enough signal for reward to
rise within minutes. The alphabet is collected from the tasks' generated
prompts and references, so the same tasks always give the same ids: every RL
role builds the tokenizer itself and no file has to be shared before start.

A run that starts from a pretrained model uses that model's tokenizer instead
(data.tokenizer); this one only serves from-scratch runs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

EOS, PAD = "<|endoftext|>", "<|pad|>"
# What tool calls and replies are written with (rl/agent/tools.py); added in agent mode.
TOOL_ALPHABET = "<>/\n toolcalcresulterror:0123456789+-*/().=_"
_FORMAT = "megatron_ernie.char_tokenizer/1"


class CharTokenizer:
    """One id per character; id 0 ends a text, id 1 pads (same ids as data.tokenizer's BPE)."""

    eod_id = 0
    pad_id = 1

    def __init__(self, alphabet: str):
        chars = sorted(set(alphabet))
        if not chars:
            raise ValueError("CharTokenizer needs a non-empty alphabet")
        self.alphabet = "".join(chars)
        self._ids = {c: i + 2 for i, c in enumerate(chars)}

    @classmethod
    def train(cls, texts: Iterable[str]) -> "CharTokenizer":
        return cls("".join(set("".join(texts))))

    @property
    def vocab_size(self) -> int:
        return len(self.alphabet) + 2

    def encode(self, text: str) -> list[int]:
        try:
            return [self._ids[c] for c in text]
        except KeyError as exc:
            raise ValueError(f"character {exc.args[0]!r} is not in the task alphabet {self.alphabet!r}: "
                             "the tokenizer is built from the tasks' text, add the task that uses it") from None

    def decode(self, ids: Iterable[int]) -> str:
        """Text of the ids; special ids and ids outside the vocabulary decode to nothing."""
        return "".join(self.alphabet[i - 2] for i in map(int, ids) if 2 <= i < self.vocab_size)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps({"format": _FORMAT, "alphabet": self.alphabet}))

    @classmethod
    def load(cls, path: str | Path) -> "CharTokenizer":
        data = json.loads(Path(path).read_text())
        if data.get("format") != _FORMAT:
            raise ValueError(f"{path} is not a character tokenizer file (format {data.get('format')!r})")
        return cls(data["alphabet"])


def task_texts(tasks, examples_per_task: int = 2000) -> list[str]:
    """Prompts and references of the first examples of every configured task (rl.tasks)."""
    from megatron_ernie.rl.tasks import resolve_task

    texts = []
    for i, task_cfg in enumerate(tasks):
        task = resolve_task(task_cfg, f"rl.tasks[{i}]")
        for ex in task.examples(task_cfg.seed, 0, examples_per_task, task_cfg.options):
            texts += [ex.prompt, ex.reference]
    return texts


def tokenizer_for(cfg, agent: bool = False):
    """The run's tokenizer: data.tokenizer when given (a pretrained model's), else the tasks' characters
    (plus the tool-call characters in agent mode). Every role calls this with the same arguments."""
    if cfg.data.tokenizer:
        from megatron_ernie.data.tokenizer import load_tokenizer

        return load_tokenizer(cfg.data.tokenizer)
    return CharTokenizer.train(task_texts(cfg.rl.tasks) + ([TOOL_ALPHABET] if agent else []))
