"""Is a checkpoint directory whole, undamaged and the right model?  Checked before loading.

megatron-core's ``dist_checkpointing`` trusts the files it is given: a missing
or truncated shard surfaces as a ``CheckpointException`` naming ranks, a random
``.metadata`` as an unpickling error, and bytes overwritten in place are loaded
as weights (a model that evaluates to nan, exit 0).  This module answers,
with the file and the fix in every message:

* structure: ``meta.json`` parses and has the fields; the DCP index
  (``.metadata``) unpickles; every data file the index points into exists and is
  long enough;
* integrity: ``checksums.json`` -- a manifest of every shard's size and SHA-256
  written at save, inside the ``.tmp`` directory before its atomic rename, so a
  checkpoint and its manifest appear together -- matches the files.  With
  several processes each hashes every n-th file (the files are read once in
  total) and the errors are gathered, so every rank raises the same message;
* fit: the model shape the checkpoint was saved with (``meta.json``'s config)
  equals the one being built, else the message names the field, both values
  and the ``--set`` that fixes it.

Checkpoints written before the manifest existed are still checked for
structure and fit; their integrity cannot be checked.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from megatron_ernie.checkpoint.errors import CheckpointError

META = "meta.json"
MANIFEST = "checksums.json"
INDEX = ".metadata"
META_FIELDS = ("iteration", "consumed_samples", "consumed_tokens", "layout", "extra")
# Fields that decide the shape of some parameter: a checkpoint loads only into the same values.
SHAPE_FIELDS = {"model": ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size",
                          "normalization", "untie_embeddings_and_output_weights"),
                "moe": ("num_experts", "expert_ffn_hidden_size", "shared_expert_ffn_hidden_size",
                        "first_dense_layers", "expert_bias")}


def read_meta_dict(path) -> dict:
    """``meta.json`` of checkpoint ``path`` as a dict with the expected fields, or a CheckpointError."""
    file = Path(path) / META
    if not file.is_file():
        raise CheckpointError(f"{path} is not a complete checkpoint (no {META}); pass a directory like "
                              f"<run>/checkpoints/iter_0000020")
    try:
        meta = json.loads(file.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{file} is damaged (not JSON: {err}); load an earlier checkpoint "
                              f"(point checkpoints/latest at it) or copy this one again") from None
    missing = [k for k in META_FIELDS if not isinstance(meta, dict) or k not in meta]
    if missing:
        raise CheckpointError(f"{file} is damaged (no {', '.join(missing)}); it was not written by "
                              f"megatron_ernie or was cut short; load an earlier checkpoint")
    return meta


def latest_pointer(root) -> Path | None:
    """The directory ``<root>/latest`` names (None without a pointer); a damaged pointer or one naming a
    missing or incomplete directory is a CheckpointError."""
    pointer = Path(root) / "latest"
    if not pointer.is_file():
        return None
    try:
        name = pointer.read_bytes().decode("utf-8").strip()
    except UnicodeDecodeError:
        name = ""
    if not name or "/" in name or name.startswith("."):
        raise CheckpointError(f"{pointer} is damaged (it should hold a name like iter_0000020); write the name "
                              f"of a complete iter_* directory into it, or remove it to start fresh")
    return Path(root) / name


def _file_digest(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _data_files(path: Path) -> list[Path]:
    """The files the manifest covers: what megatron-core and torch write (shards, the index, common
    and RNG state).  The JSON/TOML beside them are readable text that tools and people may edit
    (meta.json is checked for structure instead)."""
    return sorted(p for p in path.rglob("*") if p.is_file() and (p.suffix in (".distcp", ".pt") or p.name == INDEX))


def write_manifest(path) -> Path:
    """Record size and SHA-256 of every file of checkpoint directory ``path`` (call it last, before
    the directory's atomic rename, so the manifest describes exactly what was committed)."""
    path = Path(path)
    files = {str(p.relative_to(path)): {"bytes": p.stat().st_size, "sha256": _file_digest(p)}
             for p in _data_files(path)}
    tmp = path / (MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        json.dump({"algorithm": "sha256", "files": files}, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path / MANIFEST)
    return path / MANIFEST


def read_manifest(path) -> dict | None:
    file = Path(path) / MANIFEST
    if not file.is_file():
        return None
    try:
        return dict(json.loads(file.read_text())["files"])
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{file} is damaged ({err}); the checkpoint's integrity cannot be checked: "
                              f"copy it again or load an earlier one") from None


def file_problem(path: Path, name: str, entry: dict, hash_it: bool = True) -> str | None:
    """What is wrong with one file against its manifest entry (None: nothing)."""
    file = path / name
    if not file.is_file():
        return f"{file} is missing"
    size = file.stat().st_size
    if size != entry.get("bytes"):
        return f"{file} is truncated or changed: {size} bytes, {entry.get('bytes')} when saved"
    if hash_it and _file_digest(file) != entry.get("sha256"):
        return f"{file} fails its checksum (sha256 differs from the one written at save): the bytes were changed"
    return None


def verify_checksums(path, part: int = 0, parts: int = 1) -> list[str]:
    """Problems found in files ``part::parts`` of the manifest (sorted by name); [] when none or no manifest."""
    path = Path(path)
    manifest = read_manifest(path)
    if manifest is None:
        return []
    names = sorted(manifest)[part::parts]
    return [p for p in (file_problem(path, n, manifest[n]) for n in names) if p]


def check_index(path) -> None:
    """The DCP index unpickles and every data file it points into exists and is long enough."""
    path = Path(path)
    index = path / INDEX
    if not index.is_file():
        raise CheckpointError(f"{index} is missing: {path} is not a complete torch_dist checkpoint; load an "
                              f"earlier checkpoint or copy this one again")
    from torch.distributed.checkpoint import FileSystemReader

    try:
        metadata = FileSystemReader(str(path)).read_metadata()
    except Exception as err:  # noqa: BLE001 - unpickling random bytes raises anything
        raise CheckpointError(f"{index} is damaged ({type(err).__name__}: {str(err)[:120]}); load an earlier "
                              f"checkpoint or copy this one again") from None
    needed: dict[str, int] = {}
    for info in getattr(metadata, "storage_data", {}).values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(needed.items()):
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{file} is missing (a shard the index {INDEX} points into); copy the complete "
                                  f"checkpoint directory or load an earlier checkpoint")
        if file.stat().st_size < size:
            raise CheckpointError(f"{file} is truncated: {file.stat().st_size} bytes, the index needs at least "
                                  f"{size}; copy the complete checkpoint directory or load an earlier checkpoint")


def check_structure(path) -> dict:
    """Cheap checks every rank may run before loading: meta.json, the index, shard sizes, manifest sizes.
    Returns the parsed meta.json."""
    meta = read_meta_dict(path)
    check_index(path)
    manifest = read_manifest(path) or {}
    for name in sorted(manifest):
        problem = file_problem(Path(path), name, manifest[name], hash_it=False)
        if problem:
            raise CheckpointError(f"{problem}; copy the complete checkpoint directory or load an earlier one")
    return meta


def check_model_fits(meta: dict, model, moe, path) -> None:
    """The checkpoint's saved model shape equals this config's; else name the field and the fix."""
    saved = meta.get("extra", {}).get("config")
    if not isinstance(saved, dict):
        return  # no config recorded (not ours): megatron-core's own shape check still applies
    from megatron_ernie.config.errors import ConfigError

    for section, current in (("model", model), ("moe", moe)):
        for name in SHAPE_FIELDS[section]:
            then = saved.get(section, {}).get(name, getattr(current, name))
            now = getattr(current, name)
            if then != now:
                raise ConfigError(f"{section}.{name}", now,
                                  f"the checkpoint {path} was saved with {section}.{name} = {then!r}; set "
                                  f"--set {section}.{name}={json.dumps(then)} (its config.toml has the full "
                                  f"model), or start from a checkpoint of this size")
