"""The pipeline's summary: a domain x stage matrix of held-out mean reward (with standard errors).

Input: {stage: {task: (mean, stderr)}}, stages in pipeline order (e.g. sft,
expert:arith, expert:code, opd, general), each row from `ernie eval-tasks`
(evaluate.scores). Output: a text table (stages as rows, domains as columns,
"mean ± se", "-" where a stage was not scored on a domain), a PNG heat map
of the same numbers, and TensorBoard scalars `scoreboard/<task>` whose step
is the stage's position, so the run's TensorBoard shows the matrix too.

The claims the pipeline must show are read off this matrix: each expert's
row beats the SFT row in its own column, and the OPD row recovers the
experts' gains in every column at once.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping

Board = Mapping[str, Mapping[str, tuple[float, float]]]


def _tasks(board: Board) -> list[str]:
    """Every task of any stage, in order of first appearance."""
    seen: dict[str, None] = {}
    for row in board.values():
        seen.update(dict.fromkeys(row))
    return list(seen)


def _check(board: Board) -> None:
    if not board or not _tasks(board):
        raise ValueError("the scoreboard needs at least one stage with one scored task")
    for stage, row in board.items():
        for task, pair in row.items():
            mean, stderr = pair
            if not (math.isfinite(mean) and math.isfinite(stderr) and stderr >= 0):
                raise ValueError(f"scoreboard[{stage!r}][{task!r}] = {pair!r}: give (mean, stderr), finite, stderr >= 0")


def _cell(row: Mapping[str, tuple[float, float]], task: str) -> str:
    return f"{row[task][0]:.3f} ± {row[task][1]:.3f}" if task in row else "-"


def format_scoreboard(board: Board) -> str:
    """Stages as rows, tasks as columns, "mean ± stderr" cells."""
    _check(board)
    tasks = _tasks(board)
    width = max(15, *(len(t) + 2 for t in tasks))
    first = max(5, *(len(s) for s in board))
    lines = [f"{'stage':<{first}}" + "".join(f"{t:>{width}}" for t in tasks)]
    for stage, row in board.items():
        lines.append(f"{stage:<{first}}" + "".join(f"{_cell(row, t):>{width}}" for t in tasks))
    return "\n".join(lines)


def save_scoreboard_png(board: Board, path, title: str = "held-out mean reward") -> Path:
    """A heat map of the means (0..1), each cell annotated with "mean\\n± stderr"; returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    _check(board)
    tasks, stages = _tasks(board), list(board)
    values = np.array([[board[s][t][0] if t in board[s] else np.nan for t in tasks] for s in stages])
    fig, ax = plt.subplots(figsize=(1.6 + 1.5 * len(tasks), 1.2 + 0.6 * len(stages)))
    image = ax.imshow(np.ma.masked_invalid(values), vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(tasks)), tasks)
    ax.set_yticks(range(len(stages)), stages)
    for i, stage in enumerate(stages):
        for j, task in enumerate(tasks):
            text = _cell(board[stage], task).replace(" ± ", "\n± ")
            colour = "black" if not np.isnan(values[i, j]) and values[i, j] > 0.6 else "white"
            ax.text(j, i, text, ha="center", va="center", fontsize=8, color=colour if text != "-" else "gray")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, fraction=0.05)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def log_scoreboard(board: Board, writer) -> None:
    """`scoreboard/<task>` (and `.../stderr`) at step = stage index, through an observe.tensorboard writer."""
    _check(board)
    for step, (stage, row) in enumerate(board.items()):
        for task, (mean, stderr) in row.items():
            writer.scalar(f"scoreboard/{task}", mean, step)
            writer.scalar(f"scoreboard/{task}/stderr", stderr, step)


def write_scoreboard(board: Board, out_dir, tensorboard: bool = True) -> dict[str, Path]:
    """scoreboard.txt, scoreboard.png (and TensorBoard events under out_dir/tensorboard); prints the table."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    table = format_scoreboard(board)
    print(table)
    (out_dir / "scoreboard.txt").write_text(table + "\n")
    paths = {"table": out_dir / "scoreboard.txt", "png": save_scoreboard_png(board, out_dir / "scoreboard.png")}
    if tensorboard:
        from megatron_ernie.observe.tensorboard import ScalarWriter

        writer = ScalarWriter(out_dir / "tensorboard")
        log_scoreboard(board, writer)
        writer.close()
        paths["tensorboard"] = out_dir / "tensorboard"
    return paths
