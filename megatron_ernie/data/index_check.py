"""Check a preprocessed ``<prefix>.bin`` against its ``<prefix>.idx`` before training.

megatron-core memory-maps both files and trusts them: a ``.bin`` cut short by an
interrupted copy fails many iterations later (or reads garbage), and a damaged
``.idx`` fails with an assertion or "buffer is smaller than requested size".
The index format (``megatron.core.datasets.indexed_dataset._IndexReader``) is
a 9-byte magic, version (u64 = 1), dtype code (u8), sequence count (u64),
document count (u64), then int32 sequence lengths, int64 byte pointers and
int64 document indices.  The ``.bin`` must be exactly as long as the last
sequence's pointer plus its length in bytes.  Only the header and the two last
entries are read, so the check costs microseconds on any corpus size.
"""

from __future__ import annotations

import os
import struct

from megatron_ernie.config.errors import ConfigError

MAGIC = b"MMIDIDX\x00\x00"
HEADER = 9 + 8 + 1 + 8 + 8
DTYPE_SIZES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 8, 7: 4, 8: 2}  # megatron's DType codes -> bytes per id
REMAKE = "re-create it with `ernie preprocess` (or copy both files again)"


def _read_header(idx: str, field: str) -> tuple[int, int, int]:
    """(bytes per token, sequence count, document count) from an .idx file."""
    with open(idx, "rb") as f:
        head = f.read(HEADER)
    if len(head) < HEADER or head[:9] != MAGIC:
        raise ConfigError(field, idx, f"not a megatron indexed-dataset index (bad header); {REMAKE}")
    version, code, sequences, documents = struct.unpack("<QBQQ", head[9:])
    if version != 1 or code not in DTYPE_SIZES:
        raise ConfigError(field, idx, f"unknown index version {version} or dtype code {code}; {REMAKE}")
    return DTYPE_SIZES[code], sequences, documents


def _last_sequence_end(idx: str, sequences: int, itemsize: int) -> int:
    """Byte offset in .bin just past the last sequence (0 for an empty dataset)."""
    if sequences == 0:
        return 0
    with open(idx, "rb") as f:
        f.seek(HEADER + 4 * (sequences - 1))
        (length,) = struct.unpack("<i", f.read(4))
        f.seek(HEADER + 4 * sequences + 8 * (sequences - 1))
        (pointer,) = struct.unpack("<q", f.read(8))
    return pointer + length * itemsize


def check_indexed_files(prefix: str, field: str = "data.prefixes") -> None:
    """``<prefix>.idx`` is a complete index and ``<prefix>.bin`` has exactly the bytes it describes."""
    idx, bin_ = f"{prefix}.idx", f"{prefix}.bin"
    for path in (idx, bin_):
        if not os.path.isfile(path):
            raise ConfigError(field, prefix, f"{path} is missing; a prefix needs both .bin and .idx ({REMAKE})")
    itemsize, sequences, documents = _read_header(idx, field)
    needed = HEADER + 4 * sequences + 8 * sequences + 8 * documents
    size = os.path.getsize(idx)
    if size < needed:
        raise ConfigError(field, prefix, f"{idx} is truncated: {size} bytes, its header ({sequences} sequences, "
                                         f"{documents} document entries) needs {needed}; {REMAKE}")
    expected = _last_sequence_end(idx, sequences, itemsize)
    actual = os.path.getsize(bin_)
    if actual != expected:
        what = "truncated" if actual < expected else "longer than its index"
        raise ConfigError(field, prefix, f"{bin_} is {what}: {actual} bytes, but {idx} describes {expected} "
                                         f"bytes ({sequences} sequences of {itemsize}-byte ids); {REMAKE}")
