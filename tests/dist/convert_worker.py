"""Multi-process scenarios for tests/test_convert.py (run under torchrun; rank 0 writes JSON).

    torchrun --nproc_per_node=N tests/dist/convert_worker.py SCENARIO OUT.json CASE_JSON

``reference``: train a few steps at each layout, save, and record what our
megatron-core model computes *at that layout* (logits of fixed tokens through
megatron's own pipeline schedule, greedy continuations, eval loss) for the
pytest side to compare with ``transformers`` after export.
``reload``: load converted checkpoints (resharded, imported) at a new layout,
evaluate and train on.  The model/data settings are worker.py's BASE.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from megatron_ernie.cli import pretrain_objective
from megatron_ernie.train import loop
from worker import gather, make_cfg  # tests/dist is sys.path[0] under torchrun


def _vocab_parallel_gather(logits: torch.Tensor, run) -> torch.Tensor:
    """[b, s, V/TP] shards of the output layer -> the full [b, s, V] on every TP rank."""
    if run.groups.dims.tp == 1:
        return logits
    parts = [torch.empty_like(logits) for _ in range(run.groups.dims.tp)]
    dist.all_gather(parts, logits.contiguous(), group=run.groups.pgs.tp)
    return torch.cat(parts, dim=-1)


def layout_logits(run, tokens: torch.Tensor) -> torch.Tensor:
    """Logits of ``tokens`` [b, s] through megatron-core's schedule at the run's layout (all ranks)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    b, s = tokens.shape
    batch = {"tokens": tokens, "position_ids": torch.arange(s).expand(b, s).contiguous()}

    def step(data_iterator, model):
        data = next(data_iterator)
        output = model(data["tokens"], data["position_ids"], None)
        return output, lambda out, non_loss_data=False: out.detach().clone()

    dims = run.groups.dims
    schedule = get_forward_backward_func(pp_size=dims.pp, vp_size=None)
    for chunk in run.model:
        chunk.eval()
    with torch.no_grad():
        stored = schedule(forward_step_func=step, data_iterator=iter([batch]), model=run.model, num_microbatches=1,
                          seq_length=s, micro_batch_size=b, forward_only=True, collect_non_loss_data=True)
    for chunk in run.model:
        chunk.train()
    mine = _vocab_parallel_gather(stored[0], run).tolist() if stored else None
    return torch.tensor(next(x for x in gather(mine) if x is not None))


def greedy(run, prompt: list[list[int]], steps: int, length: int) -> list[list[int]]:
    """Greedy continuation with full re-forwards over a fixed-length buffer (causal: the
    padding after the current position cannot change the logits before it)."""
    buf = torch.zeros(len(prompt), length, dtype=torch.long)
    buf[:, : len(prompt[0])] = torch.tensor(prompt)
    pos = len(prompt[0])
    for _ in range(steps):
        buf[:, pos] = layout_logits(run, buf)[:, pos - 1].argmax(-1)
        pos += 1
    return buf[:, len(prompt[0]):pos].tolist()


def full_network(run) -> None:
    """An elastic supernet is compared at its largest sub-network (what export writes)."""
    if run.cfg.elastic.enabled:
        from megatron_ernie.elastic.model import apply_subnet
        from megatron_ernie.elastic.subnet import full_subnet

        for chunk in run.model:
            apply_subnet(chunk, full_subnet(run.cfg.model, run.cfg.moe))


def scenario_reference(case: dict, tmp: Path) -> dict:
    tokens = torch.tensor(case["tokens"])
    results = {}
    for name, overrides in case["layouts"].items():
        cfg = make_cfg(str(tmp / name), case["common"] + overrides)
        run = loop.setup(cfg, pretrain_objective(cfg))
        loop.train(run)
        path = loop.save_checkpoint(run)
        full_network(run)
        results[name] = {"checkpoint": str(path), "eval": loop.evaluate(run),
                         "logits": layout_logits(run, tokens).tolist(),
                         "greedy": greedy(run, case["prompt"], case["steps"], tokens.shape[1]),
                         "iteration": run.progress.iteration}
        run.experts.remove()
    return results


def scenario_reload(case: dict, tmp: Path) -> dict:
    results = {}
    for name, spec in case["runs"].items():
        overrides = case["common"] + spec["overrides"] + [f"train.iters={spec['iters']}",
                                                          f"checkpoint.load=\"{spec['load']}\""]
        cfg = make_cfg(str(tmp / name), overrides)
        run = loop.setup(cfg, pretrain_objective(cfg))
        start = run.progress.iteration
        evaluated = loop.evaluate(run)
        loop.train(run)
        results[name] = {"eval": evaluated, "start": start, "end": run.progress.iteration,
                         "losses": run.progress.losses, "consumed_samples": run.progress.consumed_samples}
        run.experts.remove()
    return results


SCENARIOS = {"reference": scenario_reference, "reload": scenario_reload}


if __name__ == "__main__":
    import runner

    runner.run(SCENARIOS)
