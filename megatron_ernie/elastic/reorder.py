"""Importance ordering: put the most important experts and FFN channels first.

Width and expert-count sub-networks keep *prefixes* (channels [0, f), experts
[0, E')), so the order of channels and experts decides what a small
sub-network keeps.  As in Once-for-All and Minitron, we sort them by
importance before (or between phases of) shrinking:

* experts by how many tokens the router sends them on calibration batches;
* an expert's FFN channels by ||W_down[:, c]|| * (||W_gate[c]|| + ||W_up[c]||),
  the magnitude of the channel's contribution.

A permutation of experts (with their router rows and expert-bias entries) or
of one expert's channels leaves the full model's function unchanged; the same
permutation is applied to the AdamW moments, so training continues exactly as
if nothing had moved.  Layers get an importance ranking too (loss increase
when the layer alone is skipped), written as ``elastic.layer_order``.

Runs in one process at TP1/PP1/EP1 with the plain (non-distributed)
optimizer, whose state is keyed by parameter and reshards to any layout.

Reordering must come before the prefixes are trained: once sub-networks that
keep fewer experts or channels (or, with ``--layers``, fewer layers) have been
trained, moving others into the kept prefix throws their training away.  So a
checkpoint whose run already opened those axes is refused; the recipe is
``elastic.open_after = N`` (only the largest trains before N), stop at N
(``train.exit_interval = N``), ``ernie reorder``, then resume the same config.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import torch

from megatron_ernie import config as C
from megatron_ernie.checkpoint import store
from megatron_ernie.config.errors import ConfigError


def _adam_states(optimizer) -> dict:
    """param -> its AdamW state dict, across megatron's (chained) optimizers."""
    out = {}
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        out.update(opt.optimizer.state)
    return out


def _permute(tensor: torch.Tensor, perm: torch.Tensor, dim: int) -> None:
    with torch.no_grad():
        tensor.copy_(tensor.index_select(dim, perm))


def _permute_param(param, perm, dim, states) -> None:
    _permute(param.data, perm, dim)
    for key in ("exp_avg", "exp_avg_sq"):
        if param in states and key in states[param]:
            _permute(states[param][key], perm, dim)


def channel_order(expert) -> torch.Tensor:
    fc1, fc2 = expert.linear_fc1.weight, expert.linear_fc2.weight
    width = fc2.shape[1]
    gate, up = fc1[:width], fc1[width:]
    score = fc2.norm(dim=0) * (gate.norm(dim=1) + up.norm(dim=1))
    return torch.argsort(score, descending=True)


def reorder_channels(expert, states) -> None:
    perm = channel_order(expert)
    width = perm.numel()
    _permute_param(expert.linear_fc1.weight, torch.cat([perm, perm + width]), 0, states)
    _permute_param(expert.linear_fc2.weight, perm, 1, states)


def reorder_experts(moe_layer, load: torch.Tensor, states) -> torch.Tensor:
    """Sort experts by load (descending); returns the permutation."""
    perm = torch.argsort(load, descending=True, stable=True)
    experts = moe_layer.experts.local_experts
    for name in ("linear_fc1", "linear_fc2"):
        params = [getattr(e, name).weight for e in experts]
        stacked = torch.stack([p.data for p in params])
        moments = {k: torch.stack([states[p][k] for p in params]) for k in ("exp_avg", "exp_avg_sq")
                   if all(p in states and k in states[p] for p in params)}
        for new, old in enumerate(perm.tolist()):
            params[new].data.copy_(stacked[old])
            for k, m in moments.items():
                states[params[new]][k].copy_(m[old])
    _permute_param(moe_layer.router.weight, perm, 0, states)
    if getattr(moe_layer.router, "expert_bias", None) is not None:
        _permute(moe_layer.router.expert_bias, perm, 0)
    return perm


def calibration_load(run) -> dict[int, torch.Tensor]:
    """Tokens routed to each expert per layer, over the validation batches (full model)."""
    from megatron_ernie.elastic.objective import use_full_model
    from megatron_ernie.observe.expert_load import ExpertLoadTracker
    from megatron_ernie.train import loop

    use_full_model(run)
    tracker = ExpertLoadTracker(run.model)
    loop.evaluate(run)
    counts = {layer: c.clone() for layer, c in tracker.counts.items()}
    tracker.remove()
    return counts


def layer_importance(run) -> list[int]:
    """Layers ranked by the validation-loss increase when each alone is skipped."""
    from megatron_ernie.elastic.objective import use_full_model
    from megatron_ernie.train import loop

    use_full_model(run)
    layers = run.model[0].module.elastic_state.layers
    base = loop.evaluate(run)
    damage = {}
    for index, layer in sorted(layers.items()):
        layer.active = False
        damage[index] = loop.evaluate(run) - base
        layer.active = True
    return sorted(damage, key=lambda i: -damage[i])


def reorder(run) -> dict:
    """Reorder experts and channels of every MoE layer in place; returns what moved."""
    from megatron.core.transformer.moe.moe_layer import MoELayer

    states = _adam_states(run.optimizer)
    load = calibration_load(run)
    moved = {}
    for module in run.model[0].modules():
        if isinstance(module, MoELayer):
            layer = module.router.layer_number
            perm = reorder_experts(module, load[layer], states)
            for expert in module.experts.local_experts:
                reorder_channels(expert, states)
            moved[layer] = perm.tolist()
    return moved


def check_axes_closed(elastic, model, moe, iteration: int, layers: bool, run_dir) -> None:
    """Refuse to reorder a checkpoint (at ``iteration``) whose run has trained sub-networks that
    the reorder would change: fewer experts or FFN channels, and fewer layers with ``--layers``.
    An axis counts only if the run shrinks it (``elastic_axes``) and a step before the checkpoint
    had it open (``open_after`` / ``progressive``)."""
    from megatron_ernie.elastic.subnet import axes_trained_open, elastic_axes

    moved = {"experts", "ffn"} | ({"depth"} if layers else set())
    opened = sorted(moved & elastic_axes(elastic, model, moe) & axes_trained_open(elastic, iteration))
    if opened:
        raise ConfigError("--run-dir", str(run_dir), (
            f"its checkpoint at iteration {iteration} was trained with the axes {opened} open "
            f"(elastic.open_after = {elastic.open_after}); reordering now would move untrained experts/channels"
            f"{'/layers' if layers else ''} into the sub-networks already trained on them. Train with "
            f"elastic.open_after = N (only the largest trains before N; stop there with train.exit_interval = N), "
            f"run `ernie reorder` on the checkpoint at iteration <= N, then resume the same config to "
            f"train.iters with the axes open"))


def main(argv=None) -> int:
    from megatron_ernie.elastic.objective import ElasticObjective
    from megatron_ernie.elastic.session import SINGLE_PROCESS, supernet_config
    from megatron_ernie.train import loop

    p = argparse.ArgumentParser(prog="ernie reorder", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", required=True, help="an elastic run; a reordered checkpoint is added to it")
    p.add_argument("--layers", action="store_true", help="also rank layers and set elastic.layer_order")
    args = p.parse_args(argv)
    run_dir = Path(args.run_dir)
    cfg, latest = supernet_config(run_dir, [*SINGLE_PROCESS, "checkpoint.load_optimizer=true"])
    saved = C.load(run_dir / "config.toml")
    check_axes_closed(saved.elastic, saved.model, saved.moe, store.read_meta(latest).iteration, args.layers, run_dir)
    if saved.parallel.distributed_optimizer:
        raise ConfigError("parallel.distributed_optimizer", True, "reorder needs the plain optimizer's "
                          "per-parameter state; reorder before enabling the distributed optimizer")
    run = loop.setup(cfg, ElasticObjective())
    moved = reorder(run)
    order = tuple(layer_importance(run)) if args.layers else saved.elastic.layer_order
    resolved = dataclasses.replace(saved, elastic=dataclasses.replace(saved.elastic, layer_order=order))
    C.save_resolved(resolved, run_dir)
    run.cfg = dataclasses.replace(run.cfg, run=dataclasses.replace(run.cfg.run, dir=str(run_dir)),
                                  elastic=resolved.elastic)
    loop.save_checkpoint(run)
    for layer, perm in sorted(moved.items()):
        print(f"layer {layer}: experts reordered {perm}")
    if args.layers:
        print(f"layer order (most important first): {list(order)}")
    return 0
