"""Config: TOML + overrides into the frozen tree; bad input is a clear error."""

import subprocess
import sys
import tomllib

import pytest

from megatron_ernie import config as C
from megatron_ernie.config.loader import build

from harness import ROOT

# (overrides, world size, the field the message must name, a word of the fix)
BAD = [
    (["train.itres=5"], None, "train.itres", "did you mean 'iters'"),
    (["nosuch.key=1"], None, "nosuch", "unknown key"),
    (["train.iters=\"ten\""], None, "train.iters", "expected a int"),
    (["train.iters=0"], None, "train.iters", "positive"),
    (["model.hidden_size=65"], None, "model.hidden_size", "divisible by num_attention_heads"),
    (["model.num_query_groups=3"], None, "model.num_query_groups", "must divide"),
    (["model.normalization=\"BatchNorm\""], None, "model.normalization", "allowed values"),
    (["model.dtype=\"fp16\""], None, "model.dtype", "allowed values"),
    (["model.hidden_dropout=1.5"], None, "model.hidden_dropout", "[0, 1)"),
    (["moe.router_topk=5"], None, "moe.router_topk", "between 1 and num_experts"),
    (["moe.score_function=\"relu\""], None, "moe.score_function", "allowed values"),
    (["moe.token_dispatcher=\"flex\""], None, "moe.token_dispatcher", "allowed values"),
    (["moe.first_dense_layers=4"], 1, "moe.first_dense_layers", "smaller than model.num_layers"),
    (["parallel.tensor=0"], None, "parallel.tensor", "positive"),
    (["parallel.virtual_pipeline=2"], None, "parallel.virtual_pipeline", "pipeline > 1"),
    (["parallel.tensor=3"], 3, "model.num_attention_heads", "divisible by parallel.tensor=3"),
    (["parallel.tensor=2"], 2, "parallel.sequence_parallel", "requires sequence parallelism"),
    (["parallel.expert=3"], 3, "moe.num_experts", "divisible by parallel.expert=3"),
    (["parallel.pipeline=3"], 3, "model.num_layers", "divisible by pipeline"),
    (["parallel.tensor=2", "parallel.sequence_parallel=true"], 3, "parallel", "multiple of tensor*pipeline*context"),
    (["train.global_batch_size=6", "train.micro_batch_size=4"], 1, "train.global_batch_size", "multiple of"),
    (["moe.num_experts=0", "parallel.expert=2"], 2, "parallel.expert", "needs moe.num_experts"),
    (["optimizer.min_lr=1.0"], None, "optimizer.min_lr", "must be in [0, lr"),
    (["optimizer.adam_beta2=1.0"], None, "optimizer.adam_beta2", "[0, 1)"),
    (["schedule.decay_style=\"step\""], None, "schedule.decay_style", "allowed values"),
    (["checkpoint.resume=\"maybe\""], None, "checkpoint.resume", "allowed values"),
    (["data.split=\"a,b\""], None, "data.split", "weights"),
    (["data.corpus=\"/no/such/file.txt\""], None, "data.corpus", "no such file"),
    (["data.corpus=\"data.csv\""], None, "data.corpus", ".txt/.jsonl"),
    (["parallel.context=2"], 2, "parallel.context", "Transformer Engine"),
    (["moe.grouped_gemm=true"], 1, "moe.grouped_gemm", "Transformer Engine"),
    (["log.level=\"LOUD\""], None, "log.level", "allowed values"),
]


@pytest.mark.parametrize("overrides,world,field,fix", BAD, ids=[b[2] + ":" + ",".join(b[0]) for b in BAD])
def test_bad_config_names_field_value_and_fix(overrides, world, field, fix):
    with pytest.raises(C.ConfigError) as err:
        cfg = C.load(ROOT / "configs/tiny_cpu.toml", ["parallel.expert=1"] + overrides)
        C.validate(cfg, world)
    message = str(err.value)
    assert err.value.field.startswith(field), message
    assert fix in message, message


def test_the_table_is_large_enough():
    assert len(BAD) >= 20


def test_overrides_and_defaults():
    cfg = C.load(ROOT / "configs/tiny_cpu.toml", ["train.iters=7", "optimizer.lr=1", "run.name=\"x\""])
    assert cfg.train.iters == 7 and cfg.optimizer.lr == 1.0 and isinstance(cfg.optimizer.lr, float)
    assert cfg.run.name == "x" and cfg.moe.num_experts == 4  # from the file
    assert cfg.schedule.decay_style == "cosine"  # a default
    with pytest.raises(Exception):
        cfg.train.iters = 3  # frozen


def test_dump_round_trips_every_section():
    cfg = C.load(ROOT / "configs/gpu_ernie45_300b_a47b.toml")
    assert build(C.ErnieConfig, tomllib.loads(C.dumps(cfg))) == cfg


@pytest.mark.parametrize("name,world", [("tiny_cpu", 2), ("gpu_moe16b_a3b_4x8", 32), ("gpu_ernie45_300b_a47b", 768)])
def test_shipped_configs_validate(name, world):
    C.validate(C.load(ROOT / "configs" / f"{name}.toml"), world)


def test_cli_reports_config_errors_without_traceback():
    proc = subprocess.run([sys.executable, "-m", "megatron_ernie.cli", "show-config", "--config",
                           str(ROOT / "configs/tiny_cpu.toml"), "--set", "moe.router_topk=9"],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2
    assert "moe.router_topk = 9" in proc.stderr and "Traceback" not in proc.stderr


def test_missing_config_file_is_a_clear_error():
    with pytest.raises(C.ConfigError, match="no such file"):
        C.load("/no/such/config.toml")
