"""Extract a sub-network into a standalone, smaller megatron_ernie checkpoint.

The supernet is opened in one process at TP1/PP1/EP1 (its checkpoint
reshards on load), the sub-network's weights are physically sliced out —
kept layers in order, the first E' experts and router rows, the first f
channels of every expert's gate, up and down projections — into a plain model
built from a smaller config (fewer layers, smaller expert FFN, fewer experts,
smaller top-k, no [elastic]), and saved as a weights-only checkpoint that
``ernie pretrain --set checkpoint.load=<out>/checkpoints/iter_0000000`` loads
at any parallel layout.  The checkpoint records the supernet's data position
and final LR, so that run continues the data stream on tokens the supernet
did not see, warming up to at most the supernet's final LR
(train/continuation.py).  The output directory is written under a temporary
name and renamed when complete.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shutil
from pathlib import Path

import torch

from megatron_ernie import config as C
from megatron_ernie.checkpoint import store
from megatron_ernie.config.errors import ConfigError
from megatron_ernie.train import continuation
from megatron_ernie.elastic.subnet import Subnet, kept_channels, kept_layers, layer_ranking, parse_subnet

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.*)$")


def subnet_config(cfg: C.ErnieConfig, s: Subnet) -> C.ErnieConfig:
    """The plain config of the extracted model."""
    keep = sorted(kept_layers(s.depth, layer_ranking(cfg.model.num_layers, cfg.elastic.layer_order)))
    dense = sum(1 for i in keep if i < cfg.moe.first_dense_layers)
    moe = dataclasses.replace(cfg.moe, num_experts=s.experts if cfg.moe.num_experts else 0,
                              router_topk=s.topk if cfg.moe.num_experts else cfg.moe.router_topk,
                              expert_ffn_hidden_size=kept_channels(s.ffn, cfg.moe.expert_ffn_hidden_size),
                              first_dense_layers=dense)
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, num_layers=s.depth), moe=moe,
                               elastic=C.schema.ElasticConfig())


def _slice_expert_tensor(name: str, value, s: Subnet, width: int):
    if name.endswith("linear_fc1.weight"):  # gated: rows [gate (F); up (F)]
        full = value.shape[0] // 2
        return torch.cat([value[:width], value[full:full + width]])
    if name.endswith("linear_fc2.weight"):
        return value[:, :width]
    return value


def _slice_layer(rest: str, value, s: Subnet, width: int):
    m = re.match(r"mlp\.experts\.local_experts\.(\d+)\.(.*)$", rest)
    if m:
        return None if int(m.group(1)) >= s.experts else _slice_expert_tensor(m.group(2), value, s, width)
    if rest.startswith("mlp.router.") and torch.is_tensor(value) and value.dim() >= 1:
        return value[: s.experts]
    return value


def slice_state_dict(sd: dict, cfg: C.ErnieConfig, s: Subnet) -> dict:
    """Supernet state dict (TP1) -> the extracted model's state dict."""
    keep = sorted(kept_layers(s.depth, layer_ranking(cfg.model.num_layers, cfg.elastic.layer_order)))
    new_index = {old: new for new, old in enumerate(keep)}
    width = kept_channels(s.ffn, cfg.moe.expert_ffn_hidden_size)
    out = {}
    for key, value in sd.items():
        m = _LAYER.match(key)
        if not m:
            out[key] = value
            continue
        old = int(m.group(1))
        if old not in new_index:
            continue
        sliced = _slice_layer(m.group(2), value, s, width)
        if sliced is not None:
            out[f"decoder.layers.{new_index[old]}.{m.group(2)}"] = sliced.clone() if torch.is_tensor(sliced) else sliced
    return out


def adam_states(optimizer) -> dict:
    """param -> its AdamW state (exp_avg, exp_avg_sq, step), across megatron's (chained) optimizers."""
    out = {}
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        out.update(opt.optimizer.state)
    return out


def slice_moments(run, s: Subnet) -> dict[str, dict]:
    """The supernet's Adam state, sliced exactly like its weights: name -> {exp_avg, exp_avg_sq, step}.

    Needs the plain (non-distributed) optimizer, whose state is keyed by parameter (a
    distributed optimizer holds flat shards of it per data-parallel rank)."""
    states = adam_states(run.optimizer)
    params = dict(run.model[0].module.named_parameters())
    missing = [n for n, p in params.items() if "exp_avg" not in states.get(p, {})]
    if missing:
        raise ConfigError("--optimizer", True, f"the supernet's checkpoint holds no Adam state for {missing[0]} "
                                               f"(and {len(missing) - 1} more); extract without --optimizer")
    sliced = {key: slice_state_dict({n: states[p][key] for n, p in params.items()}, run.cfg, s)
              for key in ("exp_avg", "exp_avg_sq")}
    steps = {float(states[p]["step"]) for p in params.values()}  # every parameter steps every iteration
    step = max(steps)
    return {n: {"step": torch.tensor(step), "exp_avg": m, "exp_avg_sq": sliced["exp_avg_sq"][n]}
            for n, m in sliced["exp_avg"].items()}


def fill_moments(sub_optimizer, sub_model, moments: dict[str, dict]) -> None:
    """Give the extracted model's fresh optimizer the sliced state (its torch AdamW state per parameter),
    so megatron-core's own sharded_state_dict saves it like any optimizer state."""
    params = dict(sub_model[0].module.named_parameters())
    for opt in getattr(sub_optimizer, "chained_optimizers", [sub_optimizer]):
        for group in opt.optimizer.param_groups:
            for p in group["params"]:
                name = next((n for n, q in params.items() if q is p), None)
                if name is None:  # bf16: megatron's optimizer steps fp32 copies, not the model's parameters
                    raise ConfigError("--optimizer", True, "moments are carried for fp32 models only; "
                                                           "extract without --optimizer")
                opt.optimizer.state[p] = {k: v.clone() for k, v in moments[name].items()}


def extract(run, s: Subnet, out_dir: Path, with_optimizer: bool = False) -> tuple[Path, int]:
    """Build the plain model, fill it with the sliced weights (and, ``with_optimizer``, its optimizer
    with the supernet's Adam moments sliced alike), save; returns (checkpoint, #params)."""
    from megatron_ernie.model.build import build_model
    from megatron_ernie.train.optim import build_optimizer

    cfg = run.cfg
    sub = subnet_config(cfg, s)
    _, sub_model = build_model(sub.model, sub.moe, sub.parallel, run.groups, run.data.tokenizer.vocab_size,
                               cfg.run.seed)
    sliced = slice_state_dict(run.model[0].module.state_dict(), cfg, s)
    sub_model[0].module.load_state_dict(sliced, strict=True)
    sub_optimizer = None
    if with_optimizer:
        sub_optimizer = build_optimizer(sub.optimizer, sub.parallel, sub_model, run.groups.pgs,
                                        bf16=sub.model.dtype == "bf16")
        fill_moments(sub_optimizer, sub_model, slice_moments(run, s))
    n_params = sum(p.numel() for p in sub_model[0].parameters())
    sub = dataclasses.replace(sub, run=dataclasses.replace(sub.run, dir=str(out_dir)),
                              checkpoint=dataclasses.replace(sub.checkpoint, load=""))
    tmp = staging_dir(out_dir)
    C.save_resolved(sub, tmp)
    run.data.tokenizer.save(str(tmp / "tokenizer.json"))
    record = continuation.source_record(run)  # where a continuation picks up: data position, final LR
    meta = store.Meta(iteration=0, consumed_samples=record["consumed_samples"],
                      consumed_tokens=record["consumed_tokens"], layout={"world": 1},
                      extra={"weights_only": True, "source": f"extracted {s} from {cfg.checkpoint.load}",
                             "config": C.loader.to_dict(sub), continuation.KEY: record,
                             store.OPTIMIZER_STATE: with_optimizer})
    path = store.save(tmp / "checkpoints", meta, sub_model, sub_optimizer,
                      files={"config.toml": tmp / "config.toml", "tokenizer.json": tmp / "tokenizer.json"})
    os.replace(tmp, out_dir)
    return out_dir / "checkpoints" / path.name, n_params


def staging_dir(out_dir: Path) -> Path:
    """Where the extraction is written before the rename to ``out_dir``."""
    return out_dir.with_name(out_dir.name + ".tmp")


def check_new_output_dir(out: Path) -> None:
    """``out`` is new and writable, and its staging directory is not someone else's: an existing
    ``<out>.tmp`` may be another extraction still running or a user's files, so it is never deleted."""
    from megatron_ernie.config.outputs import check_writable_dir

    if out.exists():
        raise ConfigError("--out", str(out), "already exists; choose a new directory")
    check_writable_dir("--out", out)
    if staging_dir(out).exists():
        raise ConfigError("--out", str(out), f"{staging_dir(out)} exists (another extraction running, or left by "
                                             f"one that was killed); remove it yourself or choose another --out")


def check_single_optimizer(run_dir) -> None:
    """Extraction runs in one process (expert parallel 1). megatron-core keeps separate dense and
    expert optimizers only when expert parallelism splits the data-parallel group, so the Adam moments
    of a supernet saved at expert parallel > 1 cannot be regrouped here: say how to get there."""
    from megatron_ernie.checkpoint.store import read_meta
    from megatron_ernie.elastic.session import locate

    _, checkpoint = locate(run_dir)
    ep = int(read_meta(checkpoint).layout.get("ep", 1))
    if ep > 1:
        raise ConfigError("--optimizer", f"a supernet saved at expert parallel {ep} ({checkpoint})",
                          "its Adam moments are split into dense and expert optimizers that a one-process "
                          f"extraction cannot regroup; rewrite it first with `ernie convert reshard {checkpoint} "
                          "OUT --set parallel.expert=1` and extract from OUT, or extract without --optimizer")


def main(argv=None) -> int:
    from megatron_ernie.elastic.params import subnet_size
    from megatron_ernie.elastic.session import open_supernet
    from megatron_ernie.model.build import padded_vocab_size

    p = argparse.ArgumentParser(prog="ernie extract", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", required=True, help="a run trained with [elastic] enabled")
    p.add_argument("--subnet", required=True, help='e.g. "depth=3,ffn=0.5,experts=2,topk=1"')
    p.add_argument("--out", required=True, help="new directory for the extracted model (must not exist)")
    p.add_argument("--optimizer", action="store_true",
                   help="also carry the supernet's Adam moments, sliced like the weights (plain fp32 optimizer)")
    args = p.parse_args(argv)
    out = Path(args.out)
    check_new_output_dir(out)
    if args.optimizer:
        check_single_optimizer(args.run_dir)
    run = open_supernet(args.run_dir, ["checkpoint.load_optimizer=true"] if args.optimizer else (),
                        single_process=True)
    s = parse_subnet(args.subnet, run.cfg.model, run.cfg.moe)
    ckpt, n_params = extract(run, s, out, with_optimizer=args.optimizer)
    vocab = padded_vocab_size(run.data.tokenizer.vocab_size, 1)
    predicted = subnet_size(run.cfg.model, run.cfg.moe, vocab, s, run.cfg.elastic.layer_order).total
    print(f"extracted {s}: {n_params:,} parameters (predicted {predicted:,}) -> {ckpt}")
    print(f"continue training: torchrun ... -m megatron_ernie.cli pretrain --config {out / 'config.toml'} "
          f"--set checkpoint.load=\"{ckpt}\"")
    return 0 if n_params == predicted else 1
