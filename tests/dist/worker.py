"""Multi-process scenarios for the distributed tests (run under torchrun).

    torchrun --nproc_per_node=N tests/dist/worker.py SCENARIO OUT.json [CASE_JSON]

Each scenario runs several cases inside one launch (process start-up, ~5 s of
importing megatron per process, dominates on CPU) and rank 0 writes the
results as JSON for the pytest side to assert on.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_ernie import config as C
from megatron_ernie.checkpoint import store
from megatron_ernie.train import loop
from megatron_ernie.train import step as S

BASE = [
    "model.num_layers=4", "model.hidden_size=64", "model.num_attention_heads=4", "model.num_query_groups=2",
    "model.ffn_hidden_size=128", "model.seq_length=32", "moe.num_experts=4", "moe.router_topk=2",
    "moe.expert_ffn_hidden_size=64", "data.vocab_size=512", "train.global_batch_size=8",
    "train.micro_batch_size=2", "train.eval_interval=0", "train.eval_iters=2", "checkpoint.save_interval=0",
    "checkpoint.save_on_exit=false", "checkpoint.resume=none", "log.tensorboard=false", "log.level=\"WARNING\"",
    "schedule.warmup_iters=0",
]


def make_cfg(run_dir: str, overrides) -> C.ErnieConfig:
    return C.load(None, BASE + [f"run.dir=\"{run_dir}\""] + list(overrides))


def param_fingerprint(model_chunks) -> list[float]:
    """Per-rank float64 sum and sum of squares of every local parameter."""
    vals = []
    for chunk in model_chunks:
        for p in chunk.parameters():
            vals += [p.double().sum().item(), p.double().pow(2).sum().item()]
    return vals


def gather(obj):
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def run_case(run_dir: str, overrides) -> loop.Run:
    run = loop.setup(make_cfg(run_dir, overrides))
    loop.train(run)
    return run


def scenario_equivalence(case: dict, tmp: Path) -> dict:
    """Same seed and data at several layouts: loss curves must agree."""
    results = {}
    for name, overrides in case["layouts"].items():
        run = run_case(str(tmp / name), overrides + [f"train.iters={case['iters']}"])
        results[name] = run.progress.losses
        if case.get("save_from") == name:
            loop.save_checkpoint(run)
            results["saved_eval"] = loop.evaluate(run)
        run.experts.remove()
    if case.get("load_into"):
        name, overrides = case["load_into"]
        src = tmp / case["save_from"] / "checkpoints" / "latest"
        path = src.parent / src.read_text().strip()
        run = loop.setup(make_cfg(str(tmp / name), overrides + [f"checkpoint.load=\"{path}\""]))
        results["loaded_eval"] = loop.evaluate(run)
    return results


def resume_variant(n: int, over: list, tmp: Path) -> dict:
    straight = run_case(str(tmp / "straight"), over + [f"train.iters={2 * n}"])
    first = run_case(str(tmp / "split"), over + [f"train.iters={2 * n}", f"train.exit_interval={n}",
                                                 "checkpoint.save_on_exit=true"])
    second = run_case(str(tmp / "split"), over + [f"train.iters={2 * n}", "checkpoint.resume=\"auto\""])
    return {"straight": straight.progress.losses, "first": first.progress.losses,
            "second": second.progress.losses, "resumed_at": first.progress.iteration,
            "fp_straight": gather(param_fingerprint(straight.model)),
            "fp_split": gather(param_fingerprint(second.model))}


def scenario_resume(case: dict, tmp: Path) -> dict:
    """2N iterations straight vs N, stop, resume, N: identical losses and weights."""
    return {name: resume_variant(case["n"], over, tmp / name) for name, over in case["variants"].items()}


SCENARIOS = {"equivalence": scenario_equivalence, "resume": scenario_resume}


def main() -> None:
    scenario, out = sys.argv[1], Path(sys.argv[2])
    case = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}
    from megatron_ernie.runtime.distributed import init_distributed

    init_distributed()
    results = SCENARIOS[scenario](case, out.parent)
    if dist.get_rank() == 0:
        out.write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
