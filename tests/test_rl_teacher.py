"""The teacher role of on-policy distillation (rl/teacher): scoring, routing, launch checks, faults.

* A checkpoint of a tiny MoE is written once (tests/dist/teacher_worker.py),
  loaded as a teacher, and its log-probs compared with a direct forward pass
  of the saved model, for both payloads.
* Bad input is refused by `ernie rl` before any process starts (exit 2, the
  message names the field and the files).
* One end-to-end launch distils the student from itself (teacher = its own
  initial checkpoint) with two aliases (two tasks, two teacher processes per
  alias): first-step k1 and advantages ~0, every sample scored by the teacher
  its task is routed to, and a teacher of alias "a" stopped then SIGKILLed
  mid-run has its samples rescored by the other one while the run completes.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from harness import ROOT, torchrun

CONFIG = ROOT / "configs" / "rl_tiny_cpu.toml"
TASKS = ("rl.tasks=[{name='arith_a', module='opd_test_tasks', options={digits=1, ops='-'}}, "
         "{name='arith_b', module='opd_test_tasks', seed=1, options={digits=1, ops='-'}}]")
ENV = {"PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}", "OMP_NUM_THREADS": "1"}
STEPS, KILL_AT = 12, 3


@pytest.fixture(scope="module")
def teacher_checkpoint(tmp_path_factory):
    """A complete tiny checkpoint (config.toml, tokenizer.json, weights) and the scorer comparison results."""
    out = tmp_path_factory.mktemp("teacher")
    case = {"run_dir": str(out / "base"), "overrides": ["model.init_method_std=0.1"]}
    torchrun(1, [ROOT / "tests" / "dist" / "teacher_worker.py", "checkpoint", out / "result.json", json.dumps(case)],
             timeout=600)
    result = json.loads((out / "result.json").read_text())
    return Path(result["checkpoint"]), result


def opd_sets(student: Path, teachers: dict, routes: dict, *extra: str) -> list[str]:
    toml = lambda d: "{" + ", ".join(f'{k}="{v}"' for k, v in d.items()) + "}"  # noqa: E731
    sets = [f'checkpoint.load="{student}"', 'rl.algorithm.advantage="opd"', f"rl.distill.teachers={toml(teachers)}",
            f"rl.distill.routes={toml(routes)}", TASKS, "log.tensorboard=false", "checkpoint.save_on_exit=false",
            *extra]
    return [arg for s in sets for arg in ("--set", s)]


# ------------------------------------------------------------------ scoring
@pytest.mark.slow
@pytest.mark.parametrize("payload", ["sampled", "full"])
def test_teacher_logprobs_equal_a_direct_forward_of_the_checkpoint(teacher_checkpoint, payload):
    r = teacher_checkpoint[1][payload]
    lengths = teacher_checkpoint[1]["lengths"]
    assert 0 in lengths and max(lengths) >= 5  # an empty response and one much longer than the others
    assert r["count"] == 10 and r["order_ok"] and r["teachers"] == ["t"]
    assert r["vocab"] == r["teacher_vocab"] == 14  # the real vocabulary, not the padded 128
    assert r["shapes_ok"]  # [R, V] rows for "full", none for "sampled"
    assert r["sampled_max_diff"] < 1e-5
    assert r["full_max_diff"] < 1e-5
    assert r["row_sum_max_dev"] < 1e-5  # rows are distributions at temperature 1


# --------------------------------------------------------------- routing pool
def peer(alias, rank, alive=True, ready=True):
    return SimpleNamespace(role="teacher", alias=alias, rank=rank, alive=alive, ready=ready)


def scored(task):
    return SimpleNamespace(sample=SimpleNamespace(task=task))


def test_pool_routes_by_task_round_robin_and_only_to_ready_live_teachers():
    from megatron_ernie.rl.teacher.routing import TeacherPool

    distill = SimpleNamespace(routes={"x": "a", "y": "b"}, aliases=("a", "b"))
    pool = TeacherPool(distill, patience_s=10, startup_patience_s=100)
    peers = [peer("a", 0), peer("b", 1), peer("a", 2), peer("b", 3, ready=False), peer("a", 4, alive=False)]
    picks = [pool.pick(pool.alias_of(scored("x")), peers).rank for _ in range(4)]
    assert picks == [0, 2, 0, 2]
    assert [pool.pick("b", peers).rank for _ in range(3)] == [1, 1, 1]
    peers[1].alive = False
    assert pool.pick("b", peers) is None


def test_pool_gives_up_only_when_samples_wait_with_no_live_teacher():
    from megatron_ernie.rl.teacher.routing import TeacherPool

    distill = SimpleNamespace(routes={"x": "a"}, aliases=("a",))
    pool = TeacherPool(distill, patience_s=10, startup_patience_s=100)
    loading = [peer("a", 0, ready=False)]
    pool.wait(scored("x"))
    assert pool.stalled(0, loading) == "" and pool.stalled(500, loading) == ""  # alive (loading): wait
    assert pool.stalled(600, []) == ""  # the clock starts now: no teacher ever joined -> startup patience
    assert pool.stalled(650, []) == ""
    assert "none ever connected" in pool.stalled(701, [])
    pool.joined.add("a")
    pool.last_death["a"] = "teacher0 (pid 7): connection closed"
    message = pool.stalled(712, [])
    assert "rl.distill.teachers.a" in message and "teacher0 (pid 7)" in message and "1 samples waiting" in message
    assert len(pool.take_waiting("a")) == 1 and pool.stalled(800, []) == ""  # nothing waits: nothing to stop


# ---------------------------------------------------------------- bad input
def ernie_rl(capsys, student, teachers, routes, *extra):
    from megatron_ernie.rl.main import main

    code = main(["--config", str(CONFIG), *opd_sets(student, teachers, routes, *extra)])
    return code, capsys.readouterr().err


@pytest.mark.slow
def test_tokenizer_mismatch_is_refused_naming_both_files(teacher_checkpoint, tmp_path, capsys):
    from megatron_ernie.data.char_tokenizer import CharTokenizer

    ckpt = teacher_checkpoint[0]
    other = tmp_path / "other"
    shutil.copytree(ckpt, other)
    CharTokenizer("0123456789+-=").save(other / "tokenizer.json")  # one more character: other ids
    code, err = ernie_rl(capsys, ckpt, {"a": other, "b": ckpt}, {"arith_a": "a", "arith_b": "b"},
                         f'run.dir="{tmp_path / "run"}"')
    assert code == 2
    assert "rl.distill.teachers.a" in err and str(other / "tokenizer.json") in err
    assert str(ckpt / "tokenizer.json") in err and "differs" in err
    assert not (tmp_path / "run" / "rl").exists()  # nothing started


@pytest.mark.slow
def test_cli_exit_2_for_a_missing_teacher_checkpoint(teacher_checkpoint, tmp_path):
    ckpt = teacher_checkpoint[0]
    cmd = [sys.executable, "-m", "megatron_ernie.cli", "rl", "--config", str(CONFIG),
           *opd_sets(ckpt, {"a": tmp_path / "nowhere", "b": ckpt}, {"arith_a": "a", "arith_b": "b"},
                     f'run.dir="{tmp_path / "run"}"')]
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, **ENV}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "rl.distill.teachers.a" in proc.stderr and str(tmp_path / "nowhere") in proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize("case", ["no_config", "empty_dir", "short_context", "unmapped_task", "temperature",
                                  "unknown_alias"])
def test_bad_teacher_setup_is_a_clear_error(teacher_checkpoint, tmp_path, capsys, case):
    ckpt = teacher_checkpoint[0]
    broken = tmp_path / "broken"
    shutil.copytree(ckpt, broken)
    teachers, routes = {"a": broken, "b": ckpt}, {"arith_a": "a", "arith_b": "b"}
    extra = [f'run.dir="{tmp_path / "run"}"']
    if case == "no_config":
        (broken / "config.toml").unlink()
        expected = ["rl.distill.teachers.a", str(broken / "config.toml")]
    elif case == "empty_dir":
        shutil.rmtree(broken)
        broken.mkdir()
        expected = ["rl.distill.teachers.a", "holds no checkpoint"]
    elif case == "short_context":
        text = (broken / "config.toml").read_text().replace("seq_length = 16", "seq_length = 8")
        (broken / "config.toml").write_text(text)
        expected = ["rl.distill.teachers.a", "model.seq_length = 8"]
    elif case == "unmapped_task":
        routes = {"arith_a": "a"}
        expected = ["rl.distill.routes", "arith_b"]
    elif case == "temperature":
        extra.append("rl.sampling.temperature=0.7")
        expected = ["rl.sampling.temperature", "0.7"]
    else:
        routes = {"arith_a": "a", "arith_b": "c"}
        expected = ["rl.distill.routes.arith_b", "'c'"]
    code, err = ernie_rl(capsys, ckpt, teachers, routes, *extra)
    assert code == 2, err
    for text in expected:
        assert text in err, (text, err)


# --------------------------------------------------------------- end to end
def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "rl" / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def stop_then_kill_teacher(run_dir: Path, proc, rank: int, step: int, timeout_s: float) -> int:
    """Freeze teacher `rank` (it keeps receiving samples it never answers), then SIGKILL it; its pid."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        if len(read_metrics(run_dir)) >= step:
            roles = json.loads((run_dir / "rl" / "roles.json").read_text())
            pid = next(r["pid"] for r in roles if r["role"] == "teacher" and r["rank"] == rank)
            os.kill(pid, signal.SIGSTOP)
            time.sleep(1.5)
            os.kill(pid, signal.SIGKILL)
            return pid
        time.sleep(0.1)
    raise AssertionError(f"the run did not reach step {step}: {(run_dir.parent / 'opd.log').read_text()[-4000:]}")


@pytest.fixture(scope="module")
def self_distillation(teacher_checkpoint, tmp_path_factory):
    ckpt = teacher_checkpoint[0]
    run_dir = tmp_path_factory.mktemp("opd-e2e") / "run"
    cmd = [sys.executable, "-m", "megatron_ernie.rl.main", "--config", str(CONFIG),
           *opd_sets(ckpt, {"a": ckpt, "b": ckpt}, {"arith_a": "a", "arith_b": "b"}, f'run.dir="{run_dir}"',
                     f"train.iters={STEPS}"),
           "--teacher-workers", "2", "--rollout-workers", "1", "--reward-workers", "0"]
    run_dir.mkdir(parents=True)
    with open(run_dir.parent / "opd.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **ENV}, stdout=log, stderr=subprocess.STDOUT)
        killed = stop_then_kill_teacher(run_dir, proc, 0, KILL_AT, timeout_s=600)
        code = proc.wait(timeout=600)
    return {"code": code, "killed": killed, "metrics": read_metrics(run_dir),
            "log": (run_dir.parent / "opd.log").read_text(),
            "roles": json.loads((run_dir / "rl" / "roles.json").read_text())}


@pytest.mark.slow
def test_run_completes_after_a_teacher_is_killed_and_its_samples_are_rescored(self_distillation):
    run = self_distillation
    assert run["code"] == 0, run["log"][-4000:]
    assert [m["step"] for m in run["metrics"]] == list(range(1, STEPS + 1))
    last = run["metrics"][-1]
    assert last["faults/teachers_died"] == 1
    assert last["faults/teacher_rescored"] > 0  # the frozen teacher held samples; the other "a" teacher scored them
    assert f"teacher0 (pid {run['killed']}) is dead" in run["log"]
    teachers = sorted((r["rank"], r["alive"]) for r in run["roles"] if r["role"] == "teacher")
    assert teachers == [(0, False), (1, True), (2, True), (3, True)]


@pytest.mark.slow
def test_every_sample_is_scored_by_the_teacher_its_task_is_routed_to(self_distillation):
    batch = 8 * 8  # rl_tiny_cpu: prompts_per_step x n_per_prompt
    totals = {}
    for m in self_distillation["metrics"]:
        pairs = {k: v for k, v in m.items() if k.startswith("teacher/") and "/task_" in k}
        assert set(pairs) <= {"teacher/a/task_arith_a", "teacher/b/task_arith_b"}, pairs
        assert sum(pairs.values()) == batch
        for k, v in pairs.items():
            totals[k] = totals.get(k, 0) + v
    assert min(totals.values()) > 0.3 * STEPS * batch  # both tasks drawn, both teachers used
    assert any(m.get("teacher/a/score_s", 0) > 0 for m in self_distillation["metrics"])


@pytest.mark.slow
def test_self_distillation_starts_at_zero_kl_and_zero_advantage(self_distillation):
    first = self_distillation["metrics"][0]
    for alias in ("a", "b"):
        # the student IS the teacher at step 1: only bf16-rollout routing replay separates them
        assert abs(first[f"distill/{alias}/k1"]) <= 0.01
        assert first[f"distill/{alias}/abs_adv"] < 1e-3
    print(f"\nfirst step: k1 a={first['distill/a/k1']:.2e} b={first['distill/b/k1']:.2e}, "
          f"|A| a={first['distill/a/abs_adv']:.2e}")
