"""Fast single-process checks of pure pieces: dims, vocab padding, NaN guard, extensions."""

import math

import pytest

from megatron_ernie.config.errors import ConfigError
from megatron_ernie.model.extensions import Extensions
from megatron_ernie.runtime.dims import ParallelDims


def test_dims_arithmetic():
    d = ParallelDims(world=768, tp=4, pp=6, ep=8, etp=1)
    d.validate()
    assert (d.dp, d.expert_dp) == (32, 16)
    assert d.num_microbatches(4096, 1) == 128


def test_dims_reject_bad_world():
    with pytest.raises(ConfigError, match="multiple of tensor\\*pipeline\\*context"):
        ParallelDims(world=6, tp=4).validate()
    with pytest.raises(ConfigError, match="expert_tensor\\*expert\\*pipeline"):
        ParallelDims(world=4, ep=8).validate()
    with pytest.raises(ConfigError, match="micro_batch_size\\*data_parallel"):
        ParallelDims(world=4).num_microbatches(6, 1)


def test_vocab_padding_does_not_depend_on_tp():
    from megatron_ernie.model.build import padded_vocab_size

    assert {padded_vocab_size(2050, tp) for tp in (1, 2, 4, 8)} == {2176}
    assert padded_vocab_size(256, 1) == 256


def test_nan_loss_stops_with_advice():
    from megatron_ernie.train.step import StepResult, TrainingDiverged, check_finite

    check_finite(StepResult(loss=2.5, tokens=10, grad_norm=1.0), 3)
    with pytest.raises(TrainingDiverged, match="iteration 7: loss is nan.*optimizer.lr"):
        check_finite(StepResult(loss=math.nan, tokens=10), 7)
    with pytest.raises(TrainingDiverged, match="gradient norm is inf"):
        check_finite(StepResult(loss=1.0, tokens=10, grad_norm=math.inf), 8)


def test_extensions_compose_and_refuse_clashes():
    a = Extensions(layer_spec=(lambda i, s: s + [("a", i)],), tconfig={"x": 1})
    b = Extensions(layer_spec=(lambda i, s: s + [("b", i)],), tconfig={"y": 2})
    ab = a.merge(b)
    assert ab.rewrite_layer(3, []) == [("a", 3), ("b", 3)] and ab.tconfig == {"x": 1, "y": 2}
    with pytest.raises(ValueError, match="same tconfig fields"):
        a.merge(Extensions(tconfig={"x": 5}))


def test_model_config_builds_without_megatron_deprecation_notices():
    """Every stage builds a TransformerConfig; megatron-core 0.16 warned on each ("full scope is
    deprecated") because its default spelling is deprecated: the build passes the current one."""
    import warnings

    from megatron_ernie import config as C
    from megatron_ernie.model.build import transformer_config

    cfg = C.load("configs/tiny_cpu.toml")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        built = transformer_config(cfg.model, cfg.moe, cfg.parallel)
    assert built.cuda_graph_scope == [] and built.num_layers == cfg.model.num_layers
    assert [str(w.message) for w in caught if "deprecated" in str(w.message)] == []
