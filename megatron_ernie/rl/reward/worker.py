"""Reward worker: Sample -> ScoredSample through the sample's task, never raising.

A reward process must outlive every bad sample: an unknown task, a verifier
bug or a hostile program each become a ScoredSample with reward 0 and a status
saying what went wrong, so the controller can count failures by cause instead
of losing a worker.

Sandboxes run concurrently in threads (each is a separate process, so threads
only wait). Each run leases its own uid (sandbox.run_python): the process
limit counts per uid node-wide, so one program's fork bomb cannot starve
another run, in this worker or in any other on the node.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

from megatron_ernie.config.rl import SandboxConfig
from megatron_ernie.rl.protocol import REWARD_STATUSES, Sample, ScoredSample
from megatron_ernie.rl.reward.verifiers import Verdict
from megatron_ernie.rl.tasks import get_task


def score_sample(sample: Sample, sandbox: SandboxConfig | None = None) -> ScoredSample:
    """Score one sample with its task's reward function; failures become status "error"."""
    try:
        verdict = get_task(sample.task).score(sample.response_text, sample.reference, sandbox or SandboxConfig())
        verdict = _checked(verdict)
    except Exception as exc:  # noqa: BLE001 - a reward bug must not kill the worker
        verdict = Verdict(0.0, "error", f"{type(exc).__name__}: {exc}"[:500])
    return ScoredSample(sample, float(verdict.reward), verdict.status, verdict.detail)


def _checked(verdict: Verdict) -> Verdict:
    if verdict.status not in REWARD_STATUSES:
        raise ValueError(f"reward function returned status {verdict.status!r}; use one of {REWARD_STATUSES}")
    if verdict.reward != verdict.reward or abs(verdict.reward) == float("inf"):
        raise ValueError(f"reward function returned a non-finite reward {verdict.reward}")
    return verdict


class RewardWorker:
    """Scores batches of samples with up to `concurrency` sandboxes at a time."""

    def __init__(self, sandbox: SandboxConfig | None = None, concurrency: int = 1):
        if concurrency < 1:
            raise ValueError(f"concurrency = {concurrency}: must be >= 1")
        self.sandbox = sandbox or SandboxConfig()
        self.sandbox.validate("rl.sandbox")
        self._pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="reward")

    def _score(self, sample: Sample) -> ScoredSample:
        return score_sample(sample, self.sandbox)

    def score(self, samples: Sequence[Sample]) -> list[ScoredSample]:
        """ScoredSamples in the order of `samples`."""
        return list(self._pool.map(self._score, samples))

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
