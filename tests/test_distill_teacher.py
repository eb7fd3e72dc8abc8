"""Distillation from a frozen teacher during pretraining (`ernie pretrain --teacher`, `[distill]`).

One torchrun launch (tests/dist/distill_worker.py, 2 processes) trains a tiny
MoE student for 3 steps without a teacher, with a differently sized trained
teacher at weight 0 and 0.5 at four layouts (DP2, TP2, PP2, EP2), with its own
initial weights as the teacher, and computes the first step's KL by hand from
the two models' full softmaxes. The refusals run through the CLI in this
process (one line, exit 2), except the layout misfit, which needs 2 processes.
Everything that uses the launch is marked slow; the config and SFT checks are not.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path

import pytest

from megatron_ernie import cli
from megatron_ernie import config as C
from megatron_ernie.config.errors import ConfigError

from harness import ROOT, torchrun

ITERS = 3
SLOW = pytest.mark.slow  # the cases behind the `distilled` fixture: one 2-process launch, ~3 min on 2 cores


@pytest.fixture(scope="module")
def distilled(tmp_path_factory, data_cache) -> dict:
    tmp = tmp_path_factory.mktemp("distill")
    out = tmp / "result.json"
    case = {"iters": ITERS, "teacher_iters": 4}
    torchrun(2, [ROOT / "tests" / "dist" / "distill_worker.py", out, json.dumps(case)], timeout=900)
    result = json.loads(out.read_text())
    result["student_toml"], result["tmp"] = str(tmp / "student.toml"), str(tmp)
    return result


@SLOW
def test_weight_zero_trains_exactly_as_without_a_teacher(distilled):
    plain, zero = distilled["plain"], distilled["weight0"]
    assert len(zero["losses"]) == ITERS
    assert zero["losses"] == plain["losses"]  # bit for bit
    assert all(kl > 1e-3 for kl in zero["kl"])  # the KL is still computed and logged


@SLOW
def test_own_initial_weights_as_teacher_give_zero_kl_on_the_first_step(distilled):
    self_kl = distilled["self"]["kl"][0]
    assert abs(self_kl) < 1e-6, self_kl
    assert distilled["self"]["losses"][0] == distilled["plain"]["losses"][0]


@SLOW
def test_first_step_kl_equals_the_hand_computed_kl_of_the_two_softmaxes(distilled):
    hand = distilled["hand_kl"]
    assert hand["1.0"] > 1e-2  # another model: a KL well above rounding
    assert distilled["dp2"]["kl"][0] == pytest.approx(hand["1.0"], rel=1e-5)
    assert distilled["weight0"]["kl"][0] == pytest.approx(hand["1.0"], rel=1e-5)
    assert distilled["hot"]["kl"][0] == pytest.approx(hand["2.0"], rel=1e-5)  # T^2 KL at T = 2
    assert not math.isclose(hand["1.0"], hand["2.0"], rel_tol=1e-3)


@SLOW
def test_the_kl_term_is_a_tensorboard_scalar_of_each_step(distilled):
    from megatron_ernie.observe.summary import _scalars

    scalars = _scalars(Path(distilled["tmp"]) / "distill" / "hot" / "tensorboard")
    logged = [value for _, value in scalars["train/distill_kl"]]
    assert [step for step, _ in scalars["train/distill_kl"]] == [1, 2]
    assert logged == pytest.approx(distilled["hot"]["kl"], rel=1e-6)
    assert [v for _, v in scalars["train/loss"]] == pytest.approx(distilled["hot"]["losses"], rel=1e-6)


@SLOW
def test_a_supernet_checkpoint_teaches_as_its_whole_network(distilled):
    """An untrained supernet has the plain model's initial weights (same seed): as the teacher of that
    plain model its whole network (= its largest sub-network) gives the student's own distribution."""
    assert abs(distilled["from_supernet"]["kl"][0]) < 1e-6
    assert distilled["from_supernet"]["losses"][0] == distilled["plain"]["losses"][0]


@SLOW
def test_the_kl_term_pulls_the_student_toward_the_teacher(distilled):
    """Same first step (same weights, same batch), then weight 0.5 lowers the KL faster than weight 0."""
    dist_run, zero = distilled["dp2"], distilled["weight0"]
    assert dist_run["losses"][0] == zero["losses"][0]
    assert dist_run["losses"][1:] != zero["losses"][1:]
    assert dist_run["kl"][-1] < zero["kl"][-1]


@SLOW
@pytest.mark.parametrize("ref,layout", [("dp2", "tp2"), ("dp2", "pp2"), ("dp2", "ep2"), ("self", "self_vpp")])
def test_losses_and_kl_are_the_same_at_every_layout(distilled, ref, layout):
    """DP2 vs TP2, PP2, EP2 (the 2-layer teacher); DP2 vs PP2 x VPP2 (the 4-layer own-init teacher,
    whose KL grows from 0 as the student moves)."""
    ref, got = distilled[ref], distilled[layout]
    assert len(got["losses"]) == ITERS
    assert got["losses"] == pytest.approx(ref["losses"], rel=1e-5)
    assert got["kl"] == pytest.approx(ref["kl"], abs=1e-6)  # the KL is a difference of O(6) sums
    assert max(got["kl"]) > 1e-4


@SLOW
def test_a_teacher_that_does_not_fit_the_layout_is_refused(distilled):
    misfit = distilled["misfit"]
    assert misfit["field"] == "distill.teacher"
    assert "does not fit the student's parallel layout" in misfit["message"]
    assert "pipeline*virtual_pipeline" in misfit["message"]


# ------------------------------------------------------------------- refusals through the CLI
def _ernie(argv) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        code = cli.main([str(a) for a in argv])
    return code, out.getvalue()


def _student(distilled, run_dir, *extra) -> list:
    return ["pretrain", "--config", distilled["student_toml"], "--set", f'run.dir="{run_dir}"', *extra]


REFUSALS = {
    # name: (argv after the student's config, words the one line must hold)
    "missing": (lambda t, d: ["--teacher", d / "no-such-checkpoint"], ["distill.teacher", "no such directory"]),
    "no_checkpoint_inside": (lambda t, d: ["--teacher", d], ["distill.teacher", "holds no checkpoint"]),
    "other_tokenizer": (lambda t, d: ["--teacher", t["other_vocab"]], ["distill.teacher", "tokenizer", "sha256"]),
    "weights_of_another_width": (lambda t, d: ["--teacher", t["wrong_width"]],
                                 ["distill.teacher", "padded vocabulary at TP1 is 512"]),
    "bf16_student": (lambda t, d: ["--teacher", t["trained"], "--set", 'model.dtype="bf16"'],
                     ["model.dtype", "fp32 students only"]),
    "bf16_teacher": (lambda t, d: ["--teacher", _bf16_copy(t["initial"], d)],
                     ["distill.teacher", "model.dtype = 'bf16'", "fp32 teachers only"]),
}


def _bf16_copy(checkpoint: str, into) -> str:
    """The checkpoint with a config.toml that says it was trained in bf16 (refused from its config alone)."""
    import shutil

    copy = into / "bf16"
    shutil.copytree(checkpoint, copy)
    text = (copy / "config.toml").read_text()
    assert 'dtype = "fp32"' in text
    (copy / "config.toml").write_text(text.replace('dtype = "fp32"', 'dtype = "bf16"', 1))
    return str(copy)


@SLOW
@pytest.mark.parametrize("name", sorted(REFUSALS))
def test_bad_teacher_is_one_line_exit_2_before_any_training(distilled, tmp_path, name):
    extra, words = REFUSALS[name]
    empty = tmp_path / "empty"
    empty.mkdir()
    run_dir = tmp_path / "run"
    code, text = _ernie(_student(distilled, run_dir, *extra(distilled["teachers"], empty)))
    lines = text.strip().splitlines()
    assert code == 2, text
    assert lines[-1].startswith("ernie pretrain: error: ") and "Traceback" not in text, text
    for word in words:
        assert word in lines[-1], lines[-1]
    assert not (run_dir / "config.toml").exists() and not (run_dir / "checkpoints").exists()


@SLOW
def test_a_supernet_is_refused_a_teacher_it_distils_in_place(distilled, tmp_path):
    code, text = _ernie(["pretrain", "--config", ROOT / "configs" / "tiny_cpu.toml", "--set", "parallel.expert=1",
                         "--set", f'run.dir="{tmp_path / "run"}"', "--teacher", distilled["teachers"]["trained"]])
    assert code == 2 and "Traceback" not in text
    assert "distill.teacher" in text and "elastic.distill_weight" in text


def test_sft_refuses_a_teacher(tmp_path):
    code, text = _ernie(["sft", "--config", ROOT / "configs" / "sft_tiny_cpu.toml",
                         "--set", f'run.dir="{tmp_path / "run"}"', "--set", 'distill.teacher="x"'])
    assert code == 2 and "distill.teacher" in text and "ernie pretrain" in text


def test_teacher_flag_sets_the_config_field_and_bad_values_are_named():
    parser = cli.build_parser()
    args = parser.parse_args(["pretrain", "--teacher", "runs/big/checkpoints/iter_0000100"])
    cli._with_resume(args)
    assert C.load(None, args.overrides).distill.teacher == "runs/big/checkpoints/iter_0000100"
    assert C.load(None, []).distill.enabled is False
    for key, value in (("weight", 1.5), ("weight", -0.1), ("temperature", 0.0)):
        with pytest.raises(ConfigError) as err:
            C.validate(C.load(None, [f"distill.{key}={value}"]))
        assert err.value.field == f"distill.{key}" and err.value.value == value
