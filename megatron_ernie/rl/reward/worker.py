"""Reward worker: Sample -> ScoredSample through the sample's task, never raising.

A reward process must outlive every bad sample: an unknown task, a verifier
bug or a hostile program each become a ScoredSample with reward 0 and a status
saying what went wrong, so the controller can count failures by cause instead
of losing a worker.

Sandboxes run concurrently in threads (each is a separate process, so threads
only wait). Each run leases its own uid (sandbox.run_python): the process
limit counts per uid node-wide, so one program's fork bomb cannot starve
another run, in this worker or in any other on the node.

Verdicts of deterministic tasks (Task.deterministic: the reward is a function
of response and reference) are memoised per process: a policy that has
converged writes the same program for most samples of a prompt, and running
it in the sandbox again gives nothing new. Only outcomes that are properties
of the program are kept (ok, wrong, no_answer, crash: an exception the program
raised); a timeout, a memory or process limit or a sandbox failure may be the
host's load, so those samples are scored again.
"""

from __future__ import annotations

from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from threading import Lock
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


MEMO_STATUSES = ("ok", "wrong", "no_answer", "crash")  # verdicts about the program, not about the host
MEMO_ENTRIES = 8192


def _memo_key(sample: Sample) -> tuple | None:
    """(task, response, reference) for a deterministic task's sample; None: score it every time."""
    try:
        deterministic = get_task(sample.task).deterministic
    except KeyError:
        return None
    return (sample.task, sample.response_text, sample.reference) if deterministic else None


class RewardWorker:
    """Scores batches of samples with up to `concurrency` sandboxes at a time; identical samples of a
    deterministic task are scored once (in a batch and across batches, up to MEMO_ENTRIES verdicts)."""

    def __init__(self, sandbox: SandboxConfig | None = None, concurrency: int = 1, memo_entries: int = MEMO_ENTRIES):
        if concurrency < 1:
            raise ValueError(f"concurrency = {concurrency}: must be >= 1")
        self.sandbox = sandbox or SandboxConfig()
        self.sandbox.validate("rl.sandbox")
        self._pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="reward")
        self._memo: OrderedDict[tuple, tuple[float, str, str]] = OrderedDict()
        self._memo_entries, self._memo_lock = memo_entries, Lock()
        self.scored = 0  # samples actually run through their reward function (the rest were memoised)

    def _score(self, sample: Sample) -> ScoredSample:
        scored = score_sample(sample, self.sandbox)
        key = _memo_key(sample)
        with self._memo_lock:
            self.scored += 1
            if key is not None and scored.status in MEMO_STATUSES and self._memo_entries > 0:
                self._memo[key] = (scored.reward, scored.status, scored.detail)
                while len(self._memo) > self._memo_entries:
                    self._memo.popitem(last=False)
        return scored

    def _remembered(self, sample: Sample, key: tuple | None) -> ScoredSample | None:
        with self._memo_lock:
            hit = self._memo.get(key) if key is not None else None
            if hit is not None:
                self._memo.move_to_end(key)
        return None if hit is None else ScoredSample(sample, *hit)

    def score(self, samples: Sequence[Sample]) -> list[ScoredSample]:
        """ScoredSamples in the order of `samples`: first occurrences run, repeats copy their verdict."""
        keys = [_memo_key(s) for s in samples]
        result = [self._remembered(s, k) for s, k in zip(samples, keys)]
        first: dict[tuple, int] = {}
        todo = [i for i, k in enumerate(keys) if result[i] is None and (k is None or first.setdefault(k, i) == i)]
        for i, scored in zip(todo, self._pool.map(self._score, [samples[i] for i in todo])):
            result[i] = scored
        again = []
        for i, key in enumerate(keys):
            twin = result[first[key]] if result[i] is None else None
            if twin is not None and twin.status in MEMO_STATUSES:  # a repeat inside this batch
                result[i] = ScoredSample(samples[i], twin.reward, twin.status, twin.detail)
            elif twin is not None:  # its twin timed out or failed: that may be the host, so run it too
                again.append(i)
        for i, scored in zip(again, self._pool.map(self._score, [samples[i] for i in again])):
            result[i] = scored
        return result

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
