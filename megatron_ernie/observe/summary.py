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


def _family_table(path: Path) -> list[str]:
    with open(path) as f:
        rows = list(csv.DictReader(f))
    lines = [f"{'sub-network':<34}{'total params':>14}{'active params':>15}{'valid loss':>12}"]
    for r in rows:
        lines.append(f"{r['subnet']:<34}{int(r['total_params']):>14,}{int(r['active_params']):>15,}"
                     f"{float(r['valid_loss']):>12.4f}")
    return lines


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
        lines += ["", "sub-network family (from the supernet):", *_family_table(family)]
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
