"""`ernie summary`: what a finished run produced, read back from its directory.

Reads the TensorBoard event files with TensorBoard's own reader (so what is
printed is what TensorBoard will show), the latest checkpoint's meta.json and,
for elastic runs, the sub-network family table written by the search.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

from megatron_ernie.checkpoint.verify import latest_pointer, read_meta_dict


def _scalars(tb_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # One accumulator over the directory reads the event files in order, as TensorBoard does, and
    # applies a resumed run's purge step: steps a killed run logged after its checkpoint are dropped.
    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _family_table(rows: list[dict]) -> list[str]:
    lines = [f"{'sub-network':<34}{'total params':>14}{'active params':>15}{'valid loss':>12}"]
    for r in rows:
        lines.append(f"{r['subnet']:<34}{int(r['total_params']):>14,}{int(r['active_params']):>15,}"
                     f"{float(r['valid_loss']):>12.4f}")
    return lines


def _ranks(values: list[float]) -> list[float]:
    """1-based ranks, ties sharing the mean of the ranks they span (as Spearman's rho needs)."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for j in range(start, end + 1):
            ranks[order[j]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def spearman(xs: list[float], ys: list[float]) -> float:
    """Spearman's rank correlation: Pearson's r of the (tie-averaged) ranks; nan when a side is constant."""
    rx, ry = _ranks(xs), _ranks(ys)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    vx, vy = sum((a - mx) ** 2 for a in rx), sum((b - my) ** 2 for b in ry)
    return cov / (vx * vy) ** 0.5 if vx > 0 and vy > 0 else float("nan")


def family_verdict(rows: list[dict]) -> dict:
    """What a family table shows: does validation loss fall with size?

    A supernet's sub-networks form a family when the loss falls as active parameters grow: Spearman's
    rank correlation between active parameters and validation loss near -1, and the largest member
    clearly ahead of the smallest.  ``gap`` is smallest-member loss minus largest-member loss (nats;
    positive when the largest is better); members are ordered by active, then total parameters.
    """
    active = [float(r["active_params"]) for r in rows]
    loss = [float(r["valid_loss"]) for r in rows]
    by_size = sorted(range(len(rows)), key=lambda i: (active[i], float(rows[i]["total_params"])))
    return {"rho": spearman(active, loss), "gap": loss[by_size[0]] - loss[by_size[-1]],
            "largest": rows[by_size[-1]]["subnet"], "smallest": rows[by_size[0]]["subnet"]}


def family_line(rows: list[dict]) -> str:
    """The one sentence the user reads under the table (thresholds: the quickstart's promise)."""
    v = family_verdict(rows)
    holds = v["rho"] <= -0.8 and v["gap"] >= 0.05
    what = ("a real family: loss falls with size" if holds else
            "not yet a family (wanted rho <= -0.8 and a gap >= 0.05 nats): train longer")
    return (f"rank correlation (active params vs valid loss) {v['rho']:+.2f}; largest ahead of smallest by "
            f"{v['gap']:+.4f} nats -> {what}")


def summarize(run_dir: str | Path) -> str:
    run_dir = Path(run_dir)
    lines = [f"run directory: {run_dir.resolve()}"]
    scalars = _scalars(run_dir / "tensorboard") if (run_dir / "tensorboard").is_dir() else {}
    if scalars.get("train/loss"):
        first, last = scalars["train/loss"][0], scalars["train/loss"][-1]
        lines.append(f"train loss: {first[1]:.4f} (iteration {first[0]}) -> {last[1]:.4f} (iteration {last[0]})")
    for step, value in scalars.get("eval/loss", []):
        lines.append(f"validation loss at iteration {step}: {value:.4f}")
    ckpt = latest_pointer(run_dir / "checkpoints")
    if ckpt is not None:
        meta = read_meta_dict(ckpt)  # a CheckpointError naming the file when missing or damaged
        lines.append(f"latest checkpoint: {ckpt} (iteration {meta['iteration']}, "
                     f"{meta['consumed_tokens']:,} tokens, layout {meta['layout']})")
    family = run_dir / "elastic" / "family.csv"
    if family.is_file():
        with open(family) as f:
            rows = list(csv.DictReader(f))
        lines += ["", "sub-network family (from the supernet):", *_family_table(rows), family_line(rows)]
        plot = family.with_name("pareto.png")
        if plot.is_file():
            lines.append(f"Pareto plot: {plot.resolve()}")
    lines.append(f"TensorBoard: tensorboard --logdir {(run_dir / 'tensorboard').resolve()} --port 6006")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="ernie summary", description=__doc__)
    p.add_argument("--run-dir", required=True)
    args = p.parse_args(argv)
    if not Path(args.run_dir).is_dir():
        print(f"ernie summary: --run-dir {args.run_dir!r} does not exist; pass a run's run.dir")
        return 2
    print(summarize(args.run_dir))
    return 0
