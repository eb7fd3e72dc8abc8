"""Hand-off time per step (rl/handoff.py): the part of a step that is neither training nor generation."""

import pytest

from megatron_ernie.rl.handoff import HandoffClock


def test_synchronous_handoff_is_the_period_less_training_and_the_slowest_worker():
    clock = HandoffClock(overlapped=False)
    assert clock.step(0.3, now=10.0) == {}  # the first step has no previous one to measure from
    clock.generated(0, 0.2)
    clock.generated(0, 0.1)  # worker 0 generated twice: 0.3 s in all
    clock.generated(1, 0.25)
    out = clock.step(0.4, now=11.0)
    assert out["handoff/generation_s"] == pytest.approx(0.3)
    assert out["handoff/seconds"] == pytest.approx(1.0 - 0.4 - 0.3)
    assert out["handoff/fraction"] == pytest.approx(0.3 / 1.0)
    assert out["handoff/step_period_s"] == pytest.approx(1.0)
    nothing_generated = clock.step(0.2, now=11.5)  # engine seconds were consumed by the previous step
    assert nothing_generated["handoff/generation_s"] == 0.0 and nothing_generated["handoff/seconds"] == pytest.approx(0.3)


def test_overlapped_handoff_counts_only_the_longer_of_training_and_generation():
    clock = HandoffClock(overlapped=True)
    clock.step(0.0, now=0.0)
    clock.generated(0, 0.5)
    out = clock.step(0.4, now=0.6)
    assert out["handoff/seconds"] == pytest.approx(0.1)
    clock.generated(0, 0.9)
    assert clock.step(0.4, now=1.2)["handoff/seconds"] == 0.0  # clipped: never negative
