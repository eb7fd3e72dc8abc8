"""Hugging Face ERNIE 4.5 directory -> a megatron_ernie checkpoint to start training from.

The result is a ``torch_dist`` checkpoint directory holding model weights
only (no optimizer, scheduler or RNG state; ``meta.json`` says
``extra.weights_only = true``), written at the canonical TP1/PP1/EP1 layout.
Because megatron-core loads by global key, it loads at any layout:
``ernie pretrain --set checkpoint.load=<dir>``.  Tensors are produced one at a
time from lazily opened safetensors (one expert, one fused qkv, a slice of the
embedding), so memory stays near the largest tensor.

The model and MoE sections come from ``config.json`` and cannot be
overridden; everything else (data, optimizer, parallel layout...) comes from
``--config``/``--set`` and is stored in the checkpoint's config.  Without
``--config``, a directory that ``ernie convert to-hf`` wrote brings its own
data and training settings (``training_settings.py``), so the import of our
own export evaluates exactly like the checkpoint it came from; the
tokenizer files are copied into the checkpoint, as in every checkpoint of ours.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from megatron_ernie import config as C
from megatron_ernie.config import loader
from megatron_ernie.config.errors import ConfigError
from megatron_ernie.convert import ernie45 as hf
from megatron_ernie.convert import model_keys as K
from megatron_ernie.convert.dcp_io import TensorSpec, megatron_object, write_dcp
from megatron_ernie.convert.errors import ConvertError
from megatron_ernie.convert.export import TOKENIZER_FILES
from megatron_ernie.convert.safetensors_io import SafetensorsModel
from megatron_ernie.checkpoint.verify import write_manifest
from megatron_ernie.convert.source import META
from megatron_ernie.convert.staging import check_new_output, staged_dir, write_text_synced
from megatron_ernie.convert.training_settings import read_settings

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
CANONICAL_LAYOUT = {"world": 1, "tp": 1, "pp": 1, "vpp": 1, "ep": 1, "etp": 1}
# Taken from config.json but free to change for training: they do not shape a tensor.
SETTABLE = {"model.seq_length", "moe.aux_loss_coeff"}


def _hf_shapes(d: K.Dims, hf_vocab: int) -> dict[str, tuple]:
    h, hd = d.hidden, d.head_dim
    shapes = {"model.embed_tokens.weight": (hf_vocab, h), "model.norm.weight": (h,)}
    if not d.tied:
        shapes["lm_head.weight"] = (hf_vocab, h)
    for i in range(d.layers):
        L = lambda n: hf.hf_layer(i, n)  # noqa: E731
        shapes.update({L("input_layernorm.weight"): (h,), L("post_attention_layernorm.weight"): (h,),
                       L("self_attn.q_proj.weight"): (d.heads * hd, h),
                       L("self_attn.k_proj.weight"): (d.groups * hd, h),
                       L("self_attn.v_proj.weight"): (d.groups * hd, h),
                       L("self_attn.o_proj.weight"): (h, d.heads * hd)})
        if not d.is_moe(i):
            shapes.update(_swiglu_shapes(L("mlp"), d.ffn, h))
            continue
        shapes[L("mlp.gate.weight")] = (d.experts, h)
        for e in range(d.experts):
            shapes.update(_swiglu_shapes(L(f"mlp.experts.{e}"), d.expert_ffn, h))
        if d.shared_ffn:
            shapes.update(_swiglu_shapes(L("mlp.shared_experts"), d.shared_ffn, h))
    return shapes


def _swiglu_shapes(prefix: str, width: int, hidden: int) -> dict:
    return {f"{prefix}.gate_proj.weight": (width, hidden), f"{prefix}.up_proj.weight": (width, hidden),
            f"{prefix}.down_proj.weight": (hidden, width)}


def _check_tensors(model: SafetensorsModel, d: K.Dims, hf_vocab: int) -> None:
    expected, problems = _hf_shapes(d, hf_vocab), []
    for name, shape in expected.items():
        if name not in model.shapes:
            problems.append(f"{name} is missing")
        elif model.shapes[name] != shape:
            problems.append(f"{name} is {list(model.shapes[name])}, config.json needs {list(shape)}")
    bias = [n for n in model.shapes if n.endswith("e_score_correction_bias")]
    unknown = sorted(set(model.shapes) - set(expected) - set(bias))
    problems += [f"{n} has no counterpart in our model" for n in unknown[:5]]
    for name in bias:
        if torch.count_nonzero(model.get(name)):
            problems.append(f"{name} is non-zero (bias-corrected routing has no equivalent with softmax scores)")
    if problems:
        raise ConvertError(f"{model.dir} does not match its config.json: " + "; ".join(problems[:8]))


class _Producers:
    """megatron tensors made from Hugging Face ones (inverse of export's mapping)."""

    def __init__(self, model: SafetensorsModel, d: K.Dims, dtype: torch.dtype):
        self.m, self.d, self.dtype = model, d, dtype

    def get(self, name: str) -> torch.Tensor:
        return self.m.get(name).to(self.dtype)

    def whole(self, key: str, shape, make) -> TensorSpec:
        shape = tuple(shape)
        return TensorSpec(key, shape, self.dtype, lambda off, size: make(), chunk_rows=shape[0] if shape else 0)

    def rows(self, key: str, name: str, real_rows: int) -> TensorSpec:
        """Row-sliced copy; rows past ``real_rows`` (vocabulary padding) are zero."""
        def produce(off, size):
            start, stop = off[0], off[0] + size[0]
            out = torch.zeros(size, dtype=self.dtype)
            if start < real_rows:
                out[: min(stop, real_rows) - start] = self.m.rows(name, start, min(stop, real_rows)).to(self.dtype)
            return out
        return TensorSpec(key, (self.d.vocab, self.d.hidden), self.dtype, produce)

    def copy(self, key: str, name: str) -> TensorSpec:
        return self.whole(key, self.m.shapes[name], lambda: self.get(name))

    def fc1(self, key: str, prefix: str, width: int) -> TensorSpec:
        def make():
            return torch.cat([self.get(f"{prefix}.gate_proj.weight"), self.get(f"{prefix}.up_proj.weight")])
        return self.whole(key, (2 * width, self.d.hidden), make)

    def qkv(self, i: int) -> TensorSpec:
        d, L = self.d, lambda n: hf.hf_layer(i, n)  # noqa: E731

        def make():
            q = hf.interleaved_to_halves(self.get(L("self_attn.q_proj.weight")), d.head_dim)
            k = hf.interleaved_to_halves(self.get(L("self_attn.k_proj.weight")), d.head_dim)
            return hf.merge_qkv(q, k, self.get(L("self_attn.v_proj.weight")), d.groups)
        return self.whole(K.layer_key(i, "self_attention.linear_qkv.weight"),
                          ((d.heads + 2 * d.groups) * d.head_dim, d.hidden), make)

    def experts(self, i: int) -> list[TensorSpec]:
        """One chunk per expert: [gate_e; up_e] and down_e on the leading expert axis."""
        d, name = self.d, lambda e, p: hf.expert_name(i, e, p)  # noqa: E731

        def fc1(off, size):
            return torch.cat([self.get(name(off[0], "gate_proj")), self.get(name(off[0], "up_proj"))])[None]

        def fc2(off, size):
            return self.get(name(off[0], "down_proj"))[None]

        return [TensorSpec(K.layer_key(i, "mlp.experts.experts.linear_fc1.weight"),
                           (d.experts, 2 * d.expert_ffn, d.hidden), self.dtype, fc1, chunk_rows=1),
                TensorSpec(K.layer_key(i, "mlp.experts.experts.linear_fc2.weight"),
                           (d.experts, d.hidden, d.expert_ffn), self.dtype, fc2, chunk_rows=1)]


def _layer_specs(p: _Producers, i: int) -> list[TensorSpec]:
    d, L, M = p.d, lambda n: hf.hf_layer(i, n), lambda n: K.layer_key(i, n)  # noqa: E731
    specs = [p.copy(M(K.ATTN_NORM), L("input_layernorm.weight")), p.qkv(i),
             p.copy(M("self_attention.linear_proj.weight"), L("self_attn.o_proj.weight")),
             p.copy(M(K.MLP_NORM), L("post_attention_layernorm.weight"))]
    if not d.is_moe(i):
        return specs + [p.fc1(M("mlp.linear_fc1.weight"), L("mlp"), d.ffn),
                        p.copy(M("mlp.linear_fc2.weight"), L("mlp.down_proj.weight"))]
    specs += [p.copy(M("mlp.router.weight"), L("mlp.gate.weight"))] + p.experts(i)
    if d.shared_ffn:
        specs += [p.fc1(M("mlp.shared_experts.linear_fc1.weight"), L("mlp.shared_experts"), d.shared_ffn),
                  p.copy(M("mlp.shared_experts.linear_fc2.weight"), L("mlp.shared_experts.down_proj.weight"))]
    return specs


def tensor_specs(model: SafetensorsModel, d: K.Dims, hf_vocab: int, dtype: torch.dtype) -> list[TensorSpec]:
    p = _Producers(model, d, dtype)
    specs = [p.rows(K.EMBED, "model.embed_tokens.weight", hf_vocab)]
    for i in range(d.layers):
        specs += _layer_specs(p, i)
    specs.append(p.copy(K.FINAL_NORM, "model.norm.weight"))
    if not d.tied:
        specs.append(p.rows(K.OUTPUT, "lm_head.weight", hf_vocab))
    return specs


def base_settings(hf_dir: Path, base_config=None) -> dict:
    """The raw config the import starts from: ``--config`` when given (the user's word wins),
    else the training settings our export carried (so the import evaluates like the original),
    else nothing (the defaults)."""
    return loader.read_toml(base_config) if base_config else read_settings(hf_dir)


def build_config(hf_config: dict, base: dict | None = None, overrides=(), dtype: str | None = None) -> C.ErnieConfig:
    """Our config: model/moe from config.json, the rest from ``base`` (see ``base_settings``) and
    --set (which may not contradict config.json).

    Training-only values taken from config.json (``SETTABLE``) may be overridden.
    """
    raw = loader.apply_overrides(base or {}, overrides)
    if dtype:
        raw.setdefault("model", {})["dtype"] = dtype
    from_hf = hf.config_from_hf(hf_config)
    if raw.get("model", {}).get("dtype") is None:
        from_hf["model.dtype"] = hf.torch_dtype_of(hf_config)
    for dotted, value in from_hf.items():
        section, name = dotted.split(".")
        given = raw.get(section, {}).get(name)
        if given is None:
            raw.setdefault(section, {})[name] = value
        elif dotted not in SETTABLE and given != value:
            raise ConfigError(dotted, given, f"the Hugging Face model has {value!r}; the architecture comes "
                                             f"from config.json (drop this setting)")
    cfg = loader.build(C.ErnieConfig, raw)
    C.validate(cfg)
    return cfg


def _read_hf_config(hf_dir: Path) -> dict:
    path = hf_dir / "config.json"
    if not path.is_file():
        raise ConfigError("hf_dir", str(hf_dir), "no config.json; pass a Hugging Face model directory")
    try:
        config = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConvertError(f"{path} is not valid JSON ({err}); it should be the model's Hugging Face "
                           f"config.json") from None
    if not isinstance(config, dict):
        raise ConvertError(f"{path} holds a {type(config).__name__}, not a JSON object; it should be the "
                           f"model's Hugging Face config.json")
    return config


def import_hf(hf_dir, out, base_config=None, overrides=(), dtype: str | None = None,
              max_chunk_bytes: int = 512 << 20) -> dict:
    """Write a weights-only megatron_ernie checkpoint directory ``out``; returns a report."""
    hf_dir = Path(hf_dir)
    if dtype is not None and dtype not in DTYPES:
        raise ConfigError("--dtype", dtype, f"use one of {sorted(DTYPES)} (default: config.json's torch_dtype)")
    check_new_output(out, "out")
    hf_cfg = _read_hf_config(hf_dir)
    cfg = build_config(hf_cfg, base_settings(hf_dir, base_config), overrides, dtype)
    model = SafetensorsModel(hf_dir)
    hf_vocab = model.shapes.get("model.embed_tokens.weight", (0,))[0]
    d = K.Dims.from_config(cfg, _padded(hf_vocab))
    _check_tensors(model, d, hf_vocab)
    specs = tensor_specs(model, d, hf_vocab, DTYPES[cfg.model.dtype])
    objects = {key: megatron_object(None) for key in K.expected_objects(d)}
    with staged_dir(out, "out") as tmp:
        write_dcp(tmp, specs, objects, common={}, max_chunk_bytes=max_chunk_bytes)
        _write_run_files(tmp, hf_dir, cfg, hf_cfg)
    return {"out": str(out), "tensors": len(specs), "vocab": d.vocab, "hf_vocab": hf_vocab,
            "padded_rows": d.vocab - hf_vocab}


def _padded(vocab: int) -> int:
    return -(-vocab // 128) * 128


def _write_run_files(tmp: Path, hf_dir: Path, cfg, hf_cfg: dict) -> None:
    """meta.json, config.toml and the model's own tokenizer files (export passes them back)."""
    for name in TOKENIZER_FILES:
        if (hf_dir / name).is_file():
            shutil.copyfile(hf_dir / name, tmp / name)
    special = {k: hf_cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in hf_cfg}
    source = {"format": "huggingface", "path": str(hf_dir.resolve()), "architecture": hf_cfg["architectures"][0],
              "special_tokens": special}
    meta = {"iteration": 0, "consumed_samples": 0, "consumed_tokens": 0, "layout": dict(CANONICAL_LAYOUT),
            "extra": {"config": loader.to_dict(cfg), "weights_only": True, "source": source}}
    write_text_synced(tmp / "config.toml", C.dumps(cfg))
    write_text_synced(tmp / META, json.dumps(meta, indent=2, sort_keys=True))
    write_manifest(tmp)  # checksums of the imported files, verified when it is loaded or converted
