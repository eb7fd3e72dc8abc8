"""The real CLI end to end: iteration lines, TensorBoard files read back with
TensorBoard's own reader, checkpoints, a falling loss on the real corpus."""

import re
from pathlib import Path

import pytest

from harness import ROOT, torchrun

pytestmark = pytest.mark.slow

LINE = re.compile(r"iteration\s+(\d+)/\s*\d+\s+\| consumed tokens\s+(\d+) \| loss ([0-9.]+) \| lr ([0-9.e+-]+)")
EVAL = re.compile(r"validation at iteration (\d+) \| loss ([0-9.]+)")


@pytest.fixture(scope="module")
def run(tmp_path_factory, data_cache):
    run_dir = tmp_path_factory.mktemp("cli") / "run"
    proc = torchrun(2, ["-m", "megatron_ernie.cli", "pretrain", "--config", ROOT / "configs/tiny_cpu.toml",
                        "--set", f"run.dir=\"{run_dir}\"", "--set", "train.iters=30",
                        "--set", "train.eval_interval=10", "--set", "checkpoint.save_interval=15"])
    return run_dir, proc.stdout


def _events(run_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert len(files) == 1, files  # written once, by one rank
    acc = EventAccumulator(str(files[0]), size_guidance={"scalars": 0})
    acc.Reload()
    return acc


def test_iteration_lines_cover_every_step(run):
    _, out = run
    its = [int(m.group(1)) for m in LINE.finditer(out)]
    assert its == list(range(1, 31))
    tokens = [int(m.group(2)) for m in LINE.finditer(out)]
    assert tokens[0] == 16 * 64 and tokens[-1] == 30 * 16 * 64


def test_validation_loss_falls_on_the_real_corpus(run):
    _, out = run
    evals = {int(i): float(v) for i, v in EVAL.findall(out)}
    assert sorted(evals) == [10, 20, 30]
    assert evals[30] < evals[10] - 0.3, evals


def test_tensorboard_scalars_match_the_log(run):
    run_dir, out = run
    acc = _events(run_dir)
    tags = set(acc.Tags()["scalars"])
    for tag in ("train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "train/iteration_ms",
                "system/memory_mb", "eval/loss", "expert_load/layer_2/imbalance",
                # the quickstart is an elastic supernet: per sampled sub-network class
                "elastic/loss_largest", "elastic/loss_smallest", "elastic/loss_random", "elastic/distill",
                "elastic/active_params_mean"):
        assert tag in tags, (tag, sorted(tags))
    logged = {int(m.group(1)): float(m.group(3)) for m in LINE.finditer(out)}
    board = {e.step: e.value for e in acc.Scalars("train/loss")}
    assert sorted(board) == list(range(1, 31))
    for step, value in logged.items():
        assert board[step] == pytest.approx(value, abs=1e-6)
    # dense first layer has no router; MoE layers report a load per expert summing to 1
    fractions = [acc.Scalars(f"expert_load/layer_2/expert_{e}")[-1].value for e in range(4)]
    assert sum(fractions) == pytest.approx(1.0, abs=1e-5)
    assert "expert_load/layer_1/imbalance" not in tags


def test_elastic_scalars_are_consistent(run):
    run_dir, _ = run
    acc = _events(run_dir)
    largest = {e.step: e.value for e in acc.Scalars("elastic/loss_largest")}
    board = {e.step: e.value for e in acc.Scalars("train/loss")}
    assert largest == pytest.approx(board)  # the iteration line reports the largest sub-network
    smallest = [e.value for e in acc.Scalars("elastic/loss_smallest")]
    assert smallest[-1] > min(largest.values()) - 0.5 and all(v > 0 for v in smallest)


def test_run_directory_holds_config_tokenizer_and_checkpoints(run):
    run_dir, _ = run
    assert (run_dir / "config.toml").read_text().count("[moe]") == 1
    assert (run_dir / "tokenizer.json").is_file()
    ckpts = run_dir / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "iter_0000030"
    assert sorted(p.name for p in ckpts.glob("iter_*")) == ["iter_0000015", "iter_0000030"]
    import csv

    family = list(csv.DictReader(open(run_dir / "elastic" / "family.csv")))
    assert len(family) == 8 and (run_dir / "elastic" / "pareto.png").stat().st_size > 10_000
    assert family[-1]["subnet"] == "depth=4,ffn=1,experts=4,topk=2"  # the largest is always included
    import json

    meta = json.loads((ckpts / "iter_0000030" / "meta.json").read_text())
    assert meta["iteration"] == 30 and meta["consumed_samples"] == 30 * 16
    assert meta["layout"]["ep"] == 2 and meta["layout"]["world"] == 2
