"""A cached, ready-to-train corpus: tokenizer plus indexed dataset, built once per content.

``prepare_corpus`` names the cache entry after the source, the vocabulary
size and a SHA-256 fingerprint of the source files, so new content or another
vocabulary gets a new entry and a stale one is never reused.

Publishing is atomic: everything is built in a private temporary directory
inside ``cache_dir`` and the finished directory is renamed into place, with
``manifest.json`` written last before the rename. A directory under the final
name is therefore always complete; a crash leaves only a ``.tmp-`` directory
that nobody reads. Concurrent callers (the ranks of a job, parallel tests)
serialise on an ``fcntl`` lock file so only one of them builds; where the lock
does not work (some network file systems), the loser of the rename race
discards its copy and uses the winner's, which is identical because BPE
training and tokenization are deterministic.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

from megatron_ernie.config.errors import ConfigError
from megatron_ernie.data.corpus import BUILTIN_SOURCES, source_description, source_files
from megatron_ernie.data.preprocess import preprocess
from megatron_ernie.data.tokenizer import check_vocab_size

FORMAT_VERSION = 1  # bump when the preprocessing output changes for the same input
MANIFEST = "manifest.json"
TOKENIZER_FILE = "tokenizer.json"


class CorpusPaths(NamedTuple):
    """The two things training needs: the tokenizer file and the data prefix."""

    tokenizer_path: str
    prefix: str


def prepare_default_corpus(cache_dir: str, vocab_size: int = 4096, source: str = "kjv") -> CorpusPaths:
    """The built-in corpus (``"kjv"`` or ``"stdlib"``), tokenized and cached under ``cache_dir``."""
    if source not in BUILTIN_SOURCES:
        raise ConfigError("source", source, f"built-in corpora are {BUILTIN_SOURCES}; use prepare_corpus for files")
    return prepare_corpus(cache_dir, source, vocab_size)


def prepare_corpus(cache_dir: str, source: str, vocab_size: int = 4096, json_key: str = "text") -> CorpusPaths:
    """A built-in name or a .txt/.jsonl path, tokenized and cached under ``cache_dir`` (idempotent)."""
    check_vocab_size(vocab_size)
    entry = Path(cache_dir) / _entry_name(source, vocab_size, json_key)
    paths = CorpusPaths(str(entry / TOKENIZER_FILE), str(entry / _stem(source)))
    if (entry / MANIFEST).is_file():
        return paths
    entry.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(f"{entry}.lock"):
        if not (entry / MANIFEST).is_file():
            _build_and_publish(entry, source, vocab_size, json_key)
    return paths


def read_manifest(prefix_or_entry: str) -> dict:
    """The manifest of a prepared corpus (source, counts, build time), given its prefix or directory."""
    path = Path(prefix_or_entry)
    entry = path if path.is_dir() else path.parent
    return json.loads((entry / MANIFEST).read_text())


def _build_and_publish(entry: Path, source: str, vocab_size: int, json_key: str) -> None:
    temporary = Path(tempfile.mkdtemp(prefix=f".{entry.name}.tmp-", dir=entry.parent))
    try:
        started = time.perf_counter()
        result = preprocess(
            source, str(temporary / _stem(source)), None, vocab_size, json_key, str(temporary / TOKENIZER_FILE)
        )
        manifest = {
            "format_version": FORMAT_VERSION,
            "source": source_description(source),
            "vocab_size_requested": vocab_size,
            "documents": result.documents,
            "tokens": result.tokens,
            "build_seconds": round(time.perf_counter() - started, 3),
        }
        (temporary / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        _publish(temporary, entry)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


def _publish(temporary: Path, entry: Path) -> None:
    """Rename into place; losing a race to an identical build is fine."""
    try:
        os.rename(temporary, entry)
    except OSError:
        if not (entry / MANIFEST).is_file():
            raise RuntimeError(f"{entry} exists but has no {MANIFEST}; remove that directory and retry") from None


@contextmanager
def _exclusive_lock(path: str):
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _entry_name(source: str, vocab_size: int, json_key: str) -> str:
    digest = hashlib.sha256(f"v{FORMAT_VERSION}|{vocab_size}|{json_key}|".encode())
    for path in source_files(source):
        digest.update(path.name.encode() + b"\0")
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return f"{_stem(source)}-v{vocab_size}-{digest.hexdigest()[:16]}"


def _stem(source: str) -> str:
    """A file-name-safe short name for a source."""
    name = source if source in BUILTIN_SOURCES else Path(source).stem
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name) or "corpus"
