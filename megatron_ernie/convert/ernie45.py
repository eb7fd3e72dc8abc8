"""Our model as Hugging Face's ERNIE 4.5 (``Ernie4_5_MoeForCausalLM``; dense: ``Ernie4_5ForCausalLM``).

Why this architecture: it is the one ``transformers`` (>= 4.54) and vLLM
implement that matches ours op for op, with no parameter forced on us:
RMSNorm, RoPE, GQA without biases (``use_bias=false``), SwiGLU experts, a
softmax top-k router whose selected probabilities are renormalised, an
*ungated* shared expert added to the routed output (megatron-core's
SharedExpertMLP; Qwen2-MoE would need its sigmoid gate), and leading dense
layers (``moe_layer_start_index``).  Qwen3-MoE always has q/k norms and
Mixtral has neither shared experts nor dense layers.

Exact mapping of our options (anything else is refused with the field named):

=================================  ==========================================
ours                               config.json
=================================  ==========================================
model.num_layers                   num_hidden_layers
model.hidden_size                  hidden_size
model.num_attention_heads          num_attention_heads
model.num_query_groups             num_key_value_heads
model.ffn_hidden_size              intermediate_size (the dense layers)
model.seq_length                   max_position_embeddings
model.norm_epsilon                 rms_norm_eps (normalization must be RMSNorm)
model.rotary_base                  rope_theta
untie_embeddings_and_output_...    tie_word_embeddings = not it
model.dtype fp32 | bf16            torch_dtype float32 | bfloat16
moe.num_experts / router_topk      moe_num_experts / moe_k
moe.expert_ffn_hidden_size         moe_intermediate_size
moe.shared_expert_ffn_hidden_size  moe_num_shared_experts * moe_intermediate_size
                                   (must be a multiple of the expert width)
moe.first_dense_layers             moe_layer_start_index (end = last, interval 1)
moe.score_function = softmax       (sigmoid scores have no ERNIE 4.5 equivalent)
moe.router_pre_softmax             moe_norm_min = 1.0 if true, else 1e-12 (below)
moe.aux_loss_coeff                 router_aux_loss_coef (training only)
padded vocabulary (x128)           vocab_size: the *padded* size; padding rows
                                   are exported as trained and never produced
                                   by the tokenizer
=================================  ==========================================

Router: ERNIE 4.5 softmaxes over all experts, takes the top-k probabilities
p and uses p / max(sum(p), moe_norm_min).  megatron-core by default takes the
top-k *logits* and softmaxes over them: that is softmax restricted to the
top-k set, i.e. the renormalised p (moe_norm_min = 1e-12, equal up to
rounding).  With ``router_pre_softmax`` it uses p as is; since sum(p) <= 1,
moe_norm_min = 1.0 makes ERNIE 4.5 divide by exactly 1.  A value in between
renormalises only some tokens and is refused on import.
``e_score_correction_bias`` is written as zeros (megatron-core ignores the
expert bias for softmax scores).

RoPE: megatron-core rotates the two *halves* of each head
(``rotate_half``); ERNIE 4.5 rotates *interleaved* pairs (2i, 2i+1).  Moving
query/key row ``i`` to ``2i`` and row ``i + d/2`` to ``2i + 1`` in every head
makes the two identical (attention scores are dot products, unchanged by the
same permutation of q and k).
"""

from __future__ import annotations

import torch

from megatron_ernie.config.errors import ConfigError

MOE_ARCH, DENSE_ARCH = "Ernie4_5_MoeForCausalLM", "Ernie4_5ForCausalLM"
MODEL_TYPES = {MOE_ARCH: "ernie4_5_moe", DENSE_ARCH: "ernie4_5"}
TORCH_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
NORM_MIN = 1e-12  # ERNIE 4.5's clamp on the top-k probability sum: renormalise
NO_RENORM = 1.0  # the top-k sum never exceeds 1: divide by exactly 1


def check_supported(cfg) -> None:
    """Raise ConfigError for the first option that ERNIE 4.5 cannot express."""
    m, moe = cfg.model, cfg.moe
    if m.normalization != "RMSNorm":
        raise ConfigError("model.normalization", m.normalization,
                          "ERNIE 4.5 uses RMSNorm; LayerNorm models cannot be exported")
    if not moe.num_experts:
        return
    if moe.score_function != "softmax":
        raise ConfigError("moe.score_function", moe.score_function,
                          "ERNIE 4.5 routes with softmax scores; sigmoid routing has no Hugging Face equivalent here")
    if moe.expert_bias:
        raise ConfigError("moe.expert_bias", True,
                          "aux-loss-free expert bias needs sigmoid routing, which ERNIE 4.5 lacks")
    if moe.shared_expert_ffn_hidden_size % moe.expert_ffn_hidden_size:
        raise ConfigError("moe.shared_expert_ffn_hidden_size", moe.shared_expert_ffn_hidden_size,
                          f"ERNIE 4.5 sizes shared experts in units of moe.expert_ffn_hidden_size="
                          f"{moe.expert_ffn_hidden_size}; use a multiple of it")


def hf_config(cfg, vocab: int, special: dict, torch_dtype: str) -> dict:
    """config.json for our config (``vocab`` is the padded vocabulary)."""
    m, moe = cfg.model, cfg.moe
    arch = MOE_ARCH if moe.num_experts else DENSE_ARCH
    out = {"architectures": [arch], "model_type": MODEL_TYPES[arch], "vocab_size": vocab,
           "hidden_size": m.hidden_size, "intermediate_size": m.ffn_hidden_size,
           "num_hidden_layers": m.num_layers, "num_attention_heads": m.num_attention_heads,
           "num_key_value_heads": m.num_query_groups, "head_dim": m.hidden_size // m.num_attention_heads,
           "hidden_act": "silu", "max_position_embeddings": m.seq_length, "rms_norm_eps": m.norm_epsilon,
           "rope_theta": float(m.rotary_base), "tie_word_embeddings": not m.untie_embeddings_and_output_weights,
           "use_bias": False, "use_cache": True, "torch_dtype": torch_dtype, **special}
    if moe.num_experts:
        del out["head_dim"]  # not a field of Ernie4_5_MoeConfig (derived from hidden/heads there)
        out.update({"moe_num_experts": moe.num_experts, "moe_k": moe.router_topk,
                    "moe_intermediate_size": moe.expert_ffn_hidden_size,
                    "moe_num_shared_experts": moe.shared_expert_ffn_hidden_size // moe.expert_ffn_hidden_size,
                    "moe_layer_start_index": moe.first_dense_layers, "moe_layer_end_index": m.num_layers - 1,
                    "moe_layer_interval": 1,
                    "moe_norm_min": NO_RENORM if moe.router_pre_softmax else NORM_MIN,
                    "router_aux_loss_coef": moe.aux_loss_coeff, "output_router_logits": False})
    return out


def _hf_field(hf: dict, name: str, default=None):
    if name in hf:
        return hf[name]
    if default is None:
        raise ConfigError(f"config.json:{name}", None, "missing; is this an ERNIE 4.5 config.json?")
    return default


def _require_hf(cond: bool, name: str, value, fix: str) -> None:
    if not cond:
        raise ConfigError(f"config.json:{name}", value, fix)


def _rope_theta(hf: dict) -> float:
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    _require_hf(kind == "default", "rope_parameters.rope_type", kind, "only plain RoPE is supported (no scaling)")
    return float(rope.get("rope_theta", _hf_field(hf, "rope_theta", 10000.0)))


def config_from_hf(hf: dict) -> dict:
    """Our model/moe fields (dotted names) for an ERNIE 4.5 config.json; refuses what we lack."""
    arch = (hf.get("architectures") or [None])[0]
    _require_hf(arch in MODEL_TYPES, "architectures", hf.get("architectures"), f"supported: {sorted(MODEL_TYPES)}")
    _require_hf(not hf.get("use_bias", False), "use_bias", hf.get("use_bias"), "our layers have no biases")
    _require_hf(hf.get("hidden_act", "silu") == "silu", "hidden_act", hf.get("hidden_act"), "only silu (SwiGLU)")
    layers, hidden, heads = (_hf_field(hf, k) for k in ("num_hidden_layers", "hidden_size", "num_attention_heads"))
    head_dim = hf.get("head_dim") or hidden // heads
    _require_hf(head_dim * heads == hidden, "head_dim", head_dim, "must equal hidden_size/num_attention_heads")
    fields = {"model.num_layers": layers, "model.hidden_size": hidden, "model.num_attention_heads": heads,
              "model.num_query_groups": _hf_field(hf, "num_key_value_heads", heads),
              "model.ffn_hidden_size": _hf_field(hf, "intermediate_size"),
              "model.seq_length": _hf_field(hf, "max_position_embeddings"),
              "model.norm_epsilon": float(_hf_field(hf, "rms_norm_eps")), "model.normalization": "RMSNorm",
              "model.rotary_base": int(_rope_theta(hf)),
              "model.untie_embeddings_and_output_weights": not hf.get("tie_word_embeddings", True),
              "moe.num_experts": 0}
    if arch == MOE_ARCH:
        fields.update(_moe_from_hf(hf, layers))
    return fields


def _moe_from_hf(hf: dict, layers: int) -> dict:
    end, interval = hf.get("moe_layer_end_index", -1), hf.get("moe_layer_interval", 1)
    _require_hf(end in (-1, layers - 1), "moe_layer_end_index", end, "MoE layers must run to the last layer")
    _require_hf(interval == 1, "moe_layer_interval", interval, "every layer after the dense ones must be MoE")
    width = _hf_field(hf, "moe_intermediate_size")
    return {"moe.num_experts": _hf_field(hf, "moe_num_experts"), "moe.router_topk": _hf_field(hf, "moe_k"),
            "moe.expert_ffn_hidden_size": width, "moe.router_pre_softmax": _pre_softmax(hf),
            "moe.shared_expert_ffn_hidden_size": width * hf.get("moe_num_shared_experts", 0),
            "moe.first_dense_layers": hf.get("moe_layer_start_index", 0), "moe.score_function": "softmax",
            "moe.expert_bias": False, "moe.aux_loss_coeff": float(hf.get("router_aux_loss_coef", 0.0))}


def _pre_softmax(hf: dict) -> bool:
    """moe_norm_min >= 1: top-k probabilities used as they are; <= k/E: always renormalised."""
    norm_min, k, experts = hf.get("moe_norm_min", NORM_MIN), _hf_field(hf, "moe_k"), _hf_field(hf, "moe_num_experts")
    _require_hf(norm_min >= NO_RENORM or norm_min <= k / experts, "moe_norm_min", norm_min,
                "use <= moe_k/moe_num_experts (renormalised top-k) or >= 1 (plain top-k probabilities); "
                "in between only some tokens are renormalised, which our router cannot express")
    return norm_min >= NO_RENORM


def torch_dtype_of(hf: dict) -> str:
    name = hf.get("torch_dtype") or hf.get("dtype") or "float32"
    for ours, theirs in TORCH_DTYPES.items():
        if name == theirs and ours != "fp16":
            return ours
    raise ConfigError("config.json:torch_dtype", name, "supported: float32, bfloat16 (pass --dtype to cast)")


# --- tensor layouts ------------------------------------------------------------------------------


def split_qkv(qkv: torch.Tensor, heads: int, groups: int, head_dim: int):
    """megatron's fused [per group: q heads, k, v] rows -> (q, k, v) in HF head order."""
    per_group = heads // groups
    grouped = qkv.view(groups, (per_group + 2) * head_dim, -1)
    q, k, v = grouped.split([per_group * head_dim, head_dim, head_dim], dim=1)
    hidden = qkv.shape[-1]
    return q.reshape(-1, hidden), k.reshape(-1, hidden), v.reshape(-1, hidden)


def merge_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: int) -> torch.Tensor:
    hidden = q.shape[-1]
    parts = [t.reshape(groups, -1, hidden) for t in (q, k, v)]
    return torch.cat(parts, dim=1).reshape(-1, hidden)


def halves_to_interleaved(w: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Rows of each head: [x_0..x_{d/2-1}, y_0..] -> [x_0, y_0, x_1, y_1, ...]."""
    hidden = w.shape[-1]
    return w.reshape(-1, 2, head_dim // 2, hidden).transpose(1, 2).reshape(-1, hidden)


def interleaved_to_halves(w: torch.Tensor, head_dim: int) -> torch.Tensor:
    hidden = w.shape[-1]
    return w.reshape(-1, head_dim // 2, 2, hidden).transpose(1, 2).reshape(-1, hidden)


# --- Hugging Face tensor names (the original ERNIE 4.5 release layout) ---------------------------


def hf_layer(i: int, name: str) -> str:
    return f"model.layers.{i}.{name}"


def expert_name(i: int, e: int, proj: str) -> str:
    return hf_layer(i, f"mlp.experts.{e}.{proj}.weight")


def score_bias_name(i: int) -> str:
    return hf_layer(i, "mlp.moe_statics.e_score_correction_bias")
