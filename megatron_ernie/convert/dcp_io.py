"""Read and write megatron-core ``torch_dist`` checkpoints in one process.

A ``torch_dist`` checkpoint is a PyTorch Distributed Checkpoint (DCP)
directory: ``.metadata`` (a pickled index giving, for every *global* key, the
full shape, the dtype, the chunks that were saved and where each chunk's bytes
lie), ``__<rank>_<n>.distcp`` data files (each chunk a ``torch.save``d
tensor), and megatron-core's own ``metadata.json`` (backend name) and
``common.pt`` (state that is not sharded, e.g. optimizer hyper-parameters).

Keys are global: layer numbers count from the first layer of the whole model,
an expert tensor has a leading axis over *all* experts and a TP shard is an
offset into the full tensor.  So any region of any tensor can be read without
launching the layout that wrote it: we ask DCP's resharding helper which saved
chunks overlap the region and let the storage reader copy them in.  Memory is
the region plus the chunks it overlaps, never the model.

Writing goes through the same storage writer with a planner that produces
each chunk only when the writer asks for it (one at a time), so a converted
model also streams.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import threading
from collections import defaultdict
from dataclasses import dataclass
from math import prod
from pathlib import Path
from typing import Callable

import torch
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata, ChunkStorageMetadata, Metadata, MetadataIndex, TensorProperties, TensorStorageMetadata)
from torch.distributed.checkpoint.planner import (
    LoadItemType, LoadPlan, ReadItem, SavePlan, TensorWriteData, WriteItem, WriteItemType)
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from megatron_ernie.convert.errors import ConvertError

MEGATRON_METADATA = {"sharded_backend": "torch_dist", "sharded_backend_version": 1,
                     "common_backend": "torch", "common_backend_version": 1}
COMMON = "common.pt"
INDEX = ".metadata"


@dataclass(frozen=True)
class TensorInfo:
    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    chunks: int

    @property
    def nbytes(self) -> int:
        return prod(self.shape) * self.dtype.itemsize


def _narrow(tensor: torch.Tensor, offsets, lengths) -> torch.Tensor:
    for dim, (start, length) in enumerate(zip(offsets, lengths)):
        tensor = tensor.narrow(dim, start, length)
    return tensor


class _Into:
    """The part of a DCP LoadPlanner the storage reader calls: where chunks land."""

    def __init__(self, target: torch.Tensor | None = None):
        self.target, self.data = target, None

    def resolve_tensor(self, req: ReadItem) -> torch.Tensor:
        return _narrow(self.target, req.dest_offsets, req.lengths)

    def commit_tensor(self, req: ReadItem, tensor: torch.Tensor) -> None:
        pass

    def load_bytes(self, req: ReadItem, value: io.BytesIO) -> None:
        self.data = value.read()


class DcpReader:
    """Random access to the tensors of a DCP checkpoint directory, by global key."""

    def __init__(self, path, checksums: bool = True):
        """``checksums``: also hash every shard against the manifest (a full read; ``ernie inspect``,
        which reads only the index, skips it and checks sizes only)."""
        self.path = Path(path)
        index = self.path / INDEX
        if not index.is_file():
            raise ConvertError(f"{self.path} has no {INDEX} file: it is not a torch_dist checkpoint "
                               f"(or it is still being written); pass a complete iter_* directory")
        self._storage = FileSystemReader(str(self.path))
        try:
            self.metadata: Metadata = self._storage.read_metadata()
        except (OSError, EOFError, pickle.UnpicklingError, AttributeError) as err:
            raise ConvertError(f"{index} is unreadable ({err}); the checkpoint is damaged") from None
        self._storage.set_up_storage_reader(self.metadata, is_coordinator=True)
        check_data_files(self.path, self.metadata)
        if checksums:
            check_checksums(self.path)
        self._tensors = None

    def tensors(self) -> dict[str, TensorInfo]:
        """Every stored tensor's global shape, dtype and chunk count, by key (from the index)."""
        if self._tensors is None:
            self._tensors = {key: TensorInfo(key, tuple(md.size), md.properties.dtype, len(md.chunks))
                             for key, md in self.metadata.state_dict_metadata.items()
                             if isinstance(md, TensorStorageMetadata)}
        return self._tensors

    def byte_keys(self) -> list[str]:
        return [key for key, md in self.metadata.state_dict_metadata.items()
                if isinstance(md, BytesStorageMetadata)]

    def read(self, key: str, offsets=None, sizes=None) -> torch.Tensor:
        """The region ``[offsets, offsets + sizes)`` of tensor ``key`` (all of it by default)."""
        md = self._tensor_md(key)
        offsets = tuple(offsets or (0,) * len(md.size))
        sizes = tuple(sizes or md.size)
        target = torch.empty(sizes, dtype=md.properties.dtype)
        wanted = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(sizes))
        items = create_read_items_for_chunk_list(key, md, [wanted])
        self._run(LoadPlan(items), _Into(target), key)
        return target

    def read_bytes(self, key: str) -> bytes:
        """The raw bytes of a stored object (megatron-core's ``ShardedObject``)."""
        index = MetadataIndex(key)
        item = ReadItem(type=LoadItemType.BYTE_IO, dest_index=index, dest_offsets=torch.Size((0,)),
                        storage_index=index, storage_offsets=torch.Size((0,)), lengths=torch.Size((0,)))
        into = _Into()
        self._run(LoadPlan([item]), into, key)
        return into.data

    def _tensor_md(self, key: str) -> TensorStorageMetadata:
        md = self.metadata.state_dict_metadata.get(key)
        if not isinstance(md, TensorStorageMetadata):
            raise ConvertError(f"{self.path} holds no tensor named {key!r}")
        return md

    def _run(self, plan: LoadPlan, into: _Into, key: str) -> None:
        try:
            self._storage.read_data(plan, into).wait()
        except Exception as err:  # torch.load/unpickling errors of a damaged chunk
            files = sorted({self.metadata.storage_data[i.storage_index].relative_path for i in plan.items})
            raise ConvertError(f"cannot read {key!r} from {', '.join(files)} in {self.path}: {err}. "
                               f"The file is damaged; restore it or use another checkpoint") from None


def check_data_files(path: Path, metadata: Metadata) -> None:
    """Every data file the index points into exists and is long enough (else: which one, why)."""
    needed, keys = defaultdict(int), defaultdict(set)
    for index, info in metadata.storage_data.items():
        needed[info.relative_path] = max(needed[info.relative_path], info.offset + info.length)
        keys[info.relative_path].add(index.fqn)
    for name, size in sorted(needed.items()):
        file = path / name
        example = sorted(keys[name])[0]
        if not file.is_file():
            raise ConvertError(f"{file} is missing; it holds {len(keys[name])} tensors (e.g. {example!r}). "
                               f"Copy the complete checkpoint directory")
        actual = file.stat().st_size
        if actual < size:
            raise ConvertError(f"{file} is truncated: {actual} bytes, the index needs at least {size} "
                               f"(e.g. for {example!r}). Copy the complete checkpoint directory")
    _check_coverage(metadata)


def check_checksums(path: Path) -> None:
    """Every file matches the SHA-256 manifest written at save (checkpoint/verify.py), so a shard whose
    bytes were overwritten is refused here instead of being exported or resharded as weights."""
    from megatron_ernie.checkpoint.verify import verify_checksums

    problems = verify_checksums(path)
    if problems:
        raise ConvertError(f"{path} is damaged: {'; '.join(problems[:3])}. Copy the checkpoint again or "
                           f"convert an earlier one")


def _check_coverage(metadata: Metadata) -> None:
    """The saved chunks of each tensor add up to the whole tensor (no rank's shard is absent)."""
    for key, md in metadata.state_dict_metadata.items():
        if isinstance(md, TensorStorageMetadata):
            covered = sum(prod(c.sizes) for c in md.chunks)
            if covered != prod(md.size):
                raise ConvertError(f"{key!r}: the saved chunks cover {covered} of {prod(md.size)} elements; "
                                   f"the checkpoint was written incompletely")


# --- writing -----------------------------------------------------------------------------------

Producer = Callable[[tuple, tuple], torch.Tensor]  # (offsets, sizes) -> that region


@dataclass(frozen=True)
class TensorSpec:
    """A tensor to write, produced region by region along dim 0 (``chunk_rows`` rows at a time)."""

    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    produce: Producer
    chunk_rows: int = 0  # 0 = as many as max_chunk_bytes allows


def row_chunks(shape: tuple, dtype: torch.dtype, max_bytes: int, rows: int = 0) -> list[ChunkStorageMetadata]:
    """Split a tensor along dim 0 into regions of ``rows`` rows (default: at most ``max_bytes`` each)."""
    if not shape:
        return [ChunkStorageMetadata(offsets=torch.Size(()), sizes=torch.Size(()))]
    total = shape[0]
    step = rows or max(1, min(total, max_bytes // max(1, prod(shape[1:]) * dtype.itemsize)))
    rest = tuple(shape[1:])
    return [ChunkStorageMetadata(offsets=torch.Size((start,) + (0,) * len(rest)),
                                 sizes=torch.Size((min(step, total - start),) + rest))
            for start in range(0, max(total, 1), step)]


class _LazyPlanner:
    """Hands the storage writer each chunk when it asks for it (the part of SavePlanner it calls).

    torch's FileSystemWriter keeps a reference to every tensor it has written until
    the data file is closed (it collects them for its safetensors mode), which would
    make memory grow with the file.  Each chunk we hand out owns its storage, and
    the writer asks for the next one only after writing the previous one, so we free
    the previous chunk's storage then: memory stays at one chunk per writer thread.
    """

    def __init__(self, specs: dict[str, TensorSpec], objects: dict[str, bytes]):
        self.specs, self.objects = specs, objects
        self._handed_out = threading.local()

    def resolve_data(self, item: WriteItem):
        self.release()
        if item.type == WriteItemType.BYTE_IO:
            return io.BytesIO(self.objects[item.index.fqn])
        spec, chunk = self.specs[item.index.fqn], item.tensor_data.chunk
        data = spec.produce(tuple(chunk.offsets), tuple(chunk.sizes))
        if tuple(data.shape) != tuple(chunk.sizes) or data.dtype != spec.dtype:
            raise ConvertError(f"internal: {spec.key} region {tuple(chunk.offsets)} came out as "
                               f"{tuple(data.shape)} {data.dtype}, expected {tuple(chunk.sizes)} {spec.dtype}")
        data = data.contiguous()
        if data.untyped_storage().nbytes() != data.nbytes:
            data = data.clone()  # own exactly its bytes, so releasing it frees them
        self._handed_out.tensor = data
        return data

    def release(self) -> None:
        """Free the storage of the chunk this thread handed out last (already written)."""
        previous = getattr(self._handed_out, "tensor", None)
        if previous is not None:
            previous.untyped_storage().resize_(0)
            self._handed_out.tensor = None


def _plan(specs: list[TensorSpec], objects: dict[str, bytes], max_chunk_bytes: int):
    items, state = [], {}
    for spec in specs:
        props = TensorProperties(dtype=spec.dtype)
        chunks = row_chunks(spec.shape, spec.dtype, max_chunk_bytes, spec.chunk_rows)
        state[spec.key] = TensorStorageMetadata(properties=props, size=torch.Size(spec.shape), chunks=chunks)
        items += [WriteItem(index=MetadataIndex(spec.key, c.offsets), type=WriteItemType.SHARD,
                            tensor_data=TensorWriteData(chunk=c, properties=props, size=torch.Size(spec.shape)))
                  for c in chunks]
    for key in objects:
        state[key] = BytesStorageMetadata()
        items.append(WriteItem(index=MetadataIndex(key), type=WriteItemType.BYTE_IO))
    return SavePlan(items), Metadata(state_dict_metadata=state)


def write_dcp(path: Path, specs: list[TensorSpec], objects: dict[str, bytes], common: dict,
              max_chunk_bytes: int = 512 << 20, files: int = 1) -> None:
    """Write a torch_dist checkpoint that megatron-core's ``dist_checkpointing.load`` reads."""
    writer = FileSystemWriter(str(path), single_file_per_rank=True, sync_files=True,
                              thread_count=max(1, files), overwrite=False)
    writer.set_up_storage_writer(True)
    plan, metadata = _plan(specs, objects, max_chunk_bytes)
    plan = writer.prepare_global_plan([writer.prepare_local_plan(plan)])[0]
    planner = _LazyPlanner({s.key: s for s in specs}, objects)
    results = writer.write_data(plan, planner).wait()
    planner.release()
    writer.finish(metadata, [results])
    torch.save(common, Path(path) / COMMON)
    with open(Path(path) / "metadata.json", "w") as f:
        json.dump(MEGATRON_METADATA, f)
        f.flush()
        os.fsync(f.fileno())


def megatron_object(data=None) -> bytes:
    """The bytes megatron-core stores for a ShardedObject (``torch.save([data])``)."""
    buffer = io.BytesIO()
    torch.save([data], buffer)
    return buffer.getvalue()
