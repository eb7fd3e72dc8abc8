"""Search the supernet's sub-networks for the best one under a budget.

Exhaustive over the configured grid: the axes are small discrete sets (a few
values each, so tens to a few hundred sub-networks), one evaluation is a few
forward passes, and exhaustive search returns the exact Pareto front, which an
evolutionary search would only approximate.  For grids too large to evaluate,
narrow the axes or evaluate a spread first (``--limit``).

Budgets: total parameters, active parameters (per token) or forward FLOPs per
token, all computed exactly from the config (``params.py``).
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
from pathlib import Path

import torch.distributed as dist

from megatron_ernie.config.errors import ConfigError
from megatron_ernie.elastic.params import subnet_size
from megatron_ernie.elastic.subnet import Subnet, check_subnet, choices

BUDGETS = {"total": "total_params", "active": "active_params", "flops": "flops_per_token"}


def grid(axis_choices: dict, model, moe) -> list[Subnet]:
    out = []
    for d, f, e, k in itertools.product(*(axis_choices[a] for a in ("depth", "ffn", "experts", "topk"))):
        s = Subnet(d, f, e, k)
        try:
            check_subnet(s, model, moe)
        except ConfigError:
            continue
        out.append(s)
    return out


def size_row(s: Subnet, model, moe, vocab: int, layer_order) -> dict:
    size = subnet_size(model, moe, vocab, s, layer_order)
    return {"subnet": str(s), "depth": s.depth, "ffn": s.ffn, "experts": s.experts, "topk": s.topk,
            "total_params": size.total, "active_params": size.active, "flops_per_token": size.flops_per_token}


def spread(subnets: list[Subnet], rows: list[dict], n: int) -> list[Subnet]:
    """Largest, smallest and evenly spaced (by active params) sub-networks, n in all."""
    order = sorted(range(len(subnets)), key=lambda i: rows[i]["active_params"])
    if n >= len(order):
        return [subnets[i] for i in order]
    picks = {order[round(j * (len(order) - 1) / (n - 1))] for j in range(n)} if n > 1 else {order[-1]}
    return [subnets[i] for i in sorted(picks, key=lambda i: rows[i]["active_params"])]


def evaluate(run, subnets: list[Subnet]) -> list[dict]:
    """Validation loss of each sub-network on the run's fixed validation batches."""
    from megatron_ernie.data.loader import BatchLayout, iter_global_batches
    from megatron_ernie.elastic.train import eval_subnet
    from megatron_ernie.model.build import padded_vocab_size

    cfg, t = run.cfg, run.cfg.train
    layout = BatchLayout(t.global_batch_size, t.micro_batch_size, run.groups.dims.dp, run.groups.dp_rank)
    batches = [b for _, b in zip(range(max(t.eval_iters, 1)), iter_global_batches(run.data.valid, layout, 0))]
    vocab = padded_vocab_size(run.data.tokenizer.vocab_size, cfg.parallel.tensor)
    rows = []
    for s in subnets:
        results = [eval_subnet(run.model, b, run.shape, run.groups, s) for b in batches]
        tokens = sum(r.tokens for r in results)
        row = size_row(s, cfg.model, cfg.moe, vocab, cfg.elastic.layer_order)
        row["valid_loss"] = sum(r.loss * r.tokens for r in results) / max(tokens, 1)
        rows.append(row)
    return mark_pareto(rows)


def evaluate_family(run, n: int) -> list[dict]:
    cfg = run.cfg
    subnets = grid(choices(cfg.elastic, cfg.model, cfg.moe), cfg.model, cfg.moe)
    sizes = [size_row(s, cfg.model, cfg.moe, 0, cfg.elastic.layer_order) for s in subnets]
    return evaluate(run, spread(subnets, sizes, n))


def mark_pareto(rows: list[dict]) -> list[dict]:
    """A row is on the front if no other row has <= active params and a lower loss."""
    for r in rows:
        r["pareto"] = not any(o is not r and o["active_params"] <= r["active_params"]
                              and o["valid_loss"] < r["valid_loss"] for o in rows)
    return rows


def best_under_budget(rows: list[dict], kind: str, budget: float) -> dict:
    key = BUDGETS[kind]
    fitting = [r for r in rows if r[key] <= budget]
    if not fitting:
        smallest = min(r[key] for r in rows)
        raise ConfigError(f"--budget-{kind}", budget, f"no sub-network fits; the smallest has {smallest:,} "
                                                      f"{key.replace('_', ' ')}")
    return min(fitting, key=lambda r: r["valid_loss"])


def write_outputs(rows: list[dict], out_dir: Path, name: str) -> None:
    """CSV + JSON table and a Pareto plot (valid loss vs active params); rank 0 writes."""
    if dist.is_initialized() and dist.get_rank() != 0:
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / f"{name}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (out_dir / f"{name}.json").write_text(json.dumps(rows, indent=2))
    plot_pareto(rows, out_dir / ("pareto.png" if name == "family" else f"{name}_pareto.png"))


def plot_pareto(rows: list[dict], path: Path, reference: list[dict] | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    ax.scatter([r["active_params"] for r in rows], [r["valid_loss"] for r in rows], s=18, color="#8da0cb",
               label="sub-networks of the supernet")
    front = sorted((r for r in rows if r.get("pareto")), key=lambda r: r["active_params"])
    ax.plot([r["active_params"] for r in front], [r["valid_loss"] for r in front], "-o", color="#d95f02",
            label="Pareto front")
    for r in reference or []:
        ax.scatter([r["active_params"]], [r["valid_loss"]], marker="*", s=120, color="#1b9e77")
        ax.annotate(r["label"], (r["active_params"], r["valid_loss"]), fontsize=7)
    ax.set_xlabel("active parameters per token")
    ax.set_ylabel("validation loss")
    ax.set_title("Elastic MoE supernet: sub-network family")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def format_table(rows: list[dict]) -> str:
    lines = [f"{'sub-network':<36}{'total':>12}{'active':>12}{'GFLOP/tok':>11}{'valid loss':>12}  pareto"]
    for r in rows:
        lines.append(f"{r['subnet']:<36}{r['total_params']:>12,}{r['active_params']:>12,}"
                     f"{r['flops_per_token'] / 1e9:>11.4f}{r['valid_loss']:>12.4f}  {'*' if r.get('pareto') else ''}")
    return "\n".join(lines)


def main(argv=None) -> int:
    """`ernie search`: evaluate the grid from a run's latest checkpoint, pick the best under a budget."""
    from megatron_ernie.config.outputs import check_writable_dir
    from megatron_ernie.elastic.session import open_supernet

    p = argparse.ArgumentParser(prog="ernie search", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", required=True, help="a run trained with [elastic] enabled")
    for kind in BUDGETS:
        p.add_argument(f"--budget-{kind}", type=float, help=f"at most this many {BUDGETS[kind].replace('_', ' ')}")
    p.add_argument("--out", help="where to write search.csv/json and the plot (default <run-dir>/elastic)")
    args = p.parse_args(argv)
    out = Path(args.out or Path(args.run_dir) / "elastic")
    check_writable_dir("--out", out)
    run = open_supernet(args.run_dir)
    cfg = run.cfg
    rows = evaluate(run, grid(choices(cfg.elastic, cfg.model, cfg.moe), cfg.model, cfg.moe))
    write_outputs(rows, out, "search")
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(format_table(rows))
        for kind in BUDGETS:
            budget = getattr(args, f"budget_{kind}")
            if budget is not None:
                best = best_under_budget(rows, kind, budget)
                print(f"best under {kind} budget {budget:,.0f}: {best['subnet']} (valid loss {best['valid_loss']:.4f})")
    return 0


def eval_main(argv=None) -> int:
    """`ernie eval`: validation loss of any checkpoint (a supernet's sub-network with --subnet, or a
    plain, extracted or imported model); --json prints the row with full precision."""
    from megatron_ernie.elastic.session import open_any
    from megatron_ernie.runtime import distributed

    p = argparse.ArgumentParser(prog="ernie eval", description="validation loss of a checkpoint "
                                "(a supernet's sub-network with --subnet)")
    p.add_argument("--run-dir", required=True, help="a run directory, checkpoints/ root or checkpoint directory")
    p.add_argument("--subnet", default="", help='e.g. "depth=3,ffn=0.5,experts=2,topk=1" (empty = full)')
    p.add_argument("--json", action="store_true", help="print one JSON object (full precision)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="change the checkpoint's config for this evaluation, e.g. the validation data: "
                        "--set 'data.prefixes=[\"P\"]' --set data.tokenizer=<checkpoint>/tokenizer.json")
    args = p.parse_args(argv)
    run = open_any(args.run_dir, args.overrides)
    try:
        row = _eval_row(run, args.subnet)
        if not dist.is_initialized() or dist.get_rank() == 0:
            print(json.dumps(row) if args.json else format_table([row]))
    finally:
        distributed.shutdown()  # a clean exit: no process group left to abort at interpreter teardown
    return 0


def _eval_row(run, subnet_text: str) -> dict:
    """One table row: the sub-network of a supernet, or the whole of a plain model."""
    from megatron_ernie.elastic.subnet import full_subnet, parse_subnet
    from megatron_ernie.model.build import padded_vocab_size
    from megatron_ernie.train import loop

    cfg = run.cfg
    if cfg.elastic.enabled:
        return evaluate(run, [parse_subnet(subnet_text, cfg.model, cfg.moe)])[0]
    if subnet_text:
        raise ConfigError("--subnet", subnet_text, "this checkpoint is a plain model, not a supernet; leave it out")
    vocab = padded_vocab_size(run.data.tokenizer.vocab_size, cfg.parallel.tensor)
    row = size_row(full_subnet(cfg.model, cfg.moe), cfg.model, cfg.moe, vocab, ())
    row["valid_loss"] = loop.evaluate(run)
    return row
