"""A stand-in for a training task: reports what it discovered, as JSON.

    probe.py OUT_DIR [--mpi] [--wait-usr1 SECONDS] [anything a launcher appends]

Writes OUT_DIR/rank<R>-run<restart>.json with its DistEnv.  --mpi takes the
DistEnv from discover_mpi() and adds the mpi4py view (world, per-group
communicator).  --wait-usr1 waits for SIGUSR1 (first run only), records when
it came and exits with EXIT_REQUEUE, as a trainer that saved a checkpoint does.
"""

import argparse
import json
import os
import signal
import sys
import time
from dataclasses import asdict

from megatron_ernie.runtime.env import EXIT_REQUEUE, discover, torch_env


def mpi_view():
    from mpi4py import MPI

    from megatron_ernie.runtime.env import discover_mpi, split_by_group

    world = MPI.COMM_WORLD
    env = discover_mpi(world)
    group = split_by_group(world, env)
    return env, {"mpi_rank": world.Get_rank(), "mpi_size": world.Get_size(), "world_sum": world.allreduce(1),
                 "group_comm_size": group.Get_size(), "group_sum": group.allreduce(1),
                 "group_roles": sorted(set(group.allgather(env.role)))}


def wait_usr1(seconds: float):
    arrived = []
    signal.signal(signal.SIGUSR1, lambda *_: arrived.append(time.time()))
    deadline = time.time() + seconds
    while time.time() < deadline and not arrived:
        time.sleep(0.05)
    return arrived[0] if arrived else None


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--mpi", action="store_true")
    parser.add_argument("--wait-usr1", type=float, default=0)
    args, passed = parser.parse_known_args()  # the rest: what a launcher passes to `ernie`
    env, extra = mpi_view() if args.mpi else (discover(os.environ), {})
    restart = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
    report = {**asdict(env), **extra, "torch_env": torch_env(env), "host_node": os.environ.get("SLURMD_NODENAME"),
              "restart": restart, "start": time.time(), "argv": passed,
              "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}
    usr1 = wait_usr1(args.wait_usr1) if args.wait_usr1 and restart == 0 else None
    report["usr1"] = usr1
    path = os.path.join(args.out, f"rank{env.rank}-run{restart}.json")
    with open(path + ".tmp", "w") as f:
        json.dump(report, f)
    os.replace(path + ".tmp", path)
    if usr1:
        time.sleep(0.5)  # like a trainer's closing barrier: peers finish writing before anyone exits
        return EXIT_REQUEUE
    return 0


if __name__ == "__main__":
    sys.exit(main())
