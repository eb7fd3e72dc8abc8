"""The controller's judge bookkeeping: which samples a judge scores, which judge, and when to give up.

Flow: Sample -> reward worker (the task's rubric) -> ScoredSample -> if its
task is in rl.judge.tasks: sent to ONE live, ready judge process (round
robin) -> back with reward = p_judge("y") and rubric_reward = the rubric's
reward -> (teachers, with [rl.distill]) -> its group. Samples of other
tasks keep their verifier's reward and never visit a judge.

The judge pool is the teacher pool (teacher/routing.py) with one alias,
JUDGE_ALIAS, and peers of role "judge": the same round robin, the same
waiting queue for samples that arrive while no judge is ready, the same
rescoring of a dead judge's in-flight samples by another judge (or the next
one to join), and the same patience before the run stops for lack of judges.
"""

from __future__ import annotations

from types import SimpleNamespace

from megatron_ernie.rl.teacher.routing import TeacherPool

JUDGE_ALIAS = "judge"


class JudgePool(TeacherPool):
    role = "judge"

    def __init__(self, judge, patience_s: float, startup_patience_s: float):
        routes = {task: JUDGE_ALIAS for task in judge.tasks}
        super().__init__(SimpleNamespace(routes=routes, aliases=(JUDGE_ALIAS,)), patience_s, startup_patience_s)
        self.tasks = frozenset(judge.tasks)

    def judges(self, scored) -> bool:
        """Whether this reward-scored sample still needs the judge's score (its task is judged)."""
        return scored.sample.task in self.tasks and scored.rubric_reward is None

    def _stall_message(self, alias: str, waited_s: float) -> str:
        last = self.last_death.get(alias)
        why = f"the last one died: {last}" if last else "none ever connected (did the judge role start?)"
        return (f"no live judge (rl.judge.checkpoint) for {waited_s:.0f} s, {self.waiting_count(alias)} samples "
                f"waiting; {why}. Start judge processes (ernie rl --judge-workers N, or the Slurm judge group) "
                "and resume with --resume auto")


def judge_pool(judge, system) -> JudgePool | None:
    """The pool of a run with [rl.judge] (None without), with the teacher pool's patience."""
    if not judge.enabled:
        return None
    timeout = system.heartbeat_timeout_s
    return JudgePool(judge, patience_s=3 * timeout, startup_patience_s=max(120.0, 6 * timeout))


def judge_metrics(samples) -> dict:
    """judge/score (the reward judged samples got), judge/rubric_reward (what their rubric says) and
    judge/agreement of the two verdicts (score >= 0.5 vs rubric == 1) over a batch's judged samples.
    Over-optimisation of the judge shows as judge/score rising while judge/rubric_reward falls."""
    judged = [s for s in samples if s.rubric_reward is not None]
    if not judged:
        return {}
    scores = [s.reward for s in judged]
    rubric = [s.rubric_reward for s in judged]
    agree = [(score >= 0.5) == (r >= 1.0) for score, r in zip(scores, rubric)]
    return {"judge/score": sum(scores) / len(judged), "judge/rubric_reward": sum(rubric) / len(judged),
            "judge/agreement": sum(agree) / len(judged), "judge/samples": len(judged)}
