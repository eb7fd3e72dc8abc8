"""The global checkpoint keys and shapes of our model, derived from its config.

megatron-core names every tensor by its place in the *whole* model (layer
numbers are global, experts are stacked on a leading axis over all experts,
a TP shard is an offset into the full tensor), so these names and shapes are
the same at every TP/PP/EP/DP layout.  Fused tensors, as megatron-core lays
them out:

* ``linear_qkv.weight`` [(heads + 2*groups) * head_dim, hidden]: per query
  group, the group's query heads, then its key head, then its value head.
* ``linear_fc1.weight`` of a SwiGLU MLP [2 * ffn, hidden]: [gate; up] (the
  checkpoint stores the two halves as separate shards so TP can reshard them,
  but the global tensor is the concatenation).
* expert weights: ``experts.experts.linear_fc1.weight`` [experts, 2 * ffn,
  hidden] and ``linear_fc2.weight`` [experts, hidden, ffn].

The pre-norms are fused into the next linear's key on the local (CPU) spec;
the Transformer Engine spec names the MoE layers' pre-MLP norm
``pre_mlp_layernorm.weight`` instead, and both are accepted when reading.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_ernie.convert.errors import ConvertError

EMBED = "embedding.word_embeddings.weight"
OUTPUT = "output_layer.weight"
FINAL_NORM = "decoder.final_layernorm.weight"
MODEL_PREFIXES = ("embedding.", "decoder.", "output_layer.")
ATTN_NORM, MLP_NORM = "self_attention.linear_qkv.layer_norm_weight", "mlp.linear_fc1.layer_norm_weight"
ALIASES = {ATTN_NORM: "input_layernorm.weight", MLP_NORM: "pre_mlp_layernorm.weight"}


@dataclass(frozen=True)
class Dims:
    """The sizes that fix every tensor shape (an extracted sub-network is just other sizes)."""

    layers: int
    hidden: int
    heads: int
    groups: int
    ffn: int
    experts: int
    topk: int
    expert_ffn: int
    shared_ffn: int
    first_dense: int
    vocab: int  # padded
    tied: bool

    @classmethod
    def from_config(cls, cfg, vocab: int) -> "Dims":
        m, moe = cfg.model, cfg.moe
        return cls(m.num_layers, m.hidden_size, m.num_attention_heads, m.num_query_groups, m.ffn_hidden_size,
                   moe.num_experts, moe.router_topk, moe.expert_ffn_hidden_size,
                   moe.shared_expert_ffn_hidden_size if moe.num_experts else 0,
                   moe.first_dense_layers if moe.num_experts else m.num_layers, vocab,
                   not m.untie_embeddings_and_output_weights)

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def is_moe(self, layer: int) -> bool:
        return self.experts > 0 and layer >= self.first_dense


def layer_key(layer: int, name: str) -> str:
    return f"decoder.layers.{layer}.{name}"


def _layer_tensors(d: Dims, i: int) -> dict[str, tuple]:
    h = d.hidden
    shapes = {ATTN_NORM: (h,), "self_attention.linear_qkv.weight": ((d.heads + 2 * d.groups) * d.head_dim, h),
              "self_attention.linear_proj.weight": (h, d.heads * d.head_dim), MLP_NORM: (h,)}
    if not d.is_moe(i):
        shapes.update({"mlp.linear_fc1.weight": (2 * d.ffn, h), "mlp.linear_fc2.weight": (h, d.ffn)})
        return shapes
    shapes.update({"mlp.router.weight": (d.experts, h),
                   "mlp.experts.experts.linear_fc1.weight": (d.experts, 2 * d.expert_ffn, h),
                   "mlp.experts.experts.linear_fc2.weight": (d.experts, h, d.expert_ffn)})
    if d.shared_ffn:
        shapes.update({"mlp.shared_experts.linear_fc1.weight": (2 * d.shared_ffn, h),
                       "mlp.shared_experts.linear_fc2.weight": (h, d.shared_ffn)})
    return shapes


def expected_tensors(d: Dims) -> dict[str, tuple]:
    """Every model tensor's global key and shape, in model order."""
    shapes = {EMBED: (d.vocab, d.hidden)}
    for i in range(d.layers):
        shapes.update({layer_key(i, k): v for k, v in _layer_tensors(d, i).items()})
    shapes[FINAL_NORM] = (d.hidden,)
    if not d.tied:
        shapes[OUTPUT] = (d.vocab, d.hidden)
    return shapes


def expected_objects(d: Dims) -> list[str]:
    """megatron-core's per-linear ``_extra_state`` objects (key/shard_<index>_<count>)."""
    keys = []
    for i in range(d.layers):
        linears = ["self_attention.linear_qkv", "self_attention.linear_proj"]
        if not d.is_moe(i):
            linears += ["mlp.linear_fc1", "mlp.linear_fc2"]
        elif d.shared_ffn:
            linears += ["mlp.shared_experts.linear_fc1", "mlp.shared_experts.linear_fc2"]
        keys += [layer_key(i, f"{name}._extra_state/shard_0_1") for name in linears]
        if d.is_moe(i):
            keys += [layer_key(i, f"mlp.experts.experts.linear_fc{n}._extra_state/shard_{e}_{d.experts}")
                     for e in range(d.experts) for n in (1, 2)]
    return keys


def is_model_key(key: str) -> bool:
    return key.startswith(MODEL_PREFIXES)


def resolve_keys(stored: dict, d: Dims) -> dict[str, str]:
    """Map each expected key to the stored key (accepting the TE spellings); check shapes.

    ``stored`` maps key -> shape.  Raises ConvertError listing every tensor that is
    missing, has another shape, or is a model tensor the converter does not know.
    """
    found, problems = {}, []
    for key, shape in expected_tensors(d).items():
        name = next((k for k in _spellings(key) if k in stored), None)
        if name is None:
            problems.append(f"{key} is missing")
        elif tuple(stored[name]) != tuple(shape):
            problems.append(f"{name} is {list(stored[name])} in the files, the config needs {list(shape)}")
        else:
            found[key] = name
    unknown = sorted(k for k in stored if is_model_key(k) and k not in found.values())
    problems += [f"{k} is not part of this model (a feature the converter does not map)" for k in unknown[:5]]
    if problems:
        more = f" (and {len(problems) - 8} more)" if len(problems) > 8 else ""
        raise ConvertError("the checkpoint's tensors do not match its config: " + "; ".join(problems[:8]) + more
                           + ". Use the config the checkpoint was saved with (meta.json extra.config)")
    return found


def _spellings(key: str) -> list[str]:
    for fused, te in ALIASES.items():
        if key.endswith(fused):
            return [key, key[: -len(fused)] + te]
    return [key]
