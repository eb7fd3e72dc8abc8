"""Continuing an extracted sub-network: which checkpoints continue, where the data stream starts,
and the continuation's LR schedule (train/continuation.py). The end-to-end cases (a real supernet,
extraction, the continuation's first batch and LRs) are in test_elastic.py's extraction launch."""

import dataclasses
import json

import pytest
import torch

from megatron_ernie import config as C
from megatron_ernie.config.errors import ConfigError
from megatron_ernie.train import continuation, loop
from megatron_ernie.train.optim import build_scheduler

from harness import ROOT

CFG = C.load(ROOT / "configs/tiny_cpu.toml")
RECORD = {"consumed_samples": 40, "consumed_tokens": 2560, "iteration": 5, "global_batch_size": 8,
          "final_lr": 1e-3, "peak_lr": 3e-3}


def _with(cfg, **sections):
    return dataclasses.replace(cfg, **{k: dataclasses.replace(getattr(cfg, k), **v) for k, v in sections.items()})


def _lrs(cfg, record) -> list[float]:
    """The LR of each of the run's steps under its (possibly continuation) schedule."""
    optim_cfg, schedule_cfg = continuation.schedule(cfg, record)
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=optim_cfg.lr)
    sched = build_scheduler(opt, optim_cfg, schedule_cfg, cfg.train.iters)
    lrs = []
    for _ in range(cfg.train.iters):
        lrs.append(opt.param_groups[0]["lr"])
        sched.step(increment=1)
    return lrs


def _checkpoint(path, weights_only=True, record=RECORD):
    path.mkdir(parents=True)
    extra = {"weights_only": weights_only, **({continuation.KEY: record} if record else {})}
    (path / "meta.json").write_text(json.dumps({"iteration": 0, "consumed_samples": 40, "consumed_tokens": 2560,
                                                "layout": {"world": 1}, "extra": extra}))
    return path


@pytest.mark.parametrize("fraction", [1.0, 0.5, 0.25])
def test_continuation_warms_up_to_a_fraction_of_the_final_lr_then_decays_to_min(fraction):
    cfg = _with(CFG, train={"iters": 100}, optimizer={"lr": 3e-3, "min_lr": 1e-4},
                schedule={"continue_peak_fraction": fraction, "continue_warmup_fraction": 0.05})
    lrs = _lrs(cfg, RECORD)
    peak = fraction * RECORD["final_lr"]
    assert lrs[0] == 0.0 and lrs[1] == pytest.approx(peak / 5)  # 5 warmup steps (5% of 100)
    assert lrs[5] == pytest.approx(peak) and max(lrs) == pytest.approx(peak)
    assert all(a >= b for a, b in zip(lrs[5:], lrs[6:]))  # cosine: never up again
    assert lrs[-1] == pytest.approx(1e-4, rel=0.05)


def test_peak_fraction_zero_keeps_the_configs_schedule_and_min_lr_never_exceeds_the_peak():
    cfg = _with(CFG, train={"iters": 50}, schedule={"continue_peak_fraction": 0.0})
    assert continuation.schedule(cfg, RECORD) == (cfg.optimizer, cfg.schedule)
    assert continuation.schedule(CFG, None) == (CFG.optimizer, CFG.schedule)
    low = _with(CFG, optimizer={"lr": 3e-3, "min_lr": 5e-3 / 10})
    optim_cfg, _ = continuation.schedule(low, {**RECORD, "final_lr": 2e-4})
    assert optim_cfg.lr == pytest.approx(2e-4) and optim_cfg.min_lr == pytest.approx(2e-4)


@pytest.mark.parametrize("key,value", [("continue_peak_fraction", 1.5), ("continue_peak_fraction", -0.1),
                                       ("continue_warmup_fraction", 0.6), ("continue_warmup_fraction", -1.0)])
def test_bad_continuation_schedule_is_a_named_error(key, value):
    with pytest.raises(ConfigError) as err:
        C.validate(C.load(ROOT / "configs/tiny_cpu.toml", [f"schedule.{key}={value}"]))
    assert err.value.field == f"schedule.{key}" and err.value.value == value


def test_only_checkpoint_load_of_an_extracted_model_continues(tmp_path):
    ckpt = _checkpoint(tmp_path / "extracted")
    ck = dataclasses.replace(CFG.checkpoint, load=str(ckpt))
    assert continuation.record_of(ck, ckpt) == RECORD
    assert continuation.record_of(dataclasses.replace(ck, load_weights_only=True), ckpt) is None  # SFT
    assert continuation.record_of(ck, tmp_path / "own_latest") is None  # a resume of the continuation
    assert continuation.record_of(ck, None) is None
    plain = _checkpoint(tmp_path / "import", record=None)  # an import: weights only, no data position
    assert continuation.record_of(dataclasses.replace(ck, load=str(plain)), plain) is None


def test_data_start_is_the_sources_position_rounded_up_to_whole_batches(tmp_path):
    ck = CFG.checkpoint
    assert continuation.data_start(RECORD, ck, 8) == 40
    assert continuation.data_start(RECORD, ck, 16) == 48  # samples 40..47 are skipped, never re-read
    assert continuation.data_start(RECORD, dataclasses.replace(ck, load_data_position=False), 8) == 0
    assert continuation.data_start(None, ck, 8) == 0
    ckpt = _checkpoint(tmp_path / "extracted")
    cfg = _with(CFG, checkpoint={"load": str(ckpt), "resume": "none"}, train={"global_batch_size": 8, "iters": 10})
    assert loop.planned_start(cfg, ckpt, continuation.record_of(cfg.checkpoint, ckpt)) == (0, 40)
    sft = _with(cfg, checkpoint={"load_weights_only": True})
    assert loop.planned_start(sft, ckpt, continuation.record_of(sft.checkpoint, ckpt)) == (0, 0)


def test_a_continuation_has_data_for_all_its_iterations_after_the_supernets_samples():
    train = dataclasses.replace(CFG.train, iters=10, global_batch_size=8)
    assert loop._num_samples(train)[0] == 80
    assert loop._num_samples(train, (0, 40))[0] == 120  # a continuation from sample 40
    assert loop._num_samples(train, (4, 72))[0] == 120  # the same continuation requeued at its iteration 4
    assert loop._num_samples(train, (4, 32))[0] == 80  # an ordinary resume: unchanged


def test_loaded_optimizer_state_does_not_bring_the_sources_lr():
    """Carried moments (ernie extract --optimizer) come with their param groups' LRs; the
    continuation's schedule must keep its own (megatron-core's scheduler reads max_lr per group)."""
    source = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=3e-3)
    source.param_groups[0].update(max_lr=3e-3, min_lr=3e-4)
    target = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=2e-4)
    target.param_groups[0].update(max_lr=2e-4, min_lr=1e-4)
    bounds = continuation.lr_bounds(target)
    target.load_state_dict(source.state_dict())
    assert target.param_groups[0]["max_lr"] == 3e-3  # what loading alone does
    continuation.restore_lr_bounds(target, bounds)
    assert [target.param_groups[0][k] for k in ("lr", "max_lr", "min_lr")] == [2e-4, 2e-4, 1e-4]
