"""Offline resharding: re-target a checkpoint at another TP/PP/EP/DP layout, verified.

What resharding means here.  megatron-core stores every tensor under its
global key with the full shape, and optimizer state keyed by parameter
(``fully_reshardable``), so the *values* in a checkpoint do not depend on the
layout and any layout can load any checkpoint.  What does depend on the
layout is (a) whether the model fits it at all (heads, query groups, FFN,
layers, experts divisible; the padded vocabulary, lcm(128, TP) rows, must not
change), (b) the per-rank RNG streams and (c) the files: one or more data
files per writing rank, chunked as that layout sharded them.

``reshard`` therefore, in one process and without launching either layout:

1. checks the target layout against the model and the training config
   (the same rules ``ernie pretrain`` applies at start-up), failing in a second
   instead of at the start of a large job;
2. checks that the stored tensors are complete and match the config;
3. rewrites model (and optimizer, unless ``drop_optimizer``) tensors into a
   canonical layout: a few large files, each tensor in row chunks of bounded
   size, whatever the old rank count was (this also turns a checkpoint written
   by thousands of ranks into one that opens fast);  when EP moves between 1
   and >1 it regroups the optimizer's hyper-parameters for megatron-core's
   dense/expert optimizer split (``optimizer_chains``), which a direct load
   cannot do;
4. re-reads every tensor of the output and compares it bit for bit with the
   source (``verify``);
5. records the target layout and config in ``meta.json``/``config.toml``;
   RNG state is kept only if the layout is unchanged (megatron's RNG streams
   belong to rank positions, so at a new layout the run reseeds, as a direct
   load would).

Loading the result at the target layout then gives exactly the eval loss of
loading the source there, and training resumes from the same iteration, data
position and optimizer state.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import torch

from megatron_ernie import config as C
from megatron_ernie.config import loader
from megatron_ernie.config.errors import ConfigError
from megatron_ernie.convert import model_keys as K
from megatron_ernie.convert import optimizer_chains as chains
from megatron_ernie.convert.dcp_io import COMMON, DcpReader, TensorSpec, row_chunks, write_dcp
from megatron_ernie.convert.errors import ConvertError
from megatron_ernie.checkpoint.verify import write_manifest
from megatron_ernie.convert.source import META, open_checkpoint
from megatron_ernie.convert.staging import check_new_output, staged_dir, write_text_synced

FILE_BYTES = 2 << 30  # aim for data files of about this size (one writer thread each, at most 16)


def target_config(cfg: C.ErnieConfig, overrides) -> C.ErnieConfig:
    """The checkpoint's config with new ``parallel.*`` values; other sections are refused."""
    for text in overrides:
        keys, _ = loader.parse_override(text)
        if keys[0] != "parallel":
            raise ConfigError(".".join(keys), text, "reshard changes only the layout (parallel.*); the model and "
                                                    "training settings come from the checkpoint")
    return loader.build(C.ErnieConfig, loader.apply_overrides(loader.to_dict(cfg), overrides))


def minimal_world(par) -> int:
    """The smallest world size the layout fits (dense and expert views both divide it)."""
    return math.lcm(par.tensor * par.pipeline * par.context, par.expert_tensor_size * par.expert * par.pipeline)


def layout_of(par, world: int) -> dict:
    return {"world": world, "tp": par.tensor, "pp": par.pipeline, "vpp": par.virtual_pipeline,
            "ep": par.expert, "etp": par.expert_tensor_size}


def _check_vocab(rows: int, tp: int) -> None:
    step = math.lcm(128, tp)
    if rows % step:
        raise ConfigError("parallel.tensor", tp, f"the checkpoint's vocabulary has {rows} rows, which TP={tp} "
                                                 f"would pad to a multiple of {step} and so change the model; "
                                                 f"use a power-of-two tensor size")


def _key_map(keys, keep_optimizer: bool) -> dict[str, str]:
    """target key -> source key: model keys as they are, optimizer keys without a chain index."""
    out = {}
    for key in keys:
        if K.is_model_key(key):
            out[key] = key
        elif keep_optimizer:
            out[chains.rename(key)] = key
    return out


def _bits(t: torch.Tensor) -> torch.Tensor:
    """Raw bytes, so that NaNs compare equal to themselves."""
    return t.contiguous().reshape(-1).view(torch.uint8)


def _verify(source: DcpReader, copy: DcpReader, tensor_keys: dict, object_keys: dict, max_bytes: int) -> None:
    """Every tensor and object of ``copy`` equals its source, bit for bit (read back from disk)."""
    stored = source.tensors()
    for new, old in tensor_keys.items():
        for c in row_chunks(stored[old].shape, stored[old].dtype, max_bytes):
            if not torch.equal(_bits(source.read(old, c.offsets, c.sizes)), _bits(copy.read(new, c.offsets, c.sizes))):
                raise ConvertError(f"verification failed: {new} at {tuple(c.offsets)} differs after writing")
    for new, old in object_keys.items():
        if copy.read_bytes(new) != source.read_bytes(old):
            raise ConvertError(f"verification failed: object {new} differs after writing")


def _common(path: Path, drop_optimizer: bool, to_chained: bool) -> dict:
    common = torch.load(path / COMMON, weights_only=False) if (path / COMMON).is_file() else {}
    if drop_optimizer:
        return {k: v for k, v in common.items() if k != "optimizer"}
    return chains.convert_common(common, to_chained)


def _region_reader(reader: DcpReader, key: str):
    return lambda offsets, sizes: reader.read(key, offsets, sizes)


def _check_model(reader: DcpReader, cfg, tp: int) -> dict:
    """The stored tensors, after checking the model ones against the config and the target TP."""
    tensors = reader.tensors()
    if K.EMBED not in tensors:
        raise ConvertError(f"{reader.path} holds no {K.EMBED}; it is not a megatron_ernie model checkpoint")
    d = K.Dims.from_config(cfg, tensors[K.EMBED].shape[0])
    K.resolve_keys({k: t.shape for k, t in tensors.items()}, d)
    _check_vocab(d.vocab, tp)
    return tensors


def _write_files(tmp: Path, ck, target, layout: dict, drop_optimizer: bool) -> None:
    extra = dict(ck.meta.get("extra", {}), config=loader.to_dict(target), resharded_from=ck.meta.get("layout"))
    if drop_optimizer:
        extra["weights_only"] = True
    meta = {**ck.meta, "layout": layout, "extra": extra}
    write_text_synced(tmp / "config.toml", C.dumps(target))
    if (ck.path / "tokenizer.json").is_file():
        shutil.copyfile(ck.path / "tokenizer.json", tmp / "tokenizer.json")
    if layout == ck.meta.get("layout") and (ck.path / "rng").is_dir():
        shutil.copytree(ck.path / "rng", tmp / "rng")
    write_text_synced(tmp / META, json.dumps(meta, indent=2, sort_keys=True))
    write_manifest(tmp)  # checksums of the new files, verified when it is loaded or converted


def reshard(src, out, overrides=(), world: int | None = None, drop_optimizer: bool = False,
            verify: bool = True, max_chunk_bytes: int = 512 << 20) -> dict:
    """Write ``out``: ``src`` re-targeted at the layout ``overrides`` describe; returns a report."""
    start = time.perf_counter()
    if world is not None and world < 1:
        raise ConfigError("--world", world, "give the target number of processes (>= 1), or leave it out")
    check_new_output(out, "out")
    ck = open_checkpoint(src)
    target = target_config(ck.config, overrides)
    world = world or minimal_world(target.parallel)
    C.validate(target, world)
    reader = DcpReader(ck.path)
    tensors = _check_model(reader, ck.config, target.parallel.tensor)
    to_chained = chains.chained_for(target.parallel.expert, ck.config.moe.num_experts)
    keys = _key_map(tensors, not drop_optimizer)
    objects = _key_map(reader.byte_keys(), not drop_optimizer)
    specs = [TensorSpec(new, tensors[old].shape, tensors[old].dtype, _region_reader(reader, old))
             for new, old in keys.items()]
    total = sum(tensors[old].nbytes for old in keys.values())
    with staged_dir(out, "out") as tmp:
        write_dcp(tmp, specs, {new: reader.read_bytes(old) for new, old in objects.items()},
                  _common(ck.path, drop_optimizer, to_chained), max_chunk_bytes,
                  files=max(1, min(16, total // FILE_BYTES)))
        if verify:
            _verify(reader, DcpReader(tmp), keys, objects, max_chunk_bytes)
        _write_files(tmp, ck, target, layout_of(target.parallel, world), drop_optimizer)
    return {"out": str(out), "from_layout": ck.meta.get("layout"), "to_layout": layout_of(target.parallel, world),
            "tensors": len(keys), "objects": len(objects), "bytes": total,
            "optimizer": any(not K.is_model_key(k) for k in keys),
            "optimizer_groups": "dense+expert" if to_chained else "one", "verified": verify,
            "seconds": round(time.perf_counter() - start, 3)}
