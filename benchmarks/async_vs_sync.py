"""Asynchronous (lag >= 1) vs synchronous (lag 0) RL over several seeds: throughput, sample efficiency,
time to target, hand-off time, and the ideal overlap.

    python benchmarks/async_vs_sync.py [--config configs/rl_tiny_cpu.toml] [--seeds 1,2,3,4,5] [--lag 1]
                                       [--steps 80] [--window 20] [--target auto] [--out DIR] [--set k=v ...]
                                       [--reuse]   (keep the finished runs of an interrupted benchmark)

Why this shape (issue 14, item 3): one seed pair once gave a 3.15x speedup
that other seeds did not reproduce (0.72x to 2.34x over 4 seeds). So:
  * every seed runs both modes, interleaved (seed 1 sync then async, seed 2
    async then sync, ...), so drift in machine load hits both alike;
  * throughput (seconds per step at equal batch, startup excluded) and
    sample efficiency (reward against consumed samples = steps x batch) are
    reported apart, each as median [min, max] over seeds;
  * time to target comes from the seed-AVERAGED curves: the mean over seeds
    of the reward at each step (moving average over --window steps) against
    the mean elapsed time at that step. --target auto takes the lower of the
    two modes' final averaged rewards, a level both reach;
  * the ideal overlap speedup is computed from the sync runs' measured
    generation and training times: (T_gen + T_train) / max(T_gen, T_train);
  * hand-off time per step (rl/handoff.py: step time that is neither
    training nor generation) is reported per mode, in seconds and as a
    fraction of the step; the goal is <= 10% of a step.
On a machine with fewer cores than processes the roles compete for CPU, and
every number here includes that contention.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ running
def finished_run(run_dir: Path, steps: int) -> list[dict] | None:
    """The metrics of a run already finished in `run_dir` (--reuse), else None."""
    path = run_dir / "rl" / "metrics.jsonl"
    metrics = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return metrics if len(metrics) == steps else None


def run_once(config: Path, lag: int, seed: int, steps: int, out: Path, extra: list[str],
             reuse: bool = False) -> list[dict]:
    """One RL run; returns its per-step metrics (rl/metrics.jsonl)."""
    run_dir = out / f"seed{seed}_lag{lag}"
    if reuse and (done := finished_run(run_dir, steps)) is not None:
        return done
    if run_dir.exists():
        shutil.rmtree(run_dir)  # a partial run would append to its metrics.jsonl
    cmd = [sys.executable, "-m", "megatron_ernie.rl.main", "--config", str(config), "--set", f'run.dir="{run_dir}"',
           "--set", f"rl.buffer.max_policy_lag={lag}", "--set", f"train.iters={steps}", "--set", f"run.seed={seed}",
           "--set", "checkpoint.save_on_exit=false", "--set", "log.tensorboard=false", "--resume", "none", *extra]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "PYTHONUNBUFFERED": "1"}
    with open(out / f"seed{seed}_lag{lag}.log", "w") as log:
        code = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    if code != 0:
        raise SystemExit(f"seed {seed}, lag {lag}: the run failed ({code}); see {out / f'seed{seed}_lag{lag}.log'}")
    return [json.loads(line) for line in (run_dir / "rl" / "metrics.jsonl").read_text().splitlines()]


def schedule(seeds: list[int], lag: int) -> list[tuple[int, int]]:
    """(seed, lag) pairs, the order of the two modes alternating from seed to seed."""
    pairs = []
    for i, seed in enumerate(seeds):
        modes = (0, lag) if i % 2 == 0 else (lag, 0)
        pairs += [(seed, m) for m in modes]
    return pairs


# ---------------------------------------------------------------- per run
def elapsed(metrics: list[dict]) -> np.ndarray:
    """Seconds since the first step began, at the end of each step (startup excluded)."""
    t0 = metrics[0]["time"] - metrics[0]["trainer/step_s"]
    return np.array([m["time"] - t0 for m in metrics])


def run_summary(metrics: list[dict], window: int) -> dict:
    """One run's throughput, final reward and hand-off (medians over steps where per-step)."""
    t = elapsed(metrics)
    handoff = [m for m in metrics if "handoff/seconds" in m]
    return {"s_per_step": float((t[-1] - t[0]) / max(len(t) - 1, 1)),
            "final_reward": float(np.mean([m["reward/mean"] for m in metrics[-window:]])),
            "train_s": float(np.median([m["trainer/step_s"] for m in metrics])),
            "generation_s": float(np.median([m["handoff/generation_s"] for m in handoff])),
            "handoff_s": float(np.median([m["handoff/seconds"] for m in handoff])),
            "handoff_fraction": float(np.median([m["handoff/fraction"] for m in handoff])),
            "idle_fraction": float(np.median([m["trainer/idle_fraction"] for m in metrics])),
            "lag_mean": float(np.mean([m["staleness/lag_mean"] for m in metrics]))}


# -------------------------------------------------------- across seeds
def moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over up to `window` steps (shorter at the start)."""
    sums = np.cumsum(np.insert(values, 0, 0.0))
    idx = np.arange(1, len(values) + 1)
    start = np.maximum(idx - window, 0)
    return (sums[idx] - sums[start]) / (idx - start)


def averaged_curve(runs: list[list[dict]], window: int) -> tuple[np.ndarray, np.ndarray]:
    """(mean elapsed seconds, moving average of the mean reward) per step, over seeds (common length)."""
    steps = min(len(r) for r in runs)
    reward = np.mean([[m["reward/mean"] for m in r[:steps]] for r in runs], axis=0)
    seconds = np.mean([elapsed(r)[:steps] for r in runs], axis=0)
    return seconds, moving_average(reward, window)


def time_to_target(seconds: np.ndarray, curve: np.ndarray, target: float) -> float | None:
    reached = np.flatnonzero(curve >= target)
    return float(seconds[reached[0]]) if reached.size else None


def spread(values) -> dict:
    v = np.asarray(values, dtype=float)
    return {"median": float(np.median(v)), "min": float(v.min()), "max": float(v.max())}


def ideal_speedup(sync: list[dict]) -> dict:
    """From the sync runs' own medians: a step costs T_gen + T_train (+ hand-off), overlapped max of the two."""
    t_gen = float(np.median([s["generation_s"] for s in sync]))
    t_train = float(np.median([s["train_s"] for s in sync]))
    step = float(np.median([s["s_per_step"] for s in sync]))
    return {"t_gen": t_gen, "t_train": t_train, "ideal": (t_gen + t_train) / max(t_gen, t_train, 1e-9),
            "ideal_with_handoff": step / max(t_gen, t_train, 1e-9)}


def compare(runs: dict, lag: int, window: int, target) -> dict:
    """Everything the table shows, from runs[(seed, lag)] = metrics."""
    modes = {m: [runs[k] for k in sorted(runs) if k[1] == m] for m in (0, lag)}
    per_run = {m: [run_summary(r, window) for r in rs] for m, rs in modes.items()}
    curves = {m: averaged_curve(rs, window) for m, rs in modes.items()}
    if target == "auto":
        target = min(float(c[-1]) for _, c in curves.values())
    ttt = {m: time_to_target(*curves[m], float(target)) for m in modes}
    half = {m: float(c[len(c) // 2 - 1]) for m, (_, c) in curves.items()}
    stats = {m: {k: spread([s[k] for s in per_run[m]]) for k in per_run[m][0]} for m in modes}
    return {"target": float(target), "time_to_target_s": ttt, "reward_at_half_samples": half,
            "reward_at_all_samples": {m: float(c[-1]) for m, (_, c) in curves.items()},
            "stats": stats, "ideal": ideal_speedup(per_run[0]), "per_run": per_run}


# ------------------------------------------------------------------ report
def _fmt(s: dict, digits: int = 3) -> str:
    return f"{s['median']:.{digits}f} [{s['min']:.{digits}f}, {s['max']:.{digits}f}]"


def print_report(result: dict, lag: int, seeds: list[int], steps: int, batch: int, window: int) -> None:
    names = {0: "sync (lag 0)", lag: f"async (lag {lag})"}
    print(f"\n{len(seeds)} seeds per mode {seeds}, interleaved; {steps} steps of {batch} samples per run; "
          f"median [min, max] over seeds")
    rows = [("s / step", "s_per_step", 3), ("train s / step", "train_s", 3), ("generation s / step", "generation_s", 3),
            ("hand-off s / step", "handoff_s", 3), ("hand-off / step", "handoff_fraction", 2),
            ("trainer idle", "idle_fraction", 2), ("final reward", "final_reward", 3), ("mean lag", "lag_mean", 2)]
    print(f"{'':<22}" + "".join(f"{names[m]:>28}" for m in (0, lag)))
    for label, key, digits in rows:
        print(f"{label:<22}" + "".join(f"{_fmt(result['stats'][m][key], digits):>28}" for m in (0, lag)))
    throughput = result["stats"][0]["s_per_step"]["median"] / result["stats"][lag]["s_per_step"]["median"]
    print(f"\nthroughput (median s/step, sync / async): {throughput:.2f}x")
    print("sample efficiency, seed-averaged moving-average reward at half / all samples: "
          + "; ".join(f"{names[m]} {result['reward_at_half_samples'][m]:.3f} / {result['reward_at_all_samples'][m]:.3f}"
                      for m in (0, lag)))
    ttt = result["time_to_target_s"]
    shown = {m: f"{ttt[m]:.1f} s" if ttt[m] is not None else "not reached" for m in ttt}
    speed = f"{ttt[0] / ttt[lag]:.2f}x" if ttt[0] and ttt[lag] else "n/a"
    print(f"time to target {result['target']:.3f} (seed-averaged curves, window {window}): "
          f"sync {shown[0]}, async {shown[lag]} -> speedup {speed}")
    i = result["ideal"]
    print(f"ideal overlap from the sync runs: T_gen {i['t_gen']:.3f} s, T_train {i['t_train']:.3f} s -> "
          f"(T_gen + T_train) / max = {i['ideal']:.2f}x; with the sync step's hand-off hidden too: "
          f"{i['ideal_with_handoff']:.2f}x")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "configs" / "rl_tiny_cpu.toml"))
    p.add_argument("--seeds", default="1,2,3,4,5")
    p.add_argument("--lag", type=int, default=1, help="the asynchronous mode's rl.buffer.max_policy_lag")
    p.add_argument("--steps", type=int, default=80)
    p.add_argument("--window", type=int, default=20)
    p.add_argument("--target", default="auto", help="a reward, or auto: the lower final averaged reward")
    p.add_argument("--batch", type=int, default=64, help="samples per step of the config (for the report)")
    p.add_argument("--out", default="runs/async_vs_sync")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--reuse", action="store_true", help="keep runs of --out that already finished (same --steps)")
    args = p.parse_args(argv)
    if args.lag < 1:
        p.error("--lag must be >= 1 (lag 0 is the synchronous baseline, always run)")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    seeds = [int(x) for x in args.seeds.split(",")]
    extra = [x for o in args.overrides for x in ("--set", o)]
    runs, start = {}, time.monotonic()
    for seed, lag in schedule(seeds, args.lag):
        runs[(seed, lag)] = run_once(Path(args.config), lag, seed, args.steps, out, extra, args.reuse)
        print(f"seed {seed} lag {lag}: done ({time.monotonic() - start:.0f} s so far)", flush=True)
    target = args.target if args.target == "auto" else float(args.target)
    result = compare(runs, args.lag, args.window, target)
    print_report(result, args.lag, seeds, args.steps, args.batch, args.window)
    (out / "summary.json").write_text(json.dumps({**result, "seeds": seeds, "steps": args.steps,
                                                  "per_run": {str(k): v for k, v in result["per_run"].items()}},
                                                 indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
