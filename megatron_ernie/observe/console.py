"""Rank-aware console output in megatron's familiar iteration-line format."""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass

log = logging.getLogger("megatron_ernie")


def setup_logging(level: str, is_logging_rank: bool) -> None:
    """Only one rank prints INFO; every rank still prints warnings and errors."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("[%(asctime)s] %(message)s", "%H:%M:%S"))
    log.handlers[:] = [handler]
    log.setLevel(level if is_logging_rank else "WARNING")
    log.propagate = False


@dataclass
class IterationStats:
    iteration: int
    total: int
    consumed_tokens: int
    loss: float
    lr: float
    grad_norm: float | None
    tokens_per_s: float
    ms_per_iter: float

    def eta_s(self) -> float:
        return (self.total - self.iteration) * self.ms_per_iter / 1000.0


def format_iteration(s: IterationStats) -> str:
    grad = f"{s.grad_norm:.3f}" if s.grad_norm is not None else "n/a"
    return (f"iteration {s.iteration:>6d}/{s.total:<6d} | consumed tokens {s.consumed_tokens:>10d} | "
            f"loss {s.loss:.6f} | lr {s.lr:.3e} | grad norm {grad} | tokens/s {s.tokens_per_s:,.0f} | "
            f"ms/iter {s.ms_per_iter:.1f} | ETA {_hms(s.eta_s())}")


def _hms(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class StepTimer:
    """Wall time between consecutive calls of ``lap`` (first lap from construction)."""

    def __init__(self):
        self._last = time.perf_counter()

    def lap(self) -> float:
        now = time.perf_counter()
        elapsed, self._last = now - self._last, now
        return elapsed
