"""The judge role: a frozen judge checkpoint that turns the rubric reward of judged tasks into its score.

Start-up mirrors the teacher's (teacher/serve.py), so a bad judge is refused
before it scores anything and the controller hears why: import torch and
megatron-core, connect (Hello "judge") and start heartbeats, check the
checkpoint (judge/checkpoints.py), load the weights forward-only
(rollout/checkpoint_engine.py) and send TeacherReady(alias "judge"). Then it
serves with the teacher's loop: every ScoredSample that arrives comes back
with reward = p_judge("y") and rubric_reward = its rubric reward
(judge/scorer.py). A judge holds no state the run needs: when it dies, the
controller sends its samples to another judge.
"""

from __future__ import annotations

import logging

from megatron_ernie.config.errors import ConfigError
from megatron_ernie.rl.control import TeacherReady

log = logging.getLogger("megatron_ernie.rl.judge")


def start_judge(cfg, system):
    """(JudgeScorer, TeacherReady) after every check of the judge checkpoint."""
    from megatron_ernie.rl.judge.checkpoints import check_judge
    from megatron_ernie.rl.judge.routing import JUDGE_ALIAS
    from megatron_ernie.rl.judge.scorer import load_judge

    checked = check_judge(cfg, system.agent_max_turns > 1)
    scorer, _, _ = load_judge(checked.path, system.teacher_dtype, system.teacher_batch_samples, seed=cfg.run.seed)
    log.info(f"judge ready: {checked.path} ({system.teacher_dtype}) scores tasks {list(cfg.rl.judge.tasks)}")
    return scorer, TeacherReady(JUDGE_ALIAS, str(checked.path), checked.tokenizer_sha256)


def run_judge(cfg, system, rank: int, address, authkey: bytes) -> int:
    """The judge role's main (any number of judge processes serve the one judge checkpoint)."""
    from megatron_ernie.rl.teacher.serve import run_scorer_role

    if not cfg.rl.judge.enabled:
        raise ConfigError("rl.judge.checkpoint", "", "a judge process needs a judge: set rl.judge.checkpoint "
                                                     "or do not start the judge role")
    import megatron_ernie.rl.rollout.checkpoint_engine  # noqa: F401 - torch/megatron imports before heartbeats
    import megatron_ernie.rl.judge.scorer  # noqa: F401

    return run_scorer_role("judge", rank, f"judge {rank}", system, address, authkey,
                           lambda: start_judge(cfg, system))
