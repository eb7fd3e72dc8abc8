"""How well a judge agrees with the rubric it was trained to predict, on held-out examples.

Two numbers, as reward-model papers report them:
  accuracy:    the share of examples where the judge's verdict (score >= 0.5)
               equals the rubric's (rubric score >= threshold);
  correlation: Pearson's r between the judge's score p("y") and the rubric
               score, which also credits the judge for ranking partial answers
               (2/3 right above 0 right) although it was trained on y/n only;
  mean absolute error between score and rubric score: for a per-item judge,
               whose score is graded like the rubric (2 of 3 right words ->
               about 0.67), the accuracy's 0.5 cut calls a good partial score
               a wrong "y", and this is the fairer number.
A judge that agrees on held-out data can still be exploited by RL
(over-optimisation): that is watched in the run (judge/score vs
judge/rubric_reward), not here.

    python -m megatron_ernie.rl.judge.agreement --checkpoint J --examples 400
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass, field, replace
from typing import Sequence


@dataclass(frozen=True)
class Agreement:
    examples: int
    accuracy: float
    correlation: float  # nan when either side is constant
    mean_score_yes: float  # the judge's mean score where the rubric says "y"
    mean_score_no: float
    by_kind: dict = field(default_factory=dict)  # example kind (judge/data.py) -> the judge's mean score
    mean_abs_error: float = float("nan")  # mean |judge score - rubric score|

    def line(self) -> str:
        return (f"judge-rubric agreement on {self.examples} held-out examples: accuracy {self.accuracy:.3f}, "
                f"Pearson r {self.correlation:.3f}, mean |score - rubric| {self.mean_abs_error:.3f}, "
                f"mean p(y) {self.mean_score_yes:.3f} (rubric y) vs "
                f"{self.mean_score_no:.3f} (rubric n)" + (f"\n  {self.kinds_line()}" if self.by_kind else ""))

    def kinds_line(self) -> str:
        """Mean p(y) per kind of example: which faults the judge sees. A judge that rejects too_few and
        too_many but not pseudo or off_category counts words without reading them."""
        return "mean p(y) by kind: " + ", ".join(f"{k} {v:.2f}" for k, v in self.by_kind.items())


def pearson(xs: Sequence[float], ys: Sequence[float]) -> float:
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    sxx, syy = sum((x - mx) ** 2 for x in xs), sum((y - my) ** 2 for y in ys)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else float("nan")


def agreement(scores: Sequence[float], rubric: Sequence[float], threshold: float = 1.0) -> Agreement:
    """Agreement of judge scores p(y) with rubric scores (the rubric says "y" iff score >= threshold)."""
    if len(scores) != len(rubric) or not scores:
        raise ValueError(f"need equally many judge scores and rubric scores (got {len(scores)} and {len(rubric)})")
    rubric_yes = [r >= threshold for r in rubric]
    hits = sum((s >= 0.5) == y for s, y in zip(scores, rubric_yes))
    yes = [s for s, y in zip(scores, rubric_yes) if y]
    no = [s for s, y in zip(scores, rubric_yes) if not y]
    mean = lambda v: sum(v) / len(v) if v else float("nan")  # noqa: E731
    return Agreement(len(scores), hits / len(scores), pearson(list(scores), list(rubric)), mean(yes), mean(no),
                     mean_abs_error=mean([abs(s - r) for s, r in zip(scores, rubric)]))


def judge_agreement(scorer, tokenizer, examples, batch: int = 64) -> Agreement:
    """Score whole-answer JudgeExamples (judge/data.py) with a JudgeScorer, as RL would (a per-item judge
    through its task's aggregate), and compare with their rubric scores."""
    scores = []
    for i in range(0, len(examples), batch):
        chunk = examples[i:i + batch]
        scores += scorer.text_scores([e.task for e in chunk], [(e.prompt, e.response) for e in chunk])
    return replace(agreement(scores, [e.rubric for e in examples]),
                   by_kind=mean_by_kind([e.kind for e in examples], scores))


def mean_by_kind(kinds: Sequence[str], scores: Sequence[float]) -> dict[str, float]:
    """The mean score of each kind, in order of first appearance."""
    groups: dict[str, list[float]] = {}
    for kind, score in zip(kinds, scores, strict=True):
        groups.setdefault(kind, []).append(score)
    return {k: sum(v) / len(v) for k, v in groups.items()}


def main(argv=None) -> int:
    from megatron_ernie.config.rl import TaskConfig
    from megatron_ernie.rl.judge.data import FIRST_INDEX, judge_examples
    from megatron_ernie.rl.judge.scorer import load_judge

    p = argparse.ArgumentParser(prog="python -m megatron_ernie.rl.judge.agreement", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--examples", type=int, default=400)
    p.add_argument("--first-index", type=int, default=FIRST_INDEX + 1_000_000,
                   help="first held-out index (default: far past any training index)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    scorer, tokenizer, _ = load_judge(args.checkpoint)
    examples = judge_examples((TaskConfig(name="open_ended"),), args.first_index, args.examples, args.seed)
    print(judge_agreement(scorer, tokenizer, examples).line())
    return 0


if __name__ == "__main__":
    sys.exit(main())
