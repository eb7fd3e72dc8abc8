"""The controller's teacher bookkeeping: which live teacher scores which sample, and when to give up.

Routing (as NeMo-RL's MOPD, slime and TRL do it): a sample goes to ONE
teacher, the alias [rl.distill] routes its task to, and among the live, ready
teacher processes of that alias to the next in round-robin order, so no
teacher of an alias idles while another queues. A sample whose alias has no
ready teacher waits here and is sent when one becomes ready; a dead teacher's
in-flight samples come back through the same path (rescored by another
teacher of the alias, or waiting for one).

Giving up: samples that wait while no teacher of their alias is alive at all
(loading counts as alive: it sends heartbeats) stop the run once that has
lasted `patience_s` after a teacher of the alias had joined, or
`startup_patience_s` when none ever joined (a teacher group that never
started) — the analogue of the controller's rule for rollout workers.

Pure bookkeeping over the controller's Peer objects (fields role, alive,
alias, ready); no I/O, so the controller stays the only place that sends.
"""

from __future__ import annotations

from collections import deque


class TeacherPool:
    role = "teacher"  # the Peer.role this pool routes to (judge/routing.py reuses the pool for judges)

    def __init__(self, distill, patience_s: float, startup_patience_s: float):
        self.routes = dict(distill.routes)
        self.aliases = distill.aliases
        self.patience_s, self.startup_patience_s = patience_s, startup_patience_s
        self._turn = {alias: 0 for alias in self.aliases}
        self._waiting = {alias: deque() for alias in self.aliases}
        self._unserved_since: dict[str, float] = {}  # alias -> when its samples began waiting with no live teacher
        self.joined: set[str] = set()
        self.last_death: dict[str, str] = {}

    def alias_of(self, scored) -> str:
        return self.routes[scored.sample.task]

    def pick(self, alias: str, peers) -> object | None:
        """The next ready, live teacher of `alias` in round-robin order, or None."""
        ready = [p for p in peers if p.role == self.role and p.alive and p.ready and p.alias == alias]
        if not ready:
            return None
        peer = ready[self._turn[alias] % len(ready)]
        self._turn[alias] += 1
        return peer

    def wait(self, scored) -> None:
        self._waiting[self.alias_of(scored)].append(scored)

    def take_waiting(self, alias: str) -> list:
        samples, self._waiting[alias] = list(self._waiting[alias]), deque()
        return samples

    def waiting_count(self, alias: str) -> int:
        return len(self._waiting[alias])

    def stalled(self, now: float, peers) -> str:
        """Why the run must stop ("" when it need not): samples wait and no teacher of their alias lives."""
        for alias in self.aliases:
            if not self._waiting[alias] or any(p.role == self.role and p.alive and p.alias == alias for p in peers):
                self._unserved_since.pop(alias, None)
                continue
            since = self._unserved_since.setdefault(alias, now)
            limit = self.patience_s if alias in self.joined else self.startup_patience_s
            if now - since > limit:
                return self._stall_message(alias, now - since)
        return ""

    def _stall_message(self, alias: str, waited_s: float) -> str:
        last = self.last_death.get(alias)
        why = f"the last one died: {last}" if last else "none ever connected (did the teacher role start?)"
        return (f"no live teacher for alias {alias!r} (rl.distill.teachers.{alias}) for {waited_s:.0f} s, "
                f"{self.waiting_count(alias)} samples waiting; {why}. Start teacher processes for it "
                "(ernie rl --teacher-workers N, or the Slurm teacher group) and resume with --resume auto")
