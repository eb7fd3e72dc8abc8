"""Per-rank RNG state, saved beside the sharded checkpoint.

RNG streams are tied to a rank's place in the layout (megatron's TP/EP
trackers), so they are restored only when the checkpoint is loaded at the
same layout and world size; at a new layout the run reseeds instead.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist


def _rank_world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _file(path: Path, rank: int) -> Path:
    return Path(path) / "rng" / f"rank_{rank:05d}.pt"


def capture() -> dict:
    from megatron.core import tensor_parallel

    return {"cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
            "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}


def restore(state: dict) -> None:
    from megatron.core import tensor_parallel

    torch.set_rng_state(state["cpu"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def save(path: Path) -> None:
    rank, world = _rank_world()
    target = _file(path, rank)
    target.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"world": world, **capture()}, target)


def load(path: Path, saved_layout: dict) -> bool:
    """Restore this rank's RNG if the layout is unchanged; returns whether it did."""
    from megatron_ernie.runtime.groups import current_layout

    rank, world = _rank_world()
    target = _file(path, rank)
    if saved_layout != current_layout() or not target.is_file():
        return False
    state = torch.load(target, weights_only=False)
    if state["world"] != world:
        return False
    restore(state)
    return True
