"""Supervised fine-tuning data: (prompt, response) pairs as masked next-token samples.

SFT is the pretraining trainer on another data source: the loss is the same
per-token cross-entropy (train/step.py, megatron-core's per-token loss, exact
across micro-batches, DP and PP), and this module decides which tokens count.
A sample is ``prompt + response + EOT`` (EOT = the tokenizer's end-of-text id
0, the token generation stops at); ``loss_mask`` is 1 exactly where the label
is a token the policy writes: the response's model turns and the final EOT.
Prompt tokens, tool output (the "env" turns of an agent demonstration, as in
rl/agent/episode.py) and padding are 0. Supervising the EOT is what teaches
the model to stop after its answer (a model SFT'd without it never stops).

Too long (more than ``model.seq_length + 1`` tokens, since inputs and labels
are the sample shifted by one): ``sft.overlong = "truncate"`` cuts it, so its
EOT is not supervised (a prefix of the response is still learned);
``"drop"`` leaves it out. An example with no supervised token left (its
prompt alone fills the sequence) is always left out.

Pairs come from the RL tasks' demonstrations (``sft.source = "tasks"``, each
task's ``demo``, see rl/tasks/registry.py) or from a JSONL file of
``{"prompt": ..., "response": ...}`` lines. The training set is one epoch of
examples, reshuffled every epoch (seeded) and repeated to the length the
loop asks for, so every rank sees the same global batches at any layout.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch

from megatron_ernie.config.errors import ConfigError
from megatron_ernie.config.sft import SFTConfig
from megatron_ernie.data.pipeline import Data

log = logging.getLogger("megatron_ernie")


@dataclass(frozen=True)
class SFTExample:
    """A prompt and its response turns ((role, text), role "model" = supervised or "env" = masked)."""

    prompt: str
    turns: tuple[tuple[str, str], ...]
    task: str = ""
    wrong: bool = False  # a deliberately wrong demonstration (sft.error_fraction)

    @property
    def texts(self) -> list[str]:
        return [self.prompt, *(text for _, text in self.turns)]


@dataclass(frozen=True)
class Encoded:
    """Token ids of prompt + response (+ EOT unless truncated) and, per token, whether it is a target."""

    ids: np.ndarray  # int64 [n], n <= seq_length + 1
    target: np.ndarray  # bool [n]: the model is trained to predict this token
    truncated: bool


# ---------------------------------------------------------------- sources


def split_by_weight(total: int, weights) -> list[int]:
    """``total`` split in proportion to ``weights`` (largest remainder: the counts sum to total)."""
    weights = [float(w) for w in weights]
    exact = [total * w / sum(weights) for w in weights]
    counts = [int(x) for x in exact]
    by_remainder = sorted(range(len(weights)), key=lambda i: (counts[i] - exact[i], i))
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return counts


def wrong_positions(count: int, fraction: float, seed: int) -> set[int]:
    """Exactly round(fraction * count) of the positions 0..count-1, chosen by ``seed``."""
    return set(random.Random(f"sft-wrong:{seed}").sample(range(count), round(fraction * count)))


def _task_demos(position: int, task_cfg, count: int, first_index: int) -> list[tuple]:
    """(task, task config, example index) of ``count`` examples of rl.tasks[position] from ``first_index`` on."""
    from megatron_ernie.rl.tasks import resolve_task

    task = resolve_task(task_cfg, f"rl.tasks[{position}]")
    if task.demo is None:
        raise ConfigError(f"rl.tasks[{position}].name", task_cfg.name,
                          "this task has no demonstrations (register it with demo=...); use "
                          "sft.source = a .jsonl file, or drop the task from this config")
    return [(task, task_cfg, first_index + j) for j in range(count)]


def task_examples(sft: SFTConfig, tasks, valid: bool = False) -> list[SFTExample]:
    """Demonstrations of ``tasks`` (rl.tasks), split by task weight.

    Training examples use indices first_index.. of each task, a seeded
    ``error_fraction`` of them wrong; validation examples use the indices
    after those and are always correct (they measure the real skill).
    """
    train_counts = split_by_weight(sft.num_examples, [t.weight for t in tasks])
    counts = split_by_weight(sft.valid_examples, [t.weight for t in tasks]) if valid else train_counts
    starts = [sft.first_index + (n if valid else 0) for n in train_counts]
    picks = [p for i, t in enumerate(tasks) for p in _task_demos(i, t, counts[i], starts[i])]
    wrong = set() if valid else wrong_positions(len(picks), sft.error_fraction, sft.seed)
    examples = []
    for k, (task, task_cfg, index) in enumerate(picks):
        prompt = task.make_example(task_cfg.seed, index, dict(task_cfg.options)).prompt
        demo = task.demo(task_cfg.seed, index, dict(task_cfg.options), k in wrong)
        examples.append(SFTExample(prompt, tuple(demo.turns), task.name, k in wrong))
    return examples


def _jsonl_error(path: str, line: int, problem: str) -> ConfigError:
    return ConfigError("sft.source", path, f"line {line}: {problem}; each line must be a JSON object with "
                                           'string fields "prompt" and "response"')


def _jsonl_example(path: str, number: int, line: str) -> SFTExample:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise _jsonl_error(path, number, f"not valid JSON ({error.msg})") from None
    if not isinstance(record, dict):
        raise _jsonl_error(path, number, f"a JSON {type(record).__name__}, not an object")
    for key in ("prompt", "response"):
        if key not in record:
            raise _jsonl_error(path, number, f'missing "{key}"')
        if not isinstance(record[key], str):
            raise _jsonl_error(path, number, f'"{key}" is a {type(record[key]).__name__}, not a string')
    return SFTExample(record["prompt"], (("model", record["response"]),), "jsonl")


def read_jsonl(path: str) -> list[SFTExample]:
    """One example per non-blank line; errors name the line (1-based)."""
    if not Path(path).is_file():
        raise ConfigError("sft.source", path, "no such file; give a .jsonl file of {\"prompt\", \"response\"} lines")
    with open(path, encoding="utf-8") as handle:
        examples = [_jsonl_example(path, n, line) for n, line in enumerate(handle, 1) if line.strip()]
    if not examples:
        raise ConfigError("sft.source", path, "the file holds no examples")
    return examples


def jsonl_examples(sft: SFTConfig) -> tuple[list[SFTExample], list[SFTExample]]:
    """(train, valid): the last ``valid_examples`` lines validate, the others train."""
    examples = read_jsonl(sft.source)
    if len(examples) <= sft.valid_examples:
        raise ConfigError("sft.valid_examples", sft.valid_examples,
                          f"{sft.source} has only {len(examples)} examples; hold out fewer for validation")
    return examples[: -sft.valid_examples], examples[-sft.valid_examples:]


# ---------------------------------------------------------------- tokens


def encode_example(tokenizer, example: SFTExample, seq_length: int, overlong: str) -> Encoded | None:
    """Token ids and target flags; None if the example is dropped (too long with "drop", or nothing to learn)."""
    ids = list(tokenizer.encode(example.prompt))
    target = [False] * len(ids)
    for role, text in example.turns:
        tokens = tokenizer.encode(text)
        ids += tokens
        target += [role == "model"] * len(tokens)
    ids.append(tokenizer.eod_id)
    target.append(True)
    truncated = len(ids) > seq_length + 1
    if truncated and overlong == "drop":
        return None
    ids, target = ids[: seq_length + 1], target[: seq_length + 1]
    if not any(target[1:]):  # the first token is never predicted
        return None
    return Encoded(np.asarray(ids, dtype=np.int64), np.asarray(target, dtype=bool), truncated)


def to_sample(encoded: Encoded, seq_length: int, pad_id: int) -> dict[str, torch.Tensor]:
    """The loader's fields: inputs = ids[:-1], labels = ids[1:], loss_mask = target[1:], padded to seq_length."""
    n = len(encoded.ids) - 1
    tokens = torch.full((seq_length,), pad_id, dtype=torch.long)
    labels = torch.full((seq_length,), pad_id, dtype=torch.long)
    mask = torch.zeros(seq_length, dtype=torch.float32)
    tokens[:n] = torch.from_numpy(encoded.ids[:-1])
    labels[:n] = torch.from_numpy(encoded.ids[1:])
    mask[:n] = torch.from_numpy(encoded.target[1:].astype(np.float32))
    return {"tokens": tokens, "labels": labels, "loss_mask": mask, "position_ids": torch.arange(seq_length)}


def _encode_all(tokenizer, examples, seq_length: int, overlong: str) -> list[Encoded]:
    encoded = []
    for i, example in enumerate(examples):
        try:
            item = encode_example(tokenizer, example, seq_length, overlong)
        except ValueError as error:  # a character tokenizer without this character
            raise ConfigError("sft.source", example.task or "jsonl",
                              f"example {i} ({example.prompt[:40]!r}) does not encode with the tokenizer "
                              f"({error})") from None
        if item is not None:
            encoded.append(item)
    return encoded


class SFTDataset:
    """``length`` samples: epoch after epoch of the encoded examples, each epoch in its own seeded order."""

    def __init__(self, encoded: list[Encoded], length: int, seq_length: int, pad_id: int, seed: int):
        if not encoded:
            raise ConfigError("model.seq_length", seq_length, "no SFT example fits; raise it or set "
                                                              'sft.overlong = "truncate"')
        self.encoded, self.length, self.seq_length, self.pad_id, self.seed = encoded, length, seq_length, pad_id, seed
        self._orders: dict[int, list[int]] = {}

    def __len__(self) -> int:
        return self.length

    def _order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            order = list(range(len(self.encoded)))
            random.Random(f"sft-order:{self.seed}:{epoch}").shuffle(order)
            self._orders = {epoch: order}  # batches walk forward: keep one epoch's order
        return self._orders[epoch]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < self.length:
            raise IndexError(index)
        epoch, position = divmod(index, len(self.encoded))
        return to_sample(self.encoded[self._order(epoch)[position]], self.seq_length, self.pad_id)


# ---------------------------------------------------------------- tokenizer and source


def sft_tokenizer(tasks, data_tokenizer: str, base_checkpoint: str, texts):
    """The tokenizer rule of every post-training stage (rl/task_tokenizer.tokenizer_for): data.tokenizer,
    else the base checkpoint's tokenizer.json, else the characters of ALL configured tasks plus the tool
    alphabet (and of the SFT texts themselves), so later stages on task subsets share the ids."""
    from megatron_ernie.data.tokenizer import load_tokenizer, require_same_tokenizer
    from megatron_ernie.rl.task_tokenizer import TOOL_ALPHABET, CharTokenizer, checkpoint_tokenizer_path, task_texts

    inherited = checkpoint_tokenizer_path(base_checkpoint)
    if data_tokenizer:
        if inherited:
            require_same_tokenizer(inherited, data_tokenizer, "data.tokenizer")
        return load_tokenizer(data_tokenizer, "data.tokenizer"), data_tokenizer
    if inherited:
        return load_tokenizer(inherited, "checkpoint.load"), inherited
    return CharTokenizer.train(task_texts(tasks) + [TOOL_ALPHABET] + list(texts)), ""


def sft_examples(sft: SFTConfig, tasks) -> tuple[list[SFTExample], list[SFTExample]]:
    if sft.source == "tasks":
        return task_examples(sft, tasks), task_examples(sft, tasks, valid=True)
    if sft.source in ("judge", "judge-items"):  # a learned judge's training data (rl/judge/data.py)
        from megatron_ernie.rl.judge.data import judge_sft_examples

        return judge_sft_examples(sft, tasks)
    return jsonl_examples(sft)


def build_sft_data(sft: SFTConfig, tasks, data_tokenizer: str, base_checkpoint: str, seq_length: int,
                   num_samples) -> Data:
    """Tokenizer and the train/valid SFT datasets (no test split), ``num_samples`` = (train, valid, test)."""
    train, valid = sft_examples(sft, tasks)
    tokenizer, path = sft_tokenizer(tasks, data_tokenizer, base_checkpoint,
                                    [t for e in train + valid for t in e.texts])
    encoded = [_encode_all(tokenizer, ex, seq_length, sft.overlong) for ex in (train, valid)]
    kept = len(encoded[0])
    log.info(f"SFT: {kept} of {len(train)} training examples kept ({len(train) - kept} dropped), "
             f"{sum(e.truncated for e in encoded[0])} truncated, {sum(e.wrong for e in train)} deliberately wrong")
    datasets = [SFTDataset(e, n, seq_length, tokenizer.pad_id, sft.seed + k)
                for k, (e, n) in enumerate(zip(encoded, num_samples))]
    return Data(tokenizer, path, datasets[0], datasets[1], None)


def sft_data_source(sft: SFTConfig, tasks, data_tokenizer: str = "", base_checkpoint: str = ""):
    """The loop's data source for SFT: ``(seq_length, num_samples) -> Data`` (see train/loop.setup)."""
    return partial(build_sft_data, sft, tasks, data_tokenizer, base_checkpoint)
