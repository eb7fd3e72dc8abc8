"""The judge's checkpoint, checked before any process starts (the launcher) and again by each judge.

Like a teacher (teacher/checkpoints.py), the judge reads the policy's token
ids through text, so it must be a complete checkpoint of this project with
config.toml and a tokenizer.json hashing equal to the run's tokenizer
(require_same_tokenizer), long enough for the policy's sequences, and able
to write its verdicts "y"/"n" as single tokens. Every failure is a
ConfigError naming rl.judge.checkpoint (exit 2 at launch).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from megatron_ernie.config.errors import ConfigError

FIELD = "rl.judge.checkpoint"


@dataclass(frozen=True)
class JudgeCheckpoint:
    path: Path  # the resolved iter_N directory
    tokenizer_sha256: str


def resolve_judge(cfg, run_tokenizer: str) -> JudgeCheckpoint:
    """The checked judge checkpoint of cfg.rl.judge."""
    from megatron_ernie.rl.rollout.checkpoint_engine import checkpoint_config, checkpoint_tokenizer
    from megatron_ernie.rl.teacher.checkpoints import scorer_checkpoint

    ckpt, sha256 = scorer_checkpoint(cfg.rl.judge.checkpoint, FIELD, run_tokenizer, "judge")
    judge_cfg = checkpoint_config(ckpt)
    if judge_cfg.model.seq_length < cfg.model.seq_length:
        raise ConfigError(FIELD, str(ckpt), f"its model.seq_length = {judge_cfg.model.seq_length} is shorter than "
                                            f"the policy's model.seq_length = {cfg.model.seq_length}: it cannot "
                                            "read whole samples; use a judge trained at that length")
    from megatron_ernie.rl.judge.data import VERDICT_NO, VERDICT_YES
    from megatron_ernie.rl.judge.scorer import verdict_id

    tokenizer = checkpoint_tokenizer(ckpt, FIELD)
    for verdict in (VERDICT_YES, VERDICT_NO):
        verdict_id(tokenizer, verdict, FIELD)
    _check_item_tasks(judge_cfg, cfg.rl.judge.tasks, ckpt)
    return JudgeCheckpoint(ckpt, sha256)


def _check_item_tasks(judge_cfg, tasks, ckpt: Path) -> None:
    """A per-item judge can score only tasks whose answers split into items (judge/data.py: ITEM_QUESTIONS)."""
    from megatron_ernie.rl.judge.data import ITEM_QUESTIONS
    from megatron_ernie.rl.judge.scorer import judge_verdicts

    unknown = [t for t in tasks if t not in ITEM_QUESTIONS]
    if judge_verdicts(judge_cfg) == "items" and unknown:
        raise ConfigError(FIELD, str(ckpt), f"it was trained on per-item verdicts (sft.source = \"judge-items\"), "
                                            f"and only the answers of {sorted(ITEM_QUESTIONS)} split into items, "
                                            f"not those of rl.judge.tasks {unknown}: judge those with a "
                                            "whole-answer judge (sft.source = \"judge\")")


def check_judge(cfg, agent: bool = False) -> JudgeCheckpoint | None:
    """The judge of [rl.judge], checked (None without one); the launcher calls it before any child starts."""
    from megatron_ernie.rl.teacher.checkpoints import run_tokenizer_file

    if not cfg.rl.judge.enabled:
        return None
    return resolve_judge(cfg, run_tokenizer_file(cfg, agent))
