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

import logging
from types import SimpleNamespace

from megatron_ernie.rl.teacher.routing import TeacherPool

log = logging.getLogger("megatron_ernie.rl")

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


class OveroptimisationWatch:
    """Watches a learned judge being over-optimised (Gao et al. 2022, "Scaling Laws for Reward Model
    Overoptimization"): as a policy optimises a proxy reward, the proxy keeps rising while the gold
    reward it stands for stalls, then falls. Here the proxy is the judge's score and the gold is the
    task's rubric, computed on the same samples. Over the last `window` steps against the `window`
    before them it reports judge/score_trend, judge/rubric_trend and their gap judge/divergence, and
    warns once when the judge gained at least MIN_GAIN while the rubric gained under a quarter of it."""

    MIN_GAIN = 0.05

    def __init__(self, window: int):
        self.window = window
        self.history: list[tuple[float, float]] = []
        self.warned = False

    def update(self, batch_metrics: dict) -> dict:
        if self.window <= 0 or "judge/score" not in batch_metrics:
            return {}
        self.history.append((batch_metrics["judge/score"], batch_metrics["judge/rubric_reward"]))
        self.history = self.history[-2 * self.window:]
        if len(self.history) < 2 * self.window:
            return {}
        before, after = self.history[:self.window], self.history[self.window:]
        judge = sum(s for s, _ in after) / self.window - sum(s for s, _ in before) / self.window
        rubric = sum(r for _, r in after) / self.window - sum(r for _, r in before) / self.window
        if not self.warned and judge >= self.MIN_GAIN and rubric < judge / 4:
            self.warned = True
            trend = "fell" if rubric < 0 else "barely moved"
            log.warning(f"judge over-optimisation: over the last {self.window} steps the judge's score rose "
                        f"{judge:+.3f} while the rubric reward {trend} ({rubric:+.3f}) on the same samples; the "
                        "policy may be exploiting the judge: keep an earlier checkpoint, raise "
                        "rl.algorithm.kl_coef, or train the judge on more data")
        return {"judge/score_trend": judge, "judge/rubric_trend": rubric, "judge/divergence": judge - rubric}
