"""Multi-process FP8 training scenarios (run under torchrun; rank 0 writes JSON).

    torchrun --nproc_per_node=2 tests/dist/fp8_worker.py OUT.json CASE_JSON

One launch runs every case of tests/test_fp8_training.py: an fp32 baseline and
emulated-FP8 runs of the same tiny MoE on the real corpus ("compare"), the
first steps of each other recipe ("short"), a stop/resume with delayed scaling
("resume"), FP8 from the baseline's fp32 checkpoint ("from_fp32"), tensor
parallel 2 ("tp2"), the backend = "te" error ("te_error"), and on a GPU the
TE backend against bf16 ("te"). Model and data settings are worker.py's BASE.
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from pathlib import Path

import torch.distributed as dist

from megatron_ernie.checkpoint import store
from megatron_ernie.config.errors import ConfigError
from megatron_ernie.precision.model import fp8_linears, fp8_scaling_state
from megatron_ernie.train import loop
from worker import gather, make_cfg, param_fingerprint  # tests/dist is sys.path[0] under torchrun


def fp8_overrides(recipe: str, *extra: str, backend: str = "emulate") -> list:
    return [f"fp8.recipe=\"{recipe}\"", f"fp8.backend=\"{backend}\"", *extra]


def state_lists(model_chunks) -> dict:
    """This rank's delayed-scaling state as JSON numbers (float32 -> float64 is exact)."""
    out = {}
    for i, chunk in enumerate(model_chunks):
        for name, roles in fp8_scaling_state(chunk).items():
            out[f"{i}:{name}"] = {role: {k: v.reshape(-1).tolist() for k, v in meta.items()}
                                  for role, meta in roles.items()}
    return out


def count_fp8_linears(model_chunks) -> int:
    return sum(len(fp8_linears(chunk)) for chunk in model_chunks)


def train_timed(run_dir: Path, overrides: list, save: bool = False) -> dict:
    """Train; the times (wall, and this rank's CPU) cover the training steps only, not setup."""
    run = loop.setup(make_cfg(str(run_dir), overrides))
    dist.barrier()
    start, cpu_start = time.perf_counter(), time.process_time()
    loop.train(run)
    cpu = time.process_time() - cpu_start  # less sensitive than wall time to a busy machine
    dist.barrier()
    result = {"losses": run.progress.losses, "seconds": time.perf_counter() - start,
              "cpu_seconds": gather(cpu),
              "fp8_linears": count_fp8_linears(run.model), "states": gather(state_lists(run.model)),
              "fingerprint": gather(param_fingerprint(run.model))}
    if save:
        result["saved"] = str(loop.save_checkpoint(run))
    run.experts.remove()
    return result


def case_compare(case: dict, tmp: Path) -> dict:
    """High precision and each FP8 recipe for the same N steps from the same weights and data.

    The baseline keeps the name "fp32" also when case["layout"] sets model.dtype.
    """
    iters = [f"train.iters={case['iters']}"] + case.get("layout", [])
    results = {"fp32": train_timed(tmp / "fp32", iters, save=case.get("save_baseline", False))}
    for recipe in case["recipes"]:
        fp8 = fp8_overrides(recipe, backend=case.get("backend", "emulate"))
        results[recipe] = train_timed(tmp / recipe, iters + fp8)
    return results


def case_short(case: dict, tmp: Path) -> dict:
    """Every recipe builds, trains the first steps of the compare run and saves a checkpoint."""
    results = {}
    for recipe in case["recipes"]:
        steps = [f"train.iters={case['iters']}", f"train.exit_interval={case['exit']}"]
        run = loop.setup(make_cfg(str(tmp / recipe), steps + fp8_overrides(recipe)))
        loop.train(run)
        saved = loop.save_checkpoint(run)
        results[recipe] = {"losses": run.progress.losses, "fp8_linears": count_fp8_linears(run.model),
                           "saved": saved.name}
        run.experts.remove()
    return results


def case_resume(case: dict, tmp: Path) -> dict:
    """2N steps straight vs N, save, fresh setup with resume=auto, N: state and losses."""
    n, over = case["n"], fp8_overrides("delayed", *case["fp8"]) + [f"train.iters={2 * case['n']}"]
    straight = loop.setup(make_cfg(str(tmp / "straight"), over))
    loop.train(straight)
    first = loop.setup(make_cfg(str(tmp / "split"), over + [f"train.exit_interval={n}"]))
    loop.train(first)
    loop.save_checkpoint(first)
    saved_state = gather(state_lists(first.model))
    second = loop.setup(make_cfg(str(tmp / "split"), over + ["checkpoint.resume=\"auto\""]))
    loaded_state = gather(state_lists(second.model))
    loop.train(second)
    result = {"straight": straight.progress.losses, "first": first.progress.losses,
              "second": second.progress.losses, "resumed_at": first.progress.iteration,
              "saved_state": saved_state, "loaded_state": loaded_state,
              "fp_straight": gather(param_fingerprint(straight.model)),
              "fp_split": gather(param_fingerprint(second.model))}
    for run in (straight, first, second):
        run.experts.remove()
    return result


def case_from_high_precision(case: dict, tmp: Path) -> dict:
    """Start FP8 training from a high-precision checkpoint: weights load, scales start fresh.

    The checkpoint is the one the baseline of case["source"] (a compare case) saved.
    """
    path = store.find_latest(tmp.parent / case["source"] / "fp32" / "checkpoints")
    run = loop.setup(make_cfg(str(tmp / "fp8"), fp8_overrides("delayed") + [f"checkpoint.load=\"{path}\""]))
    result = {"iteration": run.progress.iteration, "fingerprint": gather(param_fingerprint(run.model)),
              "states": gather(state_lists(run.model))}
    run.experts.remove()
    return result


def case_te_error(case: dict, tmp: Path) -> dict:
    """backend = "te" without TE or a GPU: the ConfigError and where it was raised."""
    try:
        loop.setup(make_cfg(str(tmp / "te"), ["fp8.recipe=\"delayed\"", "fp8.backend=\"te\""]))
    except ConfigError as error:
        frames = [frame.name for frame in traceback.extract_tb(error.__traceback__)]
        return {"field": error.field, "message": str(error), "frames": frames}
    return {"field": None, "message": "no error", "frames": []}


CASES = {"compare": case_compare, "short": case_short, "resume": case_resume,
         "tp2": case_compare, "te": case_compare, "from_fp32": case_from_high_precision,
         "te_error": case_te_error}


def main() -> None:
    out, cases = Path(sys.argv[1]), json.loads(sys.argv[2])
    from megatron_ernie.runtime.distributed import init_distributed

    init_distributed()
    rank, results = dist.get_rank(), {}
    for name, case in cases.items():
        start = time.perf_counter()
        results[name] = CASES[name](case, out.parent / name)
        if rank == 0:  # where the launch's time goes, for keeping the test quick
            print(f"fp8_worker: case {name} took {time.perf_counter() - start:.1f} s", file=sys.stderr)
    if rank == 0:
        out.write_text(json.dumps(results))
    if dist.is_initialized():  # a setup that fails (te_error) shuts the process group down itself
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
