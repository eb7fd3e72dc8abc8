"""Layouts built for real, to check the planner (tests/test_plan_dist.py).

    torchrun --nproc_per_node=4 tests/dist/plan_worker.py layouts OUT.json CASE_JSON

For every layout of the case (all in this one launch): build the run exactly
as `ernie pretrain` does, train one step (so AdamW has created its state),
recording the bytes handed to torch.distributed per group and the activations
saved per chunk forward (plan_probes.py), and count, on every rank, the bytes of the storages behind the parameters, behind
DDP's main-grad buffers and behind the optimizer's state and master weights.
Storages are counted once each, so views (megatron's parameters inside the
distributed optimizer's buffer, fp32 shards that alias the model weights) are
not double-counted.  The planner's prediction is made on the pytest side from
the run's resolved config.toml.
"""

from __future__ import annotations

from pathlib import Path

import torch
from megatron.core import parallel_state as ps

from plan_probes import CommCounter, SavedActivations
from worker import gather, make_cfg, setup
from megatron_ernie.train import loop


def _storages(tensors) -> dict[int, int]:
    return {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors if t is not None}


def _optimizer_tensors(optimizer):
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = opt.optimizer
        for group in inner.param_groups:
            yield from group["params"]
        for state in inner.state.values():
            yield from (v for v in state.values() if torch.is_tensor(v))


def count_static(run) -> dict:
    params = _storages(p for chunk in run.model for p in chunk.parameters())
    grads = _storages(p.main_grad for chunk in run.model for p in chunk.parameters())
    optim = {k: v for k, v in _storages(_optimizer_tensors(run.optimizer)).items()
             if k not in params and k not in grads}
    return {"params": sum(params.values()), "grads": sum(grads.values()), "optimizer": sum(optim.values()),
            "pp_rank": ps.get_pipeline_model_parallel_rank(), "dp_rank": ps.get_data_parallel_rank(),
            "expert_dp_rank": ps.get_expert_data_parallel_rank(),
            "vocab_size": run.data.tokenizer.vocab_size}


def _extracted_overrides(case_overrides: list, subnet: str, tmp: Path) -> list:
    """The extracted sub-network's own config, written as a TOML the run then loads."""
    from megatron_ernie import config as C
    from megatron_ernie.elastic.extract import subnet_config
    from megatron_ernie.elastic.subnet import parse_subnet

    cfg = make_cfg(str(tmp), case_overrides)
    sub = subnet_config(cfg, parse_subnet(subnet, cfg.model, cfg.moe))
    return sub


def scenario_layouts(case: dict, tmp: Path) -> dict:
    results = {}
    for name, spec in case["layouts"].items():
        run_dir = str(tmp / name)
        if "extract" in spec:
            import dataclasses

            sub = _extracted_overrides(spec["overrides"], spec["extract"], tmp / f"{name}_super")
            cfg = dataclasses.replace(sub, run=dataclasses.replace(sub.run, dir=run_dir))
            cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, iters=1))
            from megatron_ernie.cli import pretrain_objective

            run = loop.setup(cfg, pretrain_objective(cfg))
        else:
            run = setup(make_cfg(run_dir, spec["overrides"] + ["train.iters=1"]))
        saved = SavedActivations(run.model)
        with CommCounter() as comm:
            loop.train(run)
        saved.remove()
        rank = {**count_static(run), "comm": comm.bytes, "comm_control": comm.control, "saved_per_forward": saved.per_forward}
        results[name] = {"config": str(Path(run_dir) / "config.toml"), "ranks": gather(rank)}
        run.experts.remove()
    return results


if __name__ == "__main__":
    import runner

    runner.run({"layouts": scenario_layouts})
