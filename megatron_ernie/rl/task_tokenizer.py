"""The RL run's tokenizer, and the character tokenizer learned from the RL tasks' own text.

A policy trained from scratch on a CPU has to find a correct answer by chance
before GRPO can reinforce it: with a byte-level BPE vocabulary (>= 258 ids,
padded to 384) a random model almost never writes "19" after "12+7=". Over
the arithmetic task's alphabet ("0123456789+-=" plus end-of-text and pad, 15
ids) it does in a few percent of samples, which is enough signal for reward to
rise within minutes. The alphabet is collected from the tasks' generated
prompts and references, so the same tasks always give the same ids: every RL
role builds the tokenizer itself and no file has to be shared before start.

A run that starts from a checkpoint (checkpoint.load: a pretrained, SFT or
RL model) uses the tokenizer saved inside it, and data.tokenizer names one
explicitly; the task alphabet only serves from-scratch runs. That is what
keeps one tokenizer across the post-training stages: an expert trained on a
subset of the tasks would otherwise get other ids than the SFT model it
starts from. The class itself lives in data/char_tokenizer.py.
"""

from __future__ import annotations

import os

from megatron_ernie.config.errors import ConfigError
from megatron_ernie.data.char_tokenizer import EOS, PAD, CharTokenizer  # noqa: F401 (re-exported)

# What tool calls and replies are written with (rl/agent/tools.py); added in agent mode.
TOOL_ALPHABET = "<>/\n toolcalcresulterror:0123456789+-*/().=_"


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
    """The run's tokenizer, the same in every role:
    1. data.tokenizer when given;
    2. else the tokenizer.json inside checkpoint.load (the model this run starts from), so a stage
       of post-training keeps the ids of the stage before it whatever its own task list is;
    3. else the characters of the tasks (plus the tool-call characters in agent mode).
    With both 1 and 2 the two files must hold the same tokenizer."""
    from megatron_ernie.data.tokenizer import load_tokenizer, require_same_tokenizer

    inherited = checkpoint_tokenizer_path(cfg.checkpoint.load)
    if cfg.data.tokenizer:
        if inherited:
            require_same_tokenizer(inherited, cfg.data.tokenizer, "data.tokenizer")
        return load_tokenizer(cfg.data.tokenizer)
    if inherited:
        return load_tokenizer(inherited, "checkpoint.load")
    return CharTokenizer.train(task_texts(cfg.rl.tasks) + ([TOOL_ALPHABET] if agent else []))


def checkpoint_tokenizer_path(checkpoint: str) -> str:
    """The tokenizer.json saved inside checkpoint directory `checkpoint` ("" when none is named)."""
    if not checkpoint:
        return ""
    path = os.path.join(checkpoint, "tokenizer.json")
    if not os.path.isfile(path):
        raise ConfigError("checkpoint.load", checkpoint,
                          "has no tokenizer.json: name a checkpoint directory (iter_N) written by this project")
    return path


def answers_over_budget(cfg, tokenizer, examples: int = 32) -> list[str]:
    """One line per single-answer task whose reference answers (its SFT demonstrations) do not all fit
    rl.sampling.max_new_tokens. A response is cut at the budget, so such a prompt can never be answered
    in full and the task's reward is capped below 1 for every policy, however well it learns; nothing
    else reports it (the code task's "max" program is 50 characters, a 48-token budget silently caps
    the domain at the other three kinds). The first `examples` demonstrations at the task's seed."""
    from megatron_ernie.rl.tasks import resolve_task

    budget, lines = cfg.rl.sampling.max_new_tokens, []
    for i, config in enumerate(cfg.rl.tasks):
        task = resolve_task(config, f"rl.tasks[{i}]")
        lengths = _demo_lengths(task, config, tokenizer, examples)
        over = [n for n in lengths if n > budget]
        if over:
            lines.append(f"rl.tasks[{i}] ({config.name}): {len(over)} of {len(lengths)} reference answers need more "
                         f"than rl.sampling.max_new_tokens = {budget} tokens (up to {max(over)}), so those prompts "
                         f"can never be answered in full; raise max_new_tokens to at least {max(over)} (and "
                         "model.seq_length with it if the prompt no longer fits)")
    return lines


def _token_count(tokenizer, text: str) -> int | None:
    """Tokens of `text`, or None where the tokenizer cannot write it (a character tokenizer built from the
    tasks' prompts alone, for RL from scratch, lacks characters only the demonstrations use)."""
    try:
        return len(tokenizer.encode(text))
    except ValueError:
        return None


def _demo_lengths(task, config, tokenizer, examples: int) -> list[int]:
    """Token lengths of a task's first single-answer demonstrations. RL never needs a demonstration, so a
    user task whose demo cannot be built (none, or one that fails) is simply not checked: the warning is
    advice, and must never stop a run that would otherwise work."""
    if task.demo is None:
        return []
    try:
        demos = [task.demo(config.seed, k, dict(config.options), False) for k in range(examples)]
    except Exception:  # noqa: BLE001 - a user's demo function, only consulted for advice
        return []
    return [n for n in (_token_count(tokenizer, d.text) for d in demos if len(d.turns) == 1) if n]
