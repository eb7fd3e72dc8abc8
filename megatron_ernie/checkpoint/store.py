"""Checkpoints through megatron-core ``dist_checkpointing`` (torch_dist format).

Layout of ``<run>/checkpoints``::

    iter_0000020/          one complete checkpoint (model, optimizer, scheduler,
      meta.json            iteration, tokens, data position, config, tokenizer)
      rng/rank_00000.pt    per-rank RNG state (restored when the layout matches)
    latest                 text file naming the newest complete checkpoint

Atomicity: every rank writes into ``iter_N.tmp`` and only after a barrier does
rank 0 write ``meta.json``, rename the directory and then replace ``latest``
(write-new + ``os.replace``).  A job killed at any moment leaves ``latest``
naming a complete checkpoint, and a half-written ``*.tmp`` is never loaded.
Because shards are addressed by global keys, a checkpoint loads at any
TP/PP/VPP/EP/DP layout (megatron-core reshards on load).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.utils import unwrap_model
from torch.distributed.checkpoint.api import CheckpointException  # a BaseException subclass

from megatron_ernie.checkpoint import rng, verify
from megatron_ernie.checkpoint.errors import CheckpointError

LATEST = "latest"
META = "meta.json"
# meta.extra flag: a weights-only checkpoint (an extracted sub-network) that also carries Adam moments
OPTIMIZER_STATE = "optimizer_state"
# Optimizer state keyed by model parameter, so it reshards like the model.
_OPTIM_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}


_OPTIMIZER_HINT = (
    " If only the parallel layout changed: optimizer state reshards across TP/PP/DP, but megatron-core "
    "keeps separate dense/expert optimizers only when expert parallelism splits the data-parallel group, "
    "so moving between EP=1 and EP>1 cannot regroup it: rewrite the checkpoint for the new layout with "
    "`ernie convert reshard CKPT OUT --set parallel.expert=N`, or resume with --set "
    "checkpoint.load_optimizer=false to keep weights, schedule and data position with fresh Adam moments.")


@dataclass(frozen=True)
class Meta:
    iteration: int
    consumed_samples: int
    consumed_tokens: int
    layout: dict  # the parallel layout it was saved with
    extra: dict  # scheduler state, config, tokenizer file name, ...


def iteration_dir(root: Path, iteration: int) -> Path:
    return Path(root) / f"iter_{iteration:07d}"


def model_state(model_chunks) -> dict:
    if len(model_chunks) == 1:
        return {"model": unwrap_model(model_chunks[0]).sharded_state_dict()}
    return {f"model{i}": unwrap_model(chunk).sharded_state_dict() for i, chunk in enumerate(model_chunks)}


def _uses_distributed_optimizer(optimizer) -> bool:
    return bool(getattr(getattr(optimizer, "config", None), "use_distributed_optimizer", False))


def full_state(model_chunks, optimizer, is_loading: bool) -> dict:
    state = model_state(model_chunks)
    if optimizer is not None:
        # Optimizer tensors are keyed by their parameter, without megatron's chained-optimizer
        # index: that index depends on the layout (dense and expert parameters get separate
        # optimizers only when expert parallelism splits the data-parallel group).
        metadata = {"chained_optim_avoid_prefix": True}
        if _uses_distributed_optimizer(optimizer):
            metadata.update(_OPTIM_METADATA)
        state["optimizer"] = optimizer.sharded_state_dict(state, is_loading=is_loading, metadata=metadata)
    return state


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _write_json_atomic(path: Path, payload: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_latest(root: Path, name: str) -> None:
    tmp = root / (LATEST + ".tmp")
    with open(tmp, "w") as f:
        f.write(name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, root / LATEST)


def _revive_writer_queue() -> None:
    """Drop dist_checkpointing's results-queue manager if its process has died.

    megatron-core writes shards through a multiprocessing Manager started on the
    first save and reused afterwards.  Slurm delivers its pre-timeout USR1 (and
    preemption TERM) to every process of the job step, so that helper dies, and
    the very save the signal asks for would fail with BrokenPipeError.  Forgetting
    the dead manager makes megatron-core start a fresh one.  (Blocking the signals
    in the helper instead would let it outlive a cancelled job.)
    """
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    queue = getattr(filesystem_async, "_results_queue", None)
    if queue is None:
        return
    try:
        queue.qsize()
    except Exception:  # the proxy's process is gone
        filesystem_async._results_queue = None


def save(root, meta: Meta, model_chunks, optimizer, keep_last: int = 0, files: dict | None = None) -> Path:
    """Save a complete checkpoint for ``meta.iteration``; returns its directory."""
    root = Path(root)
    final = iteration_dir(root, meta.iteration)
    tmp = final.with_name(final.name + ".tmp")
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    _revive_writer_queue()
    dist_checkpointing.save(full_state(model_chunks, optimizer, is_loading=False), str(tmp))
    rng.save(tmp)
    _barrier()
    if _rank() == 0:
        for name, source in (files or {}).items():
            shutil.copyfile(source, tmp / name)
        _write_json_atomic(tmp / META, meta.__dict__)
        verify.write_manifest(tmp)  # last: it covers every file, and appears with them at the rename
        old = final.with_name(final.name + ".old")
        if final.exists():  # re-saving an iteration: keep the old copy until the new one is in place
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
        _write_latest(root, final.name)
        prune(root, keep_last)
    _barrier()
    return final


def prune(root: Path, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` complete checkpoints (0 keeps all)."""
    done = sorted(p for p in root.glob("iter_*") if p.is_dir() and not p.name.endswith((".tmp", ".old")))
    for old in done[:-keep_last] if keep_last else []:
        shutil.rmtree(old, ignore_errors=True)


def find_latest(root) -> Path | None:
    """The checkpoint ``latest`` names, or None for a fresh run."""
    root = Path(root)
    pointer = root / LATEST
    path = verify.latest_pointer(root)
    if path is None:
        return None
    old = path.with_name(path.name + ".old")
    if not path.exists() and (old / META).is_file():  # killed while re-saving this iteration
        os.replace(old, path)
    if not (path / META).is_file():
        raise CheckpointError(f"{pointer} names {path.name}, which is incomplete or missing; "
                              f"point it at a complete iter_* directory or remove it to start fresh")
    return path


def read_meta(path) -> Meta:
    meta = verify.read_meta_dict(path)
    return Meta(**{k: meta[k] for k in verify.META_FIELDS})


def verify_before_load(path) -> None:
    """Structure on every rank, then the manifest's checksums with the files split over the ranks
    (each file read once), gathered so that every rank raises the same error naming the shards."""
    verify.check_structure(path)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    problems = verify.verify_checksums(path, rank, world)
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, problems)
        problems = sorted(p for part in gathered for p in part)
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise CheckpointError(f"{path} is damaged: {'; '.join(problems[:3])}{more}. Load an earlier checkpoint "
                              f"(write its name into checkpoints/latest) or copy this one again")


def load(path, model_chunks, optimizer=None, restore_rng: bool = True) -> Meta:
    """Load weights (and optimizer state if given and saved) from ``path`` at the current layout.

    A ``weights_only`` checkpoint (an import or an extracted sub-network) has no
    optimizer state: the optimizer keeps its fresh state; unless it says it carries
    ``OPTIMIZER_STATE`` (``ernie extract --optimizer``: the supernet's sliced moments).
    """
    meta = read_meta(path)
    verify_before_load(path)
    if meta.extra.get("weights_only"):
        optimizer = optimizer if meta.extra.get(OPTIMIZER_STATE) else None
        restore_rng = False
    state = full_state(model_chunks, optimizer, is_loading=True)
    try:
        loaded = dist_checkpointing.load(state, str(path))
    except (Exception, CheckpointException) as err:  # missing/mismatched shards, deep in megatron
        hint = (" The optimizer state does not fit this layout (the distributed optimizer's state "
                "reshards only when expert parallelism keeps the same optimizer split); resume with "
                "--set checkpoint.load_optimizer=false to keep the weights, schedule and data position "
                "and start fresh optimizer moments." if optimizer is not None and "optimizer" in str(err) else "")
        raise CheckpointError(f"cannot load {path}: {str(err)[:500]}.{hint} Check that the model config "
                              f"matches the checkpoint's (see {Path(path) / META})") from err
    for i, chunk in enumerate(model_chunks):
        unwrap_model(chunk).load_state_dict(loaded["model" if len(model_chunks) == 1 else f"model{i}"])
    if optimizer is not None:
        try:
            optimizer.load_state_dict(loaded["optimizer"])
        except (KeyError, ValueError, RuntimeError) as err:  # megatron-core cannot regroup the saved state
            raise CheckpointError(f"cannot load the optimizer state of {path} at this layout "
                                  f"({type(err).__name__}: {str(err)[:200]}).{_OPTIMIZER_HINT}") from err
    if restore_rng:
        rng.load(path, meta.layout)
    return meta
