"""Stream tensors into (sharded) safetensors files, and read them back lazily.

The safetensors format is an 8-byte little-endian header length, a JSON
header (name -> dtype, shape, [begin, end) byte offsets into the data) and
the raw tensor bytes, back to back.  Because the header only needs shapes
and dtypes, we write it first and then each tensor as it is produced: the
writer holds one tensor at a time, not the model (``safetensors.save_file``
needs them all in memory at once).  Large models are split into
``model-0000i-of-0000n.safetensors`` with a ``model.safetensors.index.json``
mapping each name to its file, the Hugging Face convention.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from math import prod
from pathlib import Path
from typing import Callable

import torch

from megatron_ernie.convert.errors import ConvertError

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64",
          torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8", torch.bool: "BOOL"}


@dataclass(frozen=True)
class Entry:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    produce: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        return prod(self.shape) * self.dtype.itemsize


def _group(entries: list[Entry], max_shard_bytes: int) -> list[list[Entry]]:
    """Consecutive entries into files of at most ``max_shard_bytes`` (a bigger tensor gets its own)."""
    groups, size = [[]], 0
    for entry in entries:
        if groups[-1] and size + entry.nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(entry)
        size += entry.nbytes
    return groups


def _header(entries: list[Entry]) -> bytes:
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for e in entries:
        header[e.name] = {"dtype": DTYPES[e.dtype], "shape": list(e.shape), "data_offsets": [offset, offset + e.nbytes]}
        offset += e.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    return raw + b" " * (-len(raw) % 8)  # 8-byte aligned data, as safetensors itself writes


def _write_file(path: Path, entries: list[Entry]) -> None:
    header = _header(entries)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)))
        f.write(header)
        for e in entries:
            tensor = e.produce()
            if tuple(tensor.shape) != e.shape or tensor.dtype != e.dtype:
                raise ConvertError(f"internal: {e.name} came out {tuple(tensor.shape)} {tensor.dtype}, "
                                   f"planned {e.shape} {e.dtype}")
            f.write(tensor.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
            del tensor
        f.flush()
        os.fsync(f.fileno())


def write_model(out_dir: Path, entries: list[Entry], max_shard_bytes: int) -> list[str]:
    """Write ``entries`` in order; returns the file names (plus the index if sharded)."""
    names = [e.name for e in entries]
    if len(set(names)) != len(names):
        raise ConvertError("internal: duplicate tensor names in the export plan")
    groups = _group(entries, max_shard_bytes)
    if len(groups) == 1:
        _write_file(out_dir / SINGLE, groups[0])
        return [SINGLE]
    files = [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    for file, group in zip(files, groups):
        _write_file(out_dir / file, group)
    index = {"metadata": {"total_size": sum(e.nbytes for e in entries)},
             "weight_map": {e.name: file for file, group in zip(files, groups) for e in group}}
    (out_dir / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return files + [INDEX]


class SafetensorsModel:
    """Lazy, by-name access to the tensors of a Hugging Face model directory.

    Each read opens the file, copies the tensor out of the memory map and closes it
    again, so mapped pages of tensors already converted do not pile up in the
    process's resident memory (they would otherwise reach the model size).
    """

    def __init__(self, model_dir):
        self.dir = Path(model_dir)
        self.where = self._weight_map()
        self.shapes = {}
        for file in sorted(set(self.where.values())):
            with self._open(file) as f:
                self.shapes.update({name: tuple(f.get_slice(name).get_shape()) for name in f.keys()
                                    if self.where.get(name) == file})

    def _open(self, file: str):
        from safetensors import safe_open

        path = self.dir / file
        if not path.is_file():
            raise ConvertError(f"{path} is missing (named in {INDEX}); download the complete model")
        try:
            return safe_open(str(path), framework="pt")
        except Exception as err:  # SafetensorError: truncated or not a safetensors file
            raise ConvertError(f"{path} is not a complete safetensors file ({err}); download it again") from None

    def _weight_map(self) -> dict[str, str]:
        index = self.dir / INDEX
        if index.is_file():
            return json.loads(index.read_text())["weight_map"]
        if (self.dir / SINGLE).is_file():
            with self._open(SINGLE) as f:
                return {name: SINGLE for name in f.keys()}
        raise ConvertError(f"{self.dir} has neither {SINGLE} nor {INDEX}; pass a Hugging Face model directory")

    def get(self, name: str) -> torch.Tensor:
        with self._open(self.where[name]) as f:
            return f.get_tensor(name).clone()

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        with self._open(self.where[name]) as f:
            return f.get_slice(name)[start:stop].clone()
