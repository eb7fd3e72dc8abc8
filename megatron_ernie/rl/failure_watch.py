"""Stop a run whose scorers fail on every sample, instead of training on zeros.

Why: a reward role that cannot score what it is sent (an unknown task, a
verifier that raises, a broken sandbox) returns reward 0 with status "error"
or "sandbox_error" for every sample. GRPO then sees groups of identical
rewards, every advantage is 0, and the run "trains" for hours on nothing
while exiting 0 (issue 14). Such a run must stop early and say why.

What counts: only SCORER failures, the statuses where no verdict on the
response was reached. A program that crashes, times out or exceeds memory
is a verdict on the policy's output (reward 0 is the right signal early in
training), so "crash", "timeout", "memory", "process_limit" and
"output_limit" never stop a run.

The rule: when the last `steps * samples_per_step` scored samples admitted
to the buffer (in arrival order) all failed in the scorer, i.e. the
scorer-failed fraction stayed at 1.0 for `steps` training batches' worth of
samples, the run stops with an error that names the failure reasons seen.
Counting samples rather than trained batches also catches the case where
the batches never form (rl.buffer.drop_uniform_groups drops every group).
One sample scored normally resets the count.
"""

from __future__ import annotations

from collections import Counter

SCORER_FAILURES = ("error", "sandbox_error")
_REASONS_SHOWN = 3


class FailureWatch:
    """Counts consecutive scorer-failed samples; `observe` returns an error message once the limit is hit."""

    def __init__(self, steps: int, samples_per_step: int):
        self.steps, self.samples_per_step = steps, samples_per_step
        self.limit = steps * samples_per_step
        self.run_length = 0
        self.reasons: Counter = Counter()

    def observe(self, group) -> str:
        """Take one admitted group of ScoredSamples; '' while the run may go on, else why it must stop."""
        if self.steps <= 0:
            return ""
        for scored in group:
            if scored.status in SCORER_FAILURES:
                self.run_length += 1
                self.reasons[(scored.sample.task, scored.status, scored.detail)] += 1
            else:
                self.run_length, self.reasons = 0, Counter()
        return self.message() if self.run_length >= self.limit else ""

    def message(self) -> str:
        seen = "; ".join(f"{count} x task {task!r} {status}: {detail or '(no detail)'}"
                         for (task, status, detail), count in self.reasons.most_common(_REASONS_SHOWN))
        more = len(self.reasons) - _REASONS_SHOWN
        return (f"the last {self.run_length} samples ({self.steps} training steps of {self.samples_per_step}) "
                f"all failed in the reward scorer, so every reward was 0 and the policy would train on zeros. "
                f"Reasons seen: {seen}{f' (and {more} other reasons)' if more > 0 else ''}. Fix the task or "
                f"its verifier (rl.tasks), or set rl.stop_on_failures = 0 to train on anyway")
