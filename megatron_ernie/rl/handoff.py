"""Hand-off time per RL step: the part of a step that is neither training nor generation.

Why: between two training steps a synchronous loop passes a chain of
messages between processes (trainer -> controller -> weight-sync plan ->
broadcast -> prompts -> samples -> reward process -> controller -> trainer).
None of it is model work, and in issue 14 it was 57% of a synchronous step
at the tiny config. It is overhead in both modes, so it gets its own scalar.

Measured on the controller's clock, per step v:
  period     = time between the StepDone of v-1 and of v (one step of the run)
  train      = the trainer's measured step time (StepDone.step_s)
  generation = the longest total engine time of one rollout worker since the
               previous step (workers generate in parallel, each one serially)
  hand-off   = period - train - generation           (synchronous, lag 0)
             = period - max(train, generation)       (lag >= 1: they overlap)
clipped at 0. For lag 0 this is exact up to how generation splits between
rollout workers; with overlap it is what overlapping failed to hide. The
first step has no previous StepDone and reports nothing.
"""

from __future__ import annotations

import time


class HandoffClock:
    def __init__(self, overlapped: bool = False):
        self.overlapped = overlapped
        self._last_step: float | None = None
        self._engine_s: dict[int, float] = {}  # rollout rank -> engine seconds since the last step

    def generated(self, rank: int, seconds: float) -> None:
        self._engine_s[rank] = self._engine_s.get(rank, 0.0) + seconds

    def step(self, train_s: float, now: float | None = None) -> dict:
        """Called at each StepDone; returns the handoff/* scalars of the step that just ended."""
        now = time.monotonic() if now is None else now
        last, self._last_step = self._last_step, now
        generation = max(self._engine_s.values(), default=0.0)
        self._engine_s = {}
        if last is None:
            return {}
        period = now - last
        work = max(train_s, generation) if self.overlapped else train_s + generation
        handoff = max(period - work, 0.0)
        return {"handoff/seconds": handoff, "handoff/fraction": handoff / max(period, 1e-9),
                "handoff/step_period_s": period, "handoff/generation_s": generation}
