"""The learned judge (rl/judge): data, scoring, routing, agreement, launch checks, a judge killed mid-run.

* Judge data: balanced y/n labels that equal the rubric, every negative kind
  present, deterministic, held-out indices after the training ones.
* Scoring: a tiny checkpoint loaded as a judge gives p("y") equal to a direct
  fp32 forward pass over the judge's text (tests/dist/judge_worker.py).
* Agreement on a hand-made case; the routing pool and batch metrics.
* Bad input refused by `ernie rl` before any process starts (exit 2).
* End to end: RL on open_ended + arithmetic with the checkpoint as judge of
  open_ended and two judge processes, one SIGKILLed mid-run: every
  open_ended sample's reward is the judge's score, arithmetic keeps its
  verifier's, and the run completes.
"""

import json
import math
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
TASKS = "rl.tasks=[{name='open_ended'}, {name='arithmetic', options={digits=1, ops='-'}}]"
MODEL = ["model.init_method_std=0.1", "model.seq_length=40", "rl.sampling.max_new_tokens=16", TASKS]
ENV = {"PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}", "OMP_NUM_THREADS": "1"}
STEPS, KILL_AT = 6, 2


# ------------------------------------------------------------------ data
def test_judge_data_is_balanced_labelled_by_the_rubric_and_deterministic():
    from megatron_ernie.config.rl import TaskConfig
    from megatron_ernie.rl.judge.data import NEGATIVE_KINDS, judge_examples, split_indices
    from megatron_ernie.rl.tasks.open_ended import parse_reference, rubric_score, make_example

    for count in (1, 3, 5):
        task = TaskConfig(name="open_ended", options={"count": count})
        examples = judge_examples((task,), 100, 240, seed=3)
        assert sum(e.verdict == "y" for e in examples) == 120
        assert {e.kind for e in examples} == {"right", *NEGATIVE_KINDS}
        for e in examples:
            n, words = parse_reference(make_example(task.seed, e.index, {"count": count}).reference)
            assert e.rubric == rubric_score(e.response, n, words)
            assert (e.verdict == "y") == (e.rubric == 1.0)
        assert [e.response for e in judge_examples((task,), 100, 240, seed=3)] == [e.response for e in examples]
        assert [e.response for e in judge_examples((task,), 100, 240, seed=4)] != [e.response for e in examples]
    assert split_indices(2_000_000, 500) == (2_000_000, 2_000_500)


def test_judge_data_has_the_pseudo_words_a_sampling_policy_writes():
    """"pseudo": no item is a word of any category (rubric 0); "partial": some right words, the rest
    pseudo-words, so the rubric lies strictly between 0 and 1 whenever count > 1."""
    from megatron_ernie.config.rl import TaskConfig
    from megatron_ernie.rl.judge.data import judge_examples
    from megatron_ernie.rl.tasks.open_ended import CATEGORIES, response_items

    every_word = {w for words in CATEGORIES.values() for w in words}
    for count in (1, 2, 5):
        examples = judge_examples((TaskConfig(name="open_ended", options={"count": count}),), 0, 400, seed=5)
        pseudo = [e for e in examples if e.kind == "pseudo"]
        partial = [e for e in examples if e.kind == "partial"]
        assert len(pseudo) == len(partial) == 25
        for e in pseudo:
            items = response_items(e.response)
            assert len(items) == count and not set(items) & every_word and e.rubric == 0.0
        for e in partial:
            assert e.verdict == "n" and len(response_items(e.response)) == count
            assert (0.0 < e.rubric < 1.0) if count > 1 else e.rubric == 0.0


def test_judge_data_cli_writes_sft_jsonl_with_held_out_lines_last(tmp_path):
    from megatron_ernie.data.sft import read_jsonl
    from megatron_ernie.rl.judge.data import main

    out = tmp_path / "judge.jsonl"
    assert main(["--out", str(out), "--examples", "30", "--valid", "6", "--first-index", "50"]) == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["index"] for r in lines] == list(range(50, 86))
    assert all(r["prompt"].endswith("\n") and r["response"] in "yn" for r in lines)
    assert read_jsonl(str(out))[0].turns == (("model", lines[0]["response"]),)
    assert main(["--out", str(out), "--examples", "8", "--valid", "2", "--verdicts", "items"]) == 0
    items = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["kind"] for r in items[::2]] == ["right"] * 5 and {r["kind"] for r in items[1::2]} == {
        "other_category", "pseudo", "misspelt"}
    assert all("," not in r["prompt"] and r["prompt"].count(":") == 1 for r in items)


def test_sft_source_judge_and_bad_tasks():
    from megatron_ernie.config.errors import ConfigError
    from megatron_ernie.config.rl import TaskConfig
    from megatron_ernie.config.sft import SFTConfig
    from megatron_ernie.data.sft import sft_examples

    sft = SFTConfig(source="judge", num_examples=20, valid_examples=4, first_index=8)
    sft.validate("sft")
    train, valid = sft_examples(sft, (TaskConfig(name="open_ended"),))
    assert len(train) == 20 and len(valid) == 4 and train[0].turns[0][1] == "y" and train[1].turns[0][1] == "n"
    with pytest.raises(ConfigError, match="rubric tasks only"):
        sft_examples(sft, (TaskConfig(name="arithmetic"),))


def test_per_item_judge_data_labels_each_item_by_membership():
    """Per-item examples ("fruit:" + "plum" -> y): balanced, labelled by membership in the prompt's
    category, every negative kind present, deterministic; kinds in ITEM_NEGATIVE_KINDS."""
    from megatron_ernie.config.rl import TaskConfig
    from megatron_ernie.rl.judge.data import ITEM_NEGATIVE_KINDS, judge_examples
    from megatron_ernie.rl.tasks.open_ended import CATEGORIES, make_example

    task = TaskConfig(name="open_ended", options={"count": 2, "categories": ["fruit", "tool", "color"]}, seed=4)
    examples = judge_examples((task,), 30, 300, seed=2, verdicts="items")
    assert sum(e.verdict == "y" for e in examples) == 150
    assert {e.kind for e in examples} == {"right", *ITEM_NEGATIVE_KINDS}
    every_word = {w for ws in CATEGORIES.values() for w in ws}
    for e in examples:
        category = make_example(task.seed, e.index, dict(task.options)).prompt.split(" ")[1]
        assert e.prompt == category and "," not in e.response
        assert (e.verdict == "y") == (e.rubric == 1.0) == (e.response in CATEGORIES[category.rstrip(":")])
        assert (e.response in every_word) == (e.kind in ("right", "other_category"))
    again = judge_examples((task,), 30, 300, seed=2, verdicts="items")
    assert [e.response for e in again] == [e.response for e in examples]


def test_per_item_aggregate_with_exact_membership_is_the_rubric():
    """With p(y) = 1 for words of the category and 0 otherwise, the per-item aggregate IS the rubric, on
    every kind of whole-answer example (repeats, too many, too few, pseudo-words, partial answers)."""
    from megatron_ernie.config.rl import TaskConfig
    from megatron_ernie.rl.judge.data import judge_examples, open_ended_item_questions
    from megatron_ernie.rl.tasks.open_ended import CATEGORIES

    for count in (1, 3, 5):
        for e in judge_examples((TaskConfig(name="open_ended", options={"count": count}),), 0, 160, seed=count):
            questions, aggregate = open_ended_item_questions(e.prompt, e.response)
            exact = [float(item in CATEGORIES[category.rstrip(":")]) for category, item in questions]
            assert aggregate(exact) == pytest.approx(e.rubric), (e.kind, e.prompt, e.response)
            assert len(questions) == len(set(q for _, q in questions))
    assert open_ended_item_questions("two fruit:", "")[1]([]) == 0.0


def test_sft_source_judge_items_and_the_pipeline_keeps_it(tmp_path):
    from megatron_ernie.config.errors import ConfigError
    from megatron_ernie.config.rl import TaskConfig
    from megatron_ernie.config.sft import SFTConfig
    from megatron_ernie.data.sft import sft_examples
    from megatron_ernie.rl.judge.scorer import judge_verdicts

    sft = SFTConfig(source="judge-items", num_examples=10, valid_examples=4)
    sft.validate("sft")
    train, _ = sft_examples(sft, (TaskConfig(name="open_ended"),))
    assert train[0].prompt.count(":") == 1 and train[0].prompt.endswith("\n") and "," not in train[0].prompt
    with pytest.raises(ConfigError, match="items judge data is made for rubric tasks only"):
        sft_examples(sft, (TaskConfig(name="arithmetic"),))
    with pytest.raises(ConfigError) as err:
        SFTConfig(source="judge-item").validate("sft")
    assert err.value.field == "sft.source" and "judge-items" in str(err.value)
    assert [judge_verdicts(SimpleNamespace(sft=SimpleNamespace(source=s))) for s in
            ("judge-items", "judge", "tasks", "my.jsonl")] == ["items", "response", "response", "response"]


# ------------------------------------------------------------- agreement
def test_agreement_on_a_hand_made_case():
    from megatron_ernie.rl.judge.agreement import agreement

    scores = [0.9, 0.8, 0.2, 0.6, 0.1]
    rubric = [1.0, 1.0, 2 / 3, 1 / 3, 0.0]
    a = agreement(scores, rubric)
    assert a.examples == 5 and a.accuracy == pytest.approx(4 / 5)  # 0.6 on a 1/3 answer says y: wrong
    mx, my = sum(scores) / 5, sum(rubric) / 5
    r = sum((x - mx) * (y - my) for x, y in zip(scores, rubric)) / math.sqrt(
        sum((x - mx) ** 2 for x in scores) * sum((y - my) ** 2 for y in rubric))
    assert a.correlation == pytest.approx(r) and 0.7 < a.correlation < 0.9
    assert a.mean_score_yes == pytest.approx(0.85) and a.mean_score_no == pytest.approx(0.3)
    assert a.mean_abs_error == pytest.approx((0.1 + 0.2 + abs(0.2 - 2 / 3) + abs(0.6 - 1 / 3) + 0.1) / 5)
    assert "mean |score - rubric| 0.227" in a.line()
    assert agreement([0.4, 0.6], [1.0, 0.0]).accuracy == 0.0
    assert math.isnan(agreement([0.5, 0.5], [1.0, 0.0]).correlation)
    with pytest.raises(ValueError):
        agreement([0.5], [1.0, 0.0])


def test_agreement_by_kind_shows_what_the_judge_reads():
    from dataclasses import replace

    from megatron_ernie.rl.judge.agreement import agreement, mean_by_kind

    kinds = ["right", "pseudo", "right", "too_few", "pseudo"]
    by_kind = mean_by_kind(kinds, [0.9, 0.5, 0.7, 0.1, 0.3])
    assert list(by_kind) == ["right", "pseudo", "too_few"]
    assert by_kind == pytest.approx({"right": 0.8, "pseudo": 0.4, "too_few": 0.1})
    a = replace(agreement([0.9, 0.1], [1.0, 0.0]), by_kind=by_kind)
    assert a.line().endswith("mean p(y) by kind: right 0.80, pseudo 0.40, too_few 0.10")
    assert "by kind" not in agreement([0.9, 0.1], [1.0, 0.0]).line()


# --------------------------------------------------------------- routing
def scored(task, reward, rubric=None):
    return SimpleNamespace(sample=SimpleNamespace(task=task), reward=reward, rubric_reward=rubric)


def test_judge_pool_takes_only_judged_tasks_not_yet_judged_and_only_judges():
    from megatron_ernie.config.rl import JudgeConfig
    from megatron_ernie.rl.judge.routing import JudgePool

    pool = JudgePool(JudgeConfig("j", ("open_ended",)), patience_s=10, startup_patience_s=100)
    assert pool.judges(scored("open_ended", 1.0)) and not pool.judges(scored("arithmetic", 1.0))
    assert not pool.judges(scored("open_ended", 0.3, rubric=1.0))  # already judged
    peers = [SimpleNamespace(role="teacher", alias="judge", alive=True, ready=True, rank=0),
             SimpleNamespace(role="judge", alias="judge", alive=True, ready=True, rank=1),
             SimpleNamespace(role="judge", alias="judge", alive=True, ready=True, rank=2)]
    assert [pool.pick("judge", peers).rank for _ in range(3)] == [1, 2, 1]
    pool.wait(scored("open_ended", 1.0))
    pool.stalled(0, [])
    assert "no live judge" in pool.stalled(101, []) and "--judge-workers" in pool.stalled(101, [])


def test_judge_metrics_put_the_rubric_next_to_the_score():
    from megatron_ernie.rl.judge.routing import judge_metrics

    batch = [scored("open_ended", 0.9, 1.0), scored("open_ended", 0.7, 1 / 3), scored("arithmetic", 1.0)]
    m = judge_metrics(batch)
    assert m["judge/samples"] == 2 and m["judge/score"] == pytest.approx(0.8)
    assert m["judge/rubric_reward"] == pytest.approx(2 / 3) and m["judge/agreement"] == pytest.approx(0.5)
    assert judge_metrics([scored("arithmetic", 1.0)]) == {}


def test_overoptimisation_watch_flags_a_judge_that_rises_while_the_rubric_does_not(caplog):
    """Gao et al.'s pattern on hand-made per-step means: windows of 3 steps, before vs after."""
    from megatron_ernie.rl.judge.routing import OveroptimisationWatch

    def feed(watch, steps):
        return [watch.update({"judge/score": j, "judge/rubric_reward": r}) for j, r in steps]

    rising_judge = [(0.2, 0.10), (0.2, 0.10), (0.2, 0.10), (0.3, 0.08), (0.3, 0.08), (0.3, 0.08)]
    with caplog.at_level("WARNING", logger="megatron_ernie.rl"):
        out = feed(OveroptimisationWatch(3), rising_judge)
    assert out[:5] == [{}] * 5  # two full windows first
    assert out[5] == pytest.approx({"judge/score_trend": 0.1, "judge/rubric_trend": -0.02, "judge/divergence": 0.12})
    assert "judge over-optimisation" in caplog.text and "fell (-0.020)" in caplog.text
    caplog.clear()
    both_rise = [(0.2, 0.1)] * 3 + [(0.3, 0.2)] * 3  # the rubric follows the judge: no warning
    with caplog.at_level("WARNING", logger="megatron_ernie.rl"):
        assert feed(OveroptimisationWatch(3), both_rise)[5]["judge/divergence"] == pytest.approx(0.0)
    assert caplog.text == ""
    assert feed(OveroptimisationWatch(0), rising_judge) == [{}] * 6  # off
    assert OveroptimisationWatch(3).update({"reward/mean": 1.0}) == {}  # no judged samples in the batch


def test_judge_config_errors():
    from megatron_ernie.config.errors import ConfigError
    from megatron_ernie.config.rl import JudgeConfig, RLConfig, TaskConfig

    tasks = (TaskConfig(name="open_ended"),)
    for judge, field in ((JudgeConfig("j", ("arithmetic",)), "rl.judge.tasks"),
                         (JudgeConfig("", ("open_ended",)), "rl.judge.checkpoint"),
                         (JudgeConfig("j", ()), "rl.judge.tasks"),
                         (JudgeConfig("j", ("open_ended",), watch_window=-1), "rl.judge.watch_window")):
        with pytest.raises(ConfigError) as err:
            RLConfig(tasks=tasks, judge=judge).validate("rl")
        assert err.value.field == field


# ---------------------------------------------------------------- scoring
@pytest.fixture(scope="module")
def judge_checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("judge")
    case = {"run_dir": str(out / "base"), "overrides": MODEL}
    torchrun(1, [ROOT / "tests" / "dist" / "judge_worker.py", "checkpoint", out / "result.json", json.dumps(case)],
             timeout=600)
    result = json.loads((out / "result.json").read_text())
    return Path(result["checkpoint"]), result


@pytest.mark.slow
def test_judge_score_equals_p_yes_of_a_direct_forward(judge_checkpoint):
    r = judge_checkpoint[1]
    assert r["order_ok"] and len(r["scores"]) == 5
    assert max(r["lengths"]) > r["max_length"]  # one sample is longer than the judge reads: cut, separator kept
    for got, want in zip(r["scores"], r["direct"]):
        assert abs(got - want) < 1e-6
    assert len(set(round(s, 6) for s in r["scores"])) == 5  # different texts, different scores
    assert r["rubric"] == r["given"]  # the rubric reward is kept next to the judge's score
    assert r["statuses"] == ["wrong", "ok", "ok", "ok", "ok"]


@pytest.mark.slow
def test_per_item_judge_score_is_the_count_rule_over_direct_item_answers(judge_checkpoint):
    """A per-item judge (sft.source = "judge-items") asks one question per distinct item, batched across
    samples (2 per forward here), and aggregates as the rubric counts: equal to doing it by hand."""
    r = judge_checkpoint[1]
    assert r["item_questions"] == [3, 0, 1, 7, 1]  # "red,red" asks once; the cut sample asks about "arm" only
    for got, want in zip(r["item_scores"], r["item_direct"]):
        assert abs(got - want) < 1e-6
    assert r["item_scores"][1] == 0.0 and 0 < r["item_scores"][2] <= 1 / 2  # empty; one distinct of two listed
    assert r["item_scores"][3] <= 3 / 7 + 1e-9  # seven listed for three asked: diluted like the rubric
    assert r["item_rubric"] == r["given"]


# --------------------------------------------------------------- bad input
def judge_sets(ckpt: Path, judge, tasks=("open_ended",), *extra: str) -> list[str]:
    sets = [*MODEL, f'checkpoint.load="{ckpt}"', f'rl.judge.checkpoint="{judge}"',
            "rl.judge.tasks=[" + ", ".join(f"'{t}'" for t in tasks) + "]", "log.tensorboard=false",
            "checkpoint.save_on_exit=false", *extra]
    return [arg for s in sets for arg in ("--set", s)]


@pytest.mark.slow
@pytest.mark.parametrize("case", ["missing", "tokenizer", "task", "short_context", "items_task"])
def test_bad_judge_setup_is_refused_before_anything_starts(judge_checkpoint, tmp_path, capsys, case):
    from megatron_ernie.data.char_tokenizer import CharTokenizer
    from megatron_ernie.rl.main import main

    ckpt = judge_checkpoint[0]
    judge, tasks = tmp_path / "judge", ("open_ended",)
    shutil.copytree(ckpt, judge)
    if case == "missing":
        judge = tmp_path / "nowhere"
        expected = ["rl.judge.checkpoint", str(judge)]
    elif case == "tokenizer":
        CharTokenizer("abcdefghijklmnopqrstuvwxyz,: \n0123456789-=").save(judge / "tokenizer.json")
        expected = ["rl.judge.checkpoint", str(judge / "tokenizer.json"), str(ckpt / "tokenizer.json")]
    elif case == "task":
        tasks = ("open_ended", "poetry")
        expected = ["rl.judge.tasks", "poetry"]
    elif case == "items_task":  # a per-item judge cannot split an arithmetic answer into items
        text = (judge / "config.toml").read_text()
        (judge / "config.toml").write_text(text.replace('source = "tasks"', 'source = "judge-items"', 1))
        tasks = ("open_ended", "arithmetic")
        expected = ["rl.judge.checkpoint", "per-item verdicts", "['arithmetic']"]
    else:
        text = (judge / "config.toml").read_text().replace("seq_length = 40", "seq_length = 20")
        (judge / "config.toml").write_text(text)
        expected = ["rl.judge.checkpoint", "model.seq_length = 20"]
    code = main(["--config", str(CONFIG), *judge_sets(ckpt, judge, tasks, f'run.dir="{tmp_path / "run"}"')])
    err = capsys.readouterr().err
    assert code == 2, err
    for text in expected:
        assert text in err, (text, err)
    assert not (tmp_path / "run" / "rl").exists()


# --------------------------------------------------------------- end to end
def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "rl" / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture(scope="module")
def judged_run(judge_checkpoint, tmp_path_factory):
    ckpt = judge_checkpoint[0]
    run_dir = tmp_path_factory.mktemp("judge-e2e") / "run"
    cmd = [sys.executable, "-m", "megatron_ernie.rl.main", "--config", str(CONFIG),
           *judge_sets(ckpt, ckpt, ("open_ended",), f'run.dir="{run_dir}"', f"train.iters={STEPS}"),
           "--judge-workers", "2", "--rollout-workers", "1", "--reward-workers", "1"]
    run_dir.mkdir(parents=True)
    killed = None
    with open(run_dir.parent / "judge.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **ENV}, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 600
        while killed is None and time.monotonic() < deadline and proc.poll() is None:
            if len(read_metrics(run_dir)) >= KILL_AT:
                roles = json.loads((run_dir / "rl" / "roles.json").read_text())
                killed = next(r["pid"] for r in roles if r["role"] == "judge" and r["rank"] == 0)
                os.kill(killed, signal.SIGSTOP)  # holds samples it never answers ...
                time.sleep(1.5)
                os.kill(killed, signal.SIGKILL)  # ... which the other judge rescores
            time.sleep(0.1)
        code = proc.wait(timeout=600)
    return {"code": code, "killed": killed, "metrics": read_metrics(run_dir),
            "log": (run_dir.parent / "judge.log").read_text()}


@pytest.mark.slow
def test_open_ended_rewards_are_the_judge_scores_and_arithmetic_keeps_its_verifier(judged_run):
    run = judged_run
    assert run["code"] == 0 and run["killed"], run["log"][-4000:]
    assert [m["step"] for m in run["metrics"]] == list(range(1, STEPS + 1))
    batch = 8 * 8
    judged = [m for m in run["metrics"] if "reward/open_ended" in m]
    assert len(judged) >= STEPS // 2  # the prompt mix draws tasks at random: most batches hold both
    for m in run["metrics"]:
        if "reward/open_ended" not in m:  # a batch of arithmetic only: nothing for the judge
            assert "judge/samples" not in m
            continue
        # only open_ended is judged: every sample when the batch is open_ended alone (which group arrives
        # first is timing: a batch may hold one task only), fewer when arithmetic shares the batch
        assert 0 < m["judge/samples"] <= batch
        assert (m["judge/samples"] < batch) == ("reward/arithmetic" in m)
        assert m["reward/open_ended"] == pytest.approx(m["judge/score"], abs=1e-9)
        assert 0 <= m["judge/rubric_reward"] <= 1
        arithmetic = batch - m["judge/samples"]  # the verifier's 0/1 rewards: their sum is a whole number
        if arithmetic:
            assert m["reward/arithmetic"] * arithmetic == pytest.approx(
                round(m["reward/arithmetic"] * arithmetic), abs=1e-6)
    scores = [m["judge/score"] for m in judged]
    assert all(0 < s < 1 for s in scores)  # probabilities of a random judge, never a 0/1 verdict
    last = run["metrics"][-1]
    assert last["faults/judges_died"] == 1 and last["faults/judge_rescored"] > 0
    assert f"judge0 (pid {run['killed']}) is dead" in run["log"]
