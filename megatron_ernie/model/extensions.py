"""How optional features (FP8 emulation, elastic supernet) change the model.

A feature never edits layer code: it contributes an ``Extensions`` value —
per-layer spec rewrites (swap a megatron-core submodule for a subclass),
hooks run on each built GPTModel chunk, and extra TransformerConfig fields.
``build_model`` applies them in that order; features combine by ``merge``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

# (global 0-based layer index, layer ModuleSpec) -> ModuleSpec
LayerSpecFn = Callable[[int, object], object]
# a built GPTModel chunk -> None
PostBuildFn = Callable[[object], None]


@dataclass(frozen=True)
class Extensions:
    layer_spec: tuple[LayerSpecFn, ...] = ()
    post_build: tuple[PostBuildFn, ...] = ()
    tconfig: dict = field(default_factory=dict)
    ddp: dict = field(default_factory=dict)  # extra DistributedDataParallelConfig fields

    def merge(self, other: "Extensions") -> "Extensions":
        for name in ("tconfig", "ddp"):
            clash = set(getattr(self, name)) & set(getattr(other, name))
            if clash:
                raise ValueError(f"two features set the same {name} fields: {sorted(clash)}")
        return Extensions(self.layer_spec + other.layer_spec, self.post_build + other.post_build,
                          {**self.tconfig, **other.tconfig}, {**self.ddp, **other.ddp})

    def rewrite_layer(self, index: int, spec):
        for fn in self.layer_spec:
            spec = fn(index, spec)
        return spec

    def after_build(self, chunk) -> None:
        for fn in self.post_build:
            fn(chunk)


def extensions_for(model, moe=None, fp8=None, elastic=None) -> Extensions:
    """Collect the extensions that the config's optional sections ask for."""
    ext = Extensions()
    if fp8 is not None and fp8.recipe != "off":
        from megatron_ernie.precision.model import fp8_extensions

        ext = ext.merge(fp8_extensions(fp8, model.num_layers))
    if elastic is not None and elastic.enabled:
        from megatron_ernie.elastic.model import elastic_extensions

        ext = ext.merge(elastic_extensions(elastic, model, moe))
    return ext
