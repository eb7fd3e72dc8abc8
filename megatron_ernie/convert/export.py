"""megatron_ernie checkpoint (any TP/PP/EP/DP layout) -> Hugging Face ERNIE 4.5 directory.

Runs in one process with no process group: tensors are read by global key
from the ``torch_dist`` files (see ``dcp_io``), converted one at a time and
streamed into safetensors, so memory stays near the largest single tensor
(one expert's projection, a fused qkv, the embedding) whatever the model
size.  Output: ``config.json``, ``generation_config.json``,
``model.safetensors`` (or shards + index), ``tokenizer.json`` with a
``tokenizer_config.json`` that ``AutoTokenizer`` loads as
``PreTrainedTokenizerFast``, and ``megatron_ernie_training.toml`` (the data and
training settings, so that an import evaluates like this checkpoint:
``training_settings.py``).  Written to a hidden directory and renamed at
the end, so a failed export leaves nothing that looks complete.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch

from megatron_ernie.config.errors import ConfigError
from megatron_ernie.convert import ernie45 as hf
from megatron_ernie.convert import model_keys as K
from megatron_ernie.convert.dcp_io import DcpReader
from megatron_ernie.convert.errors import ConvertError
from megatron_ernie.convert.safetensors_io import Entry, write_model
from megatron_ernie.convert.source import Checkpoint, open_checkpoint
from megatron_ernie.convert.staging import check_new_output, staged_dir, write_text_synced
from megatron_ernie.convert.training_settings import write_settings

EOD_TOKEN, PAD_TOKEN = "<|endoftext|>", "<|pad|>"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
CAST = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEFAULT_SHARD_BYTES = 5 * 10**9  # Hugging Face's default max_shard_size ("5GB")


class _Source:
    """Reads our tensors by canonical key; remembers the last whole tensor (qkv feeds q, k and v)."""

    def __init__(self, reader: DcpReader, keys: dict[str, str], cast: torch.dtype | None):
        self.reader, self.keys, self.cast = reader, keys, cast
        self._last = (None, None)

    def read(self, key: str, offsets=None, sizes=None) -> torch.Tensor:
        return self._cast(self.reader.read(self.keys[key], offsets, sizes))

    def whole(self, key: str) -> torch.Tensor:
        if self._last[0] != key:
            self._last = (None, None)
            self._last = (key, self.read(key))
        return self._last[1]

    def dtype(self, key: str) -> torch.dtype:
        return self.cast or self.reader.tensors()[self.keys[key]].dtype

    def _cast(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.cast) if self.cast is not None else t


def _attention(src: _Source, d: K.Dims, i: int) -> list[Entry]:
    qkv, hd = K.layer_key(i, "self_attention.linear_qkv.weight"), d.head_dim

    def part(j: int, rope: bool):
        def produce():
            t = hf.split_qkv(src.whole(qkv), d.heads, d.groups, hd)[j]
            return (hf.halves_to_interleaved(t, hd) if rope else t).contiguous()
        return produce

    dt = src.dtype(qkv)
    return [Entry(hf.hf_layer(i, "self_attn.q_proj.weight"), (d.heads * hd, d.hidden), dt, part(0, True)),
            Entry(hf.hf_layer(i, "self_attn.k_proj.weight"), (d.groups * hd, d.hidden), dt, part(1, True)),
            Entry(hf.hf_layer(i, "self_attn.v_proj.weight"), (d.groups * hd, d.hidden), dt, part(2, False))]


def _region(src: _Source, name: str, key: str, offsets, sizes, squeeze: bool = False) -> Entry:
    shape = tuple(sizes[1:]) if squeeze else tuple(sizes)
    return Entry(name, shape, src.dtype(key), lambda: src.read(key, offsets, sizes).reshape(shape))


def _whole(src: _Source, name: str, key: str, shape) -> Entry:
    return Entry(name, tuple(shape), src.dtype(key), lambda: src.read(key))


def _swiglu(src: _Source, prefix: str, fc1: str, fc2: str, width: int, hidden: int) -> list[Entry]:
    """megatron fc1 = [gate; up] rows, fc2 = down."""
    return [_region(src, f"{prefix}.gate_proj.weight", fc1, (0, 0), (width, hidden)),
            _region(src, f"{prefix}.up_proj.weight", fc1, (width, 0), (width, hidden)),
            _whole(src, f"{prefix}.down_proj.weight", fc2, (hidden, width))]


def _experts(src: _Source, d: K.Dims, i: int) -> list[Entry]:
    fc1 = K.layer_key(i, "mlp.experts.experts.linear_fc1.weight")
    fc2 = K.layer_key(i, "mlp.experts.experts.linear_fc2.weight")
    f, h, out = d.expert_ffn, d.hidden, []
    for e in range(d.experts):
        out += [_region(src, hf.expert_name(i, e, "gate_proj"), fc1, (e, 0, 0), (1, f, h), squeeze=True),
                _region(src, hf.expert_name(i, e, "up_proj"), fc1, (e, f, 0), (1, f, h), squeeze=True),
                _region(src, hf.expert_name(i, e, "down_proj"), fc2, (e, 0, 0), (1, h, f), squeeze=True)]
    return out


def _mlp(src: _Source, d: K.Dims, i: int) -> list[Entry]:
    lk = lambda name: K.layer_key(i, name)  # noqa: E731
    if not d.is_moe(i):
        return _swiglu(src, hf.hf_layer(i, "mlp"), lk("mlp.linear_fc1.weight"), lk("mlp.linear_fc2.weight"),
                       d.ffn, d.hidden)
    out = [_whole(src, hf.hf_layer(i, "mlp.gate.weight"), lk("mlp.router.weight"), (d.experts, d.hidden)),
           Entry(hf.score_bias_name(i), (1, d.experts), torch.float32, lambda: torch.zeros(1, d.experts))]
    out += _experts(src, d, i)
    if d.shared_ffn:
        out += _swiglu(src, hf.hf_layer(i, "mlp.shared_experts"), lk("mlp.shared_experts.linear_fc1.weight"),
                       lk("mlp.shared_experts.linear_fc2.weight"), d.shared_ffn, d.hidden)
    return out


def plan_entries(src: _Source, d: K.Dims) -> list[Entry]:
    """Every Hugging Face tensor, in model order, with the function that produces it."""
    out = [_whole(src, "model.embed_tokens.weight", K.EMBED, (d.vocab, d.hidden))]
    for i in range(d.layers):
        out.append(_whole(src, hf.hf_layer(i, "input_layernorm.weight"), K.layer_key(i, K.ATTN_NORM), (d.hidden,)))
        out += _attention(src, d, i)
        out.append(_whole(src, hf.hf_layer(i, "self_attn.o_proj.weight"),
                          K.layer_key(i, "self_attention.linear_proj.weight"), (d.hidden, d.heads * d.head_dim)))
        out.append(_whole(src, hf.hf_layer(i, "post_attention_layernorm.weight"), K.layer_key(i, K.MLP_NORM),
                          (d.hidden,)))
        out += _mlp(src, d, i)
    out.append(_whole(src, "model.norm.weight", K.FINAL_NORM, (d.hidden,)))
    if not d.tied:
        out.append(_whole(src, "lm_head.weight", K.OUTPUT, (d.vocab, d.hidden)))
    return out


def special_tokens(tokenizer_json: Path) -> dict:
    """bos/eos/pad ids of our tokenizer.json (end-of-document doubles as bos and eos); {} if foreign."""
    added = {t["content"]: t["id"] for t in json.loads(tokenizer_json.read_text()).get("added_tokens", [])}
    if EOD_TOKEN not in added:
        return {}
    eod = added[EOD_TOKEN]
    return {"bos_token_id": eod, "eos_token_id": eod, "pad_token_id": added.get(PAD_TOKEN, eod)}


def _write_tokenizer(ck: Checkpoint, out: Path) -> tuple[dict, list[str]]:
    """Copy the tokenizer files; returns the special token ids and the files written.

    Our tokenizer gets a tokenizer_config.json that makes ``AutoTokenizer`` load it as
    ``PreTrainedTokenizerFast``; an imported model's own tokenizer files (and its special
    token ids, kept in meta.json at import) are passed through unchanged.
    """
    files = [name for name in TOKENIZER_FILES if (ck.path / name).is_file()]
    for name in files:
        shutil.copyfile(ck.path / name, out / name)
    special = special_tokens(out / "tokenizer.json") if "tokenizer.json" in files else {}
    if special and "tokenizer_config.json" not in files:
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOD_TOKEN, "bos_token": EOD_TOKEN,
                  "pad_token": PAD_TOKEN, "model_max_length": ck.config.model.seq_length,
                  "clean_up_tokenization_spaces": False, "add_prefix_space": False}
        write_text_synced(out / "tokenizer_config.json", json.dumps(config, indent=2) + "\n")
        files.append("tokenizer_config.json")
    return special or ck.meta.get("extra", {}).get("source", {}).get("special_tokens", {}), files


def _open_model(ck: Checkpoint):
    hf.check_supported(ck.config)
    reader = DcpReader(ck.path)
    stored = {k: t.shape for k, t in reader.tensors().items()}
    if K.EMBED not in stored:
        raise ConvertError(f"{ck.path} holds no {K.EMBED}; it is not a megatron_ernie model checkpoint")
    d = K.Dims.from_config(ck.config, stored[K.EMBED][0])
    return reader, d, K.resolve_keys(stored, d)


def export_hf(checkpoint, out, dtype: str | None = None, max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> dict:
    """Write the Hugging Face directory ``out``; returns a small report (files, tensors, bytes, seconds)."""
    start = time.perf_counter()
    if dtype is not None and dtype not in CAST:
        raise ConfigError("--dtype", dtype, f"use one of {sorted(CAST)} (default: the checkpoint's own)")
    check_new_output(out, "out")
    ck = open_checkpoint(checkpoint)
    reader, d, keys = _open_model(ck)
    entries = plan_entries(_Source(reader, keys, CAST.get(dtype)), d)
    with staged_dir(out, "out") as tmp:
        special, tokenizer_files = _write_tokenizer(ck, tmp)
        config = hf.hf_config(ck.config, d.vocab, special, hf.TORCH_DTYPES[dtype or ck.config.model.dtype])
        write_text_synced(tmp / "config.json", json.dumps(config, indent=2) + "\n")
        write_text_synced(tmp / "generation_config.json", json.dumps({**special, "do_sample": False}, indent=2) + "\n")
        files = write_model(tmp, entries, max_shard_bytes)
        settings = write_settings(ck.config, tmp)
    report = {"out": str(out), "architecture": config["architectures"][0], "files": files, "tensors": len(entries),
              "bytes": sum(e.nbytes for e in entries), "seconds": round(time.perf_counter() - start, 3),
              "tokenizer": tokenizer_files, "training_settings": settings, "iteration": ck.meta.get("iteration")}
    if _is_supernet(ck.config):
        report["note"] = ("elastic supernet: exported its full network (the largest sub-network); "
                          "to export another, run `ernie extract` first and export its checkpoint")
    return report


def _is_supernet(cfg) -> bool:
    """An elastic supernet's tensors are a plain model's; at full size every mask is open."""
    elastic = getattr(cfg, "elastic", None)
    return bool(elastic is not None and elastic.enabled)

