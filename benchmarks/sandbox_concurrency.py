"""Throughput of the reward sandbox: one program at a time against several at once.

Why: a sandboxed run (rl/reward/sandbox.py) spends most of its wall time
waiting on the kernel (namespaces, mounts and a PID-1 process set up and torn
down), not on the CPU, so a reward worker that runs several at once scores
far more programs per second on the same cores. rl.system.reward_concurrency
sets how many; this prints wall and CPU time per run for each level, in one
run so that the ratios are comparable on a noisy machine.

    python benchmarks/sandbox_concurrency.py [--runs 32] [--levels 1,2,4,8]
"""

from __future__ import annotations

import argparse
import resource
import time
from concurrent.futures import ThreadPoolExecutor

from megatron_ernie.config.rl import SandboxConfig
from megatron_ernie.rl.reward.sandbox import run_python

PROGRAM = "a, b = map(int, input().split())\nprint(a + b)\n"


def cpu_seconds() -> float:
    """CPU of this process and every reaped child (the sandbox boot and the program)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def measure(runs: int, level: int, config: SandboxConfig) -> dict:
    cpu, start = cpu_seconds(), time.perf_counter()
    with ThreadPoolExecutor(level) as pool:
        results = list(pool.map(lambda i: run_python(PROGRAM, f"{i} 2\n", config), range(runs)))
    wall = time.perf_counter() - start
    wrong = [r.detail for i, r in enumerate(results) if r.status != "ok" or r.stdout.strip() != str(i + 2)]
    if wrong:
        raise RuntimeError(f"{len(wrong)} runs failed, e.g. {wrong[0]}")
    return {"level": level, "wall_ms": 1000 * wall / runs, "cpu_ms": 1000 * (cpu_seconds() - cpu) / runs,
            "isolation": results[0].isolation}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=32, help="programs per level")
    p.add_argument("--levels", default="1,2,4,8", help="comma-separated concurrency levels")
    args = p.parse_args(argv)
    config = SandboxConfig()
    run_python("print(1)", "", config)  # warm the page cache before measuring
    rows = [measure(args.runs, int(level), config) for level in args.levels.split(",")]
    base = rows[0]["wall_ms"]
    print(f"{'concurrency':>11} {'wall ms/run':>11} {'cpu ms/run':>10} {'speed-up':>8}  isolation")
    for row in rows:
        print(f"{row['level']:>11} {row['wall_ms']:>11.0f} {row['cpu_ms']:>10.0f} {base / row['wall_ms']:>7.1f}x  "
              f"{row['isolation']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
