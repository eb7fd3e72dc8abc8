"""A per-hop timeline of the RL control plane, for finding where a step's hand-off time goes.

Why: `handoff/seconds` (rl/handoff.py) says how much of a step is neither
training nor generation, not where it is spent. Issue 14's synchronous step
passes a chain of messages (trainer -> controller -> sync plan -> broadcast ->
prompts -> samples -> reward -> controller -> trainer); the only way to tell
which hop is slow is to timestamp every message at both ends.

With ERNIE_RL_TRACE=DIR set (it is inherited by every role the launcher or
srun starts), each process appends one line per message it sends or receives
on the control plane to DIR/<role><rank>-<pid>.tsv:

    monotonic time (s)  send|recv  message type  peer  bytes

CLOCK_MONOTONIC is one clock for all processes of a host, so the lines of
different roles on one node line up; across nodes they do not (use it on one
node). Heartbeats are not recorded. Off (no file, no cost beyond one
attribute check) when the variable is unset.

`step_timeline` folds the lines into one step: every event's offset from the
step's start (the trainer publishing a weight version: WeightsReady), median
over steps.
"""

from __future__ import annotations

import os
import statistics
from pathlib import Path

TRACE_ENV = "ERNIE_RL_TRACE"
UNTRACED = ("Heartbeat",)


class MessageTrace:
    """Appends this process's control-plane messages to its own file (line-buffered)."""

    def __init__(self, directory: str, role: str, rank: int):
        Path(directory).mkdir(parents=True, exist_ok=True)
        self.role = f"{role}{rank}"
        self._file = open(Path(directory) / f"{self.role}-{os.getpid()}.tsv", "a", buffering=1)

    @classmethod
    def from_env(cls, role: str, rank: int) -> "MessageTrace | None":
        directory = os.environ.get(TRACE_ENV)
        if not directory:
            return None
        try:
            return cls(directory, role, rank)
        except OSError as exc:
            from megatron_ernie.config.errors import ConfigError

            raise ConfigError(TRACE_ENV, directory, f"cannot write trace files there ({exc.strerror}): "
                                                    "point it at a writable directory, or unset it") from None

    def record(self, at: float, direction: str, message_type: str, peer: str, nbytes: int) -> None:
        """`at`: time.monotonic() when the message left or arrived."""
        if message_type not in UNTRACED:
            self._file.write(f"{at:.6f}\t{direction}\t{message_type}\t{peer}\t{nbytes}\n")


def load(directory: str) -> list[tuple[float, str, str, str, str, int]]:
    """Every traced message of a run: (time, role, direction, type, peer, bytes), in time order."""
    events = []
    for path in Path(directory).glob("*.tsv"):
        role = path.stem.rsplit("-", 1)[0]
        for line in path.read_text().splitlines():
            fields = line.split("\t")
            if len(fields) != 5:
                continue  # the last line of a killed process, cut short
            t, direction, kind, peer, nbytes = fields
            events.append((float(t), role, direction, kind, peer, int(nbytes)))
    return sorted(events)


def step_timeline(events, skip_steps: int = 2) -> list[dict]:
    """One synchronous step as a list of hops: each event kind's median offset from the step start.

    A step starts when the trainer publishes new weights (WeightsReady, sent
    just before its StepDone) and ends at the next publication: in between lie
    the weight sync, the next round's prompts, generation, scoring and training. An
    event kind is (role, direction, type, peer); a kind seen several times in a
    step (the prompts of a round, say) gives a row for its first and its last
    occurrence. Kinds seen in fewer than half the steps are left out. The
    first `skip_steps` steps (start-up, first weight sync) are skipped.
    """
    starts = [e[0] for e in events if e[1].startswith("trainer") and e[2] == "send" and e[3] == "WeightsReady"]
    windows = list(zip(starts, starts[1:]))[skip_steps:]
    offsets: dict[tuple, list[float]] = {}
    for begin, end in windows:
        seen: dict[tuple, list[float]] = {}
        for t, role, direction, kind, peer, _ in events:
            if begin <= t < end:
                seen.setdefault((role, direction, kind, peer), []).append(t - begin)
        for key, times in seen.items():
            offsets.setdefault(key + ("first",), []).append(times[0])
            if len(times) > 1:
                offsets.setdefault(key + ("last",), []).append(times[-1])
    rows = [{"role": k[0], "dir": k[1], "type": k[2], "peer": k[3], "which": k[4],
             "offset_s": statistics.median(v), "steps": len(v)}
            for k, v in offsets.items() if len(v) * 2 >= len(windows)]
    rows.sort(key=lambda r: r["offset_s"])
    step_s = statistics.median(e - b for b, e in windows) if windows else float("nan")
    return [{"step_s": step_s, "steps": len(windows)}] + rows


def format_timeline(timeline: list[dict]) -> str:
    """The timeline as a table: offset, gap from the previous row, and the event."""
    head, rows = timeline[0], timeline[1:]
    lines = [f"median step {head['step_s'] * 1e3:.1f} ms over {head['steps']} steps",
             f"{'offset ms':>10} {'gap ms':>8}  event"]
    previous = 0.0
    for r in rows:
        arrow = "->" if r["dir"] == "send" else "<-"
        lines.append(f"{r['offset_s'] * 1e3:10.1f} {(r['offset_s'] - previous) * 1e3:8.1f}  "
                     f"{r['role']:<11} {arrow} {r['peer']:<11} {r['type']} ({r['which']})")
        previous = r["offset_s"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """`python -m megatron_ernie.rl.trace DIR [--skip N]`: print the median step of a traced run."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m megatron_ernie.rl.trace", description=main.__doc__)
    parser.add_argument("directory", help=f"the {TRACE_ENV} directory of a finished or running run")
    parser.add_argument("--skip", type=int, default=2, help="start-up steps to leave out")
    args = parser.parse_args(argv)
    events = load(args.directory)
    if not events:
        parser.error(f"no trace files (*.tsv) in {args.directory}: set {TRACE_ENV}={args.directory} for the run")
    print(format_timeline(step_timeline(events, args.skip)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
