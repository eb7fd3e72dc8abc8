"""What the controller records: TensorBoard scalars, metrics.jsonl, roles.json, its own checkpoints.

Files under <run.dir>/rl/:
  metrics.jsonl          one JSON object per training step (what TensorBoard shows, machine-readable)
  roles.json             every role process seen: role, rank, pid, host, alive, served version
  controller/state_NNNNNNN.json + latest   the controller's checkpoint (see Controller.state_dict)
TensorBoard (<run.dir>/tensorboard): reward/*, rollout/*, staleness/*, trainer/*,
weight_sync/*, policy/* (K3, clip fraction, entropy, ...), routing/*, faults/*, and with teachers
teacher/<alias>/* (score seconds, samples scored, tokens/s since the last step; samples in the batch).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import deque
from dataclasses import asdict
from pathlib import Path

import numpy as np

from megatron_ernie.observe.tensorboard import NullWriter, ScalarWriter
from megatron_ernie.rl.failure_watch import SCORER_FAILURES

log = logging.getLogger("megatron_ernie.rl")
RATE_WINDOW_S = 10.0


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def latest_state(run_dir: str) -> dict | None:
    """The controller state named by <run.dir>/rl/controller/latest, or None."""
    root = Path(run_dir) / "rl" / "controller"
    latest = root / "latest"
    if not latest.exists():
        return None
    return json.loads((root / latest.read_text().strip()).read_text())


from megatron_ernie.rl.judge.routing import judge_metrics  # noqa: E402 - light, no torch


class RunMetrics:
    def __init__(self, run_dir: str, tensorboard: bool = True):
        self.dir = Path(run_dir) / "rl"
        (self.dir / "controller").mkdir(parents=True, exist_ok=True)
        self.writer = ScalarWriter(Path(run_dir) / "tensorboard") if tensorboard else NullWriter()
        self._jsonl = open(self.dir / "metrics.jsonl", "a")
        self._generated: deque = deque()  # (monotonic time, tokens, engine seconds) of recent batches
        self._started = time.monotonic()
        self._sync: dict = {}
        self._batch: dict = {}
        self._teachers: dict = {}  # alias -> [samples scored, response tokens, forward seconds] since the last step
        self.history: list[dict] = []

    def roles(self, records: list[dict]) -> None:
        _atomic_write(self.dir / "roles.json", json.dumps(records, indent=1))

    def rollout(self, rank: int, stats) -> None:
        self._generated.append((time.monotonic(), stats.tokens, stats.seconds))

    def weight_sync(self, done) -> None:
        self._sync = {"weight_sync/seconds": done.seconds, "weight_sync/bytes": done.nbytes,
                      "weight_sync/bytes_per_s": done.nbytes / max(done.seconds, 1e-9)}

    def teacher(self, stats) -> None:
        """A teacher's TeacherStats: accumulated per alias until the next step's record."""
        totals = self._teachers.setdefault(stats.alias, [0, 0, 0.0])
        totals[1] += stats.tokens
        totals[2] += stats.seconds

    def taught(self, alias: str) -> None:
        """One sample came back from a teacher of `alias` and joined its group."""
        self._teachers.setdefault(alias, [0, 0, 0.0])[0] += 1

    def _teacher_record(self) -> dict:
        out = {}
        for alias, (samples, tokens, seconds) in sorted(self._teachers.items()):
            out.update({f"teacher/{alias}/scored_samples": samples, f"teacher/{alias}/score_s": seconds,
                        f"teacher/{alias}/tokens_per_s": tokens / max(seconds, 1e-9)})
        self._teachers = {}
        return out

    def batch(self, version: int, groups) -> None:
        """Statistics of the batch the trainer is about to train on (policy `version`)."""
        samples = [s for g in groups for s in g]
        rewards = np.array([s.reward for s in samples])
        lags = np.array([version - s.sample.policy_version for s in samples])
        out = {"reward/mean": float(rewards.mean()),
               "rollout/response_length": float(np.mean([len(s.sample.response_tokens) for s in samples])),
               "staleness/lag_mean": float(lags.mean()), "staleness/lag_max": int(lags.max())}
        for lag in range(3):
            out[f"staleness/lag_{lag}{'+' if lag == 2 else ''}_fraction"] = float(
                (lags >= lag).mean() if lag == 2 else (lags == lag).mean())
        for task in sorted({s.sample.task for s in samples}):
            out[f"reward/{task}"] = float(np.mean([s.reward for s in samples if s.sample.task == task]))
        statuses = [s.status for s in samples]
        out["reward/failed_fraction"] = float(np.mean([st not in ("ok", "wrong", "no_answer") for st in statuses]))
        out["reward/scorer_failed_fraction"] = float(np.mean([st in SCORER_FAILURES for st in statuses]))
        for alias, task in sorted({(s.teacher, s.sample.task) for s in samples if s.teacher}):
            count = sum(s.teacher == alias and s.sample.task == task for s in samples)
            out[f"teacher/{alias}/batch_samples"] = out.get(f"teacher/{alias}/batch_samples", 0) + count
            out[f"teacher/{alias}/task_{task}"] = count  # routing: only routes[task] == alias may appear
        out.update(judge_metrics(samples))  # [rl.judge]: judge score next to the rubric (rl/judge/routing.py)
        self._batch = out

    def _rollout_rates(self) -> dict:
        """Tokens/s of all rollout workers together over the last RATE_WINDOW_S, and per engine-second."""
        now = time.monotonic()
        while self._generated and now - self._generated[0][0] > RATE_WINDOW_S:
            self._generated.popleft()
        tokens = sum(t for _, t, _ in self._generated)
        engine_s = sum(s for _, _, s in self._generated)
        span = min(RATE_WINDOW_S, now - self._started)
        return {"rollout/tokens_per_s": tokens / max(span, 1e-9),
                "rollout/engine_tokens_per_s": tokens / max(engine_s, 1e-9)}

    def step(self, done, buffer_stats, counters, alive_rollouts: list) -> dict:
        trainer = json.loads(done.metrics_json)
        record = {"step": done.version, "time": time.time(), **self._batch, **self._rollout_rates(), **self._sync,
                  "trainer/step_s": done.step_s, "trainer/idle_s": done.idle_s,
                  "trainer/idle_fraction": done.idle_s / max(done.idle_s + done.step_s, 1e-9),
                  "rollout/alive_workers": len(alive_rollouts), **self._teacher_record()}
        record.update({f"policy/{k}": v for k, v in trainer.items() if not k.startswith(("routing_", "distill/"))})
        record.update({k: v for k, v in trainer.items() if k.startswith("distill/")})  # per-teacher OPD monitors
        record.update({f"routing/{k[len('routing_'):]}": v for k, v in trainer.items() if k.startswith("routing_")})
        record.update({f"buffer/{k}": v for k, v in asdict(buffer_stats).items()})
        record.update({f"faults/{k}": v for k, v in vars(counters).items()})
        self.writer.scalars({k: v for k, v in record.items() if k not in ("step", "time")}, done.version)
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        self.history.append(record)
        log.info(_console_line(record))
        return record

    def save_state(self, state: dict) -> Path:
        root = self.dir / "controller"
        name = f"state_{state['version']:07d}.json"
        _atomic_write(root / name, json.dumps(state))
        _atomic_write(root / "latest", name)
        return root / name

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()
        self._jsonl.close()


def _console_line(r: dict) -> str:
    parts = [f"step {r['step']}", f"reward {r.get('reward/mean', float('nan')):.3f}",
             f"len {r.get('rollout/response_length', 0):.1f}", f"lag {r.get('staleness/lag_mean', 0):.2f}",
             f"k3 {r.get('policy/rollout_kl_k3', 0):.2e}",
             f"entropy {r.get('policy/entropy', 0):.3f}", f"route-mismatch {r.get('routing/mismatch_own', 0):.4f}",
             f"idle {r['trainer/idle_fraction']:.2f}", f"rollout {r['rollout/tokens_per_s']:.0f} tok/s"]
    return " | ".join(parts)
