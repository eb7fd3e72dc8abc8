"""Asynchronous vs synchronous RL: wall-clock to a target reward, and the ideal speedup.

    python benchmarks/async_vs_sync.py [--config configs/rl_tiny_cpu.toml] [--lags 0,1,2]
                                       [--steps 300] [--target 0.15] [--window 30] [--out DIR]

Runs the same RL job (same config, same seeds) once per max_policy_lag: lag 0
is synchronous (generate a batch, train on it, push weights, repeat); lag >= 1
lets rollout workers generate the next batches while the trainer trains.
For each run it reports the wall-clock time from the first training step
until the moving-average reward (over --window steps) first reaches --target,
the mean step time, the trainer's idle fraction and the final reward.

Ideal speedup, from the synchronous run's own measurements: one synchronous
step costs T_gen + T_train (+ the weight push), a perfectly overlapped one
max(T_gen, T_train); ideal = (T_gen + T_train) / max(T_gen, T_train).
T_train is the trainer's measured step time; T_gen the time the rollout
engines spent generating one batch (their measured engine seconds per token
times the batch's tokens, divided by the number of workers, which generate in
parallel). On a machine with fewer cores than processes the roles compete for
CPU and the measured speedup stays below the ideal one.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def run_once(config: Path, lag: int, steps: int, out: Path, extra: list[str]) -> tuple[list[dict], float]:
    run_dir = out / f"lag{lag}"
    cmd = [sys.executable, "-m", "megatron_ernie.rl.main", "--config", str(config), "--set", f'run.dir="{run_dir}"',
           "--set", f"rl.buffer.max_policy_lag={lag}", "--set", f"train.iters={steps}",
           "--set", "checkpoint.save_on_exit=false", "--resume", "none", *extra]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "PYTHONUNBUFFERED": "1"}
    start = time.monotonic()
    with open(out / f"lag{lag}.log", "w") as log:
        code = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    if code != 0:
        raise SystemExit(f"lag {lag}: the run failed ({code}); see {out / f'lag{lag}.log'}")
    metrics = [json.loads(line) for line in (run_dir / "rl" / "metrics.jsonl").read_text().splitlines()]
    return metrics, time.monotonic() - start


def time_to_target(metrics: list[dict], target: float, window: int) -> float | None:
    """Seconds from the first step to the first step at which the moving-average reward >= target."""
    rewards = np.array([m["reward/mean"] for m in metrics])
    t0 = metrics[0]["time"] - metrics[0]["trainer/step_s"]
    for i in range(window - 1, len(rewards)):
        if rewards[i - window + 1: i + 1].mean() >= target:
            return metrics[i]["time"] - t0
    return None


def summary(metrics: list[dict], total_s: float, target: float, window: int) -> dict:
    wall = metrics[-1]["time"] - (metrics[0]["time"] - metrics[0]["trainer/step_s"])
    return {"time_to_target_s": time_to_target(metrics, target, window), "steps_wall_s": wall,
            "total_wall_s": total_s, "step_s": wall / len(metrics),
            "train_s": float(np.mean([m["trainer/step_s"] for m in metrics])),
            "idle_fraction": float(np.mean([m["trainer/idle_fraction"] for m in metrics])),
            "lag_mean": float(np.mean([m["staleness/lag_mean"] for m in metrics])),
            "final_reward": float(np.mean([m["reward/mean"] for m in metrics[-window:]])),
            "sync_s": float(np.mean([m.get("weight_sync/seconds", 0.0) for m in metrics]))}


def ideal_speedup(sync_metrics: list[dict], workers: int) -> tuple[float, float, float]:
    """(T_gen, T_train, ideal speedup) measured on the synchronous run."""
    t_train = float(np.mean([m["trainer/step_s"] for m in sync_metrics]))
    per_token = np.mean([1.0 / m["rollout/engine_tokens_per_s"] for m in sync_metrics
                         if m.get("rollout/engine_tokens_per_s", 0) > 0])
    tokens = np.mean([m["rollout/response_length"] for m in sync_metrics]) * BATCH
    t_gen = float(per_token * tokens / workers)
    return t_gen, t_train, (t_gen + t_train) / max(t_gen, t_train)


BATCH = 64  # prompts_per_step * n_per_prompt of configs/rl_tiny_cpu.toml; --batch overrides


def main(argv=None) -> int:
    global BATCH
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "configs" / "rl_tiny_cpu.toml"))
    p.add_argument("--lags", default="0,1,2")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--target", type=float, default=0.15)
    p.add_argument("--window", type=int, default=30)
    p.add_argument("--workers", type=int, default=2, help="rollout workers of the config")
    p.add_argument("--batch", type=int, default=64, help="samples per step of the config")
    p.add_argument("--out", default="runs/async_vs_sync")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    args = p.parse_args(argv)
    BATCH = args.batch
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    extra = [x for o in args.overrides for x in ("--set", o)]
    results = {}
    for lag in [int(x) for x in args.lags.split(",")]:
        metrics, total = run_once(Path(args.config), lag, args.steps, out, extra)
        results[lag] = (summary(metrics, total, args.target, args.window), metrics)
    print_table(results, args)
    (out / "summary.json").write_text(json.dumps({k: v[0] for k, v in results.items()}, indent=1))
    return 0


def print_table(results: dict, args) -> None:
    print(f"\ntarget: moving-average reward (window {args.window}) >= {args.target}; {args.steps} steps per run")
    header = f"{'mode':<14}{'to target s':>12}{'speedup':>9}{'step s':>8}{'train s':>8}{'idle':>6}" \
             f"{'lag':>6}{'final reward':>13}{'run s':>8}"
    print(header)
    print("-" * len(header))
    base = results.get(0, (None,))[0]
    for lag, (s, _) in results.items():
        ttt = s["time_to_target_s"]
        speed = base["time_to_target_s"] / ttt if base and base["time_to_target_s"] and ttt else float("nan")
        name = "sync (lag 0)" if lag == 0 else f"async (lag {lag})"
        print(f"{name:<14}{(f'{ttt:.1f}' if ttt else 'not reached'):>12}{speed:>9.2f}{s['step_s']:>8.3f}"
              f"{s['train_s']:>8.3f}{s['idle_fraction']:>6.2f}{s['lag_mean']:>6.2f}{s['final_reward']:>13.3f}"
              f"{s['total_wall_s']:>8.0f}")
    if 0 in results:
        t_gen, t_train, ideal = ideal_speedup(results[0][1], args.workers)
        sync_step = results[0][0]["step_s"]
        print(f"\nideal speedup from the sync run: T_gen {t_gen:.3f} s + T_train {t_train:.3f} s per step -> "
              f"(T_gen + T_train) / max = {ideal:.2f}x")
        print(f"the sync step took {sync_step:.3f} s: {max(sync_step - t_gen - t_train, 0):.3f} s more than "
              f"T_gen + T_train (weight push, scoring, hand-offs between processes), which overlapping hides "
              f"as well; counting it, the ideal is {sync_step / max(t_gen, t_train):.2f}x")
        for lag, (s, _) in results.items():
            if lag:
                print(f"measured step-time speedup, lag {lag}: {results[0][0]['step_s'] / s['step_s']:.2f}x")


if __name__ == "__main__":
    sys.exit(main())
