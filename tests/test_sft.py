"""Supervised fine-tuning: masked samples, demonstrations, config errors, layouts, stopping.

Unit tests build SFT datasets in this process; the distributed cases (layouts,
an SFT'd model that stops after its answer, weights-only start from a base
checkpoint, resume) share ONE 2-process launch (tests/dist/sft_worker.py).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from harness import ROOT, run_worker, torchrun
from megatron_ernie import config as C
from megatron_ernie.config.rl import TaskConfig
from megatron_ernie.config.sft import SFTConfig
from megatron_ernie.data import sft as D
from megatron_ernie.rl.task_tokenizer import TOOL_ALPHABET, CharTokenizer, task_texts
from megatron_ernie.rl.tasks import get_task

TASKS = (TaskConfig("arithmetic", options={"digits": 2}), TaskConfig("calc", weight=0.5), TaskConfig("code", weight=0.5))


def _build(sft: SFTConfig, tasks=TASKS, seq_length: int = 48):
    return D.build_sft_data(sft, tasks, "", "", seq_length, (64, 8, 1))


def _epoch(dataset):
    return [dataset[i] for i in range(len(dataset.encoded))]


def _eot_targets(samples) -> int:
    return sum(int(((s["labels"] == 0) & (s["loss_mask"] > 0)).sum()) for s in samples)


@pytest.mark.parametrize("overlong", ["truncate", "drop"])
def test_supervised_eot_count_equals_untruncated_responses(overlong):
    # seq 48: code prompts (~130 chars) do not fit, calc episodes sometimes do not: both modes exercised
    data = _build(SFTConfig(num_examples=60, valid_examples=4, overlong=overlong))
    encoded = data.train.encoded
    untruncated = sum(not e.truncated for e in encoded)
    assert _eot_targets(_epoch(data.train)) == untruncated
    truncated = len(encoded) - untruncated
    if overlong == "truncate":
        assert truncated > 0  # non-vacuous: some responses were cut and their EOT is not a target
    else:
        assert truncated == 0 and len(encoded) < 60


def test_prompt_tool_output_and_padding_are_masked():
    tokenizer = CharTokenizer.train(task_texts(TASKS) + [TOOL_ALPHABET])
    calc = get_task("calc")
    example = D.SFTExample("12*3+4=", tuple(calc.demo(0, 5, {}).turns), "calc")
    enc = D.encode_example(tokenizer, example, 64, "truncate")
    sample = D.to_sample(enc, 64, tokenizer.pad_id)
    n = len(enc.ids) - 1
    labels, mask = sample["labels"].tolist(), sample["loss_mask"].tolist()
    supervised = tokenizer.decode([t for t, m in zip(labels, mask) if m])
    turns = dict(enumerate(example.turns))
    assert supervised == turns[0][1] + turns[2][1]  # model turns only ...
    assert labels[n - 1] == 0 and mask[n - 1] == 1.0  # ... and the end of text after them
    env = tokenizer.encode(turns[1][1])
    start = len(tokenizer.encode("12*3+4=")) + len(tokenizer.encode(turns[0][1])) - 1
    assert labels[start:start + len(env)] == env and not any(mask[start:start + len(env)])  # tool output
    assert not any(mask[: len(tokenizer.encode("12*3+4=")) - 1])  # prompt
    assert not any(mask[n:]) and set(labels[n:]) == {tokenizer.pad_id}  # padding
    assert sample["tokens"].tolist()[:n] == enc.ids[:-1].tolist()


def test_shipped_demos_are_right_and_wrong_on_request():
    for cfg in TASKS[:2]:  # the code task's reward runs the sandbox: checked below on its programs directly
        task = get_task(cfg.name)
        for i in range(30):
            ex = task.make_example(cfg.seed, i, cfg.options)
            assert task.score(task.demo(cfg.seed, i, cfg.options, False).text, ex.reference, None).reward == 1.0
            assert task.score(task.demo(cfg.seed, i, cfg.options, True).text, ex.reference, None).reward == 0.0


@pytest.mark.parametrize("wrong", [False, True])
def test_code_demo_programs_pass_or_fail_their_tests(wrong):
    task = get_task("code")
    for i in range(4):
        ex = task.make_example(0, i, {})
        program = task.demo(0, i, {}, wrong).text
        for test in json.loads(ex.reference)["tests"]:
            got = subprocess.run([sys.executable, "-c", program], input=test["stdin"], capture_output=True,
                                 text=True, timeout=30).stdout.strip()
            assert (got == test["stdout"]) != wrong, (program, test, got)


@pytest.mark.parametrize("fraction", [0.0, 0.25, 1.0])
def test_error_fraction_is_exact_seeded_and_verifiably_wrong(fraction):
    sft = SFTConfig(num_examples=40, valid_examples=10, error_fraction=fraction, seed=3)
    tasks = TASKS[:2]
    train = D.task_examples(sft, tasks)
    assert sum(e.wrong for e in train) == round(fraction * 40)
    assert [e.wrong for e in train] == [e.wrong for e in D.task_examples(sft, tasks)]  # seeded
    refs = [get_task(t.name).make_example(t.seed, sft.first_index + j, t.options).reference
            for t, n in zip(tasks, D.split_by_weight(40, [1.0, 0.5])) for j in range(n)]
    scores = [get_task(e.task).score("".join(x for _, x in e.turns), r, None).reward for e, r in zip(train, refs)]
    assert scores == [0.0 if e.wrong else 1.0 for e in train]
    assert not any(e.wrong for e in D.task_examples(sft, tasks, valid=True))  # validation stays correct
    if 0 < fraction < 1:
        other = D.task_examples(SFTConfig(num_examples=40, error_fraction=fraction, seed=4), tasks)
        assert [e.wrong for e in other] != [e.wrong for e in train]


def test_validation_examples_are_held_out():
    sft = SFTConfig(num_examples=30, valid_examples=6)
    train = {e.prompt + "".join(t for _, t in e.turns) for e in D.task_examples(sft, TASKS[:1])}
    valid = {e.prompt + "".join(t for _, t in e.turns) for e in D.task_examples(sft, TASKS[:1], valid=True)}
    assert len(valid) == 6 and not train & valid


def test_from_scratch_tokenizer_is_the_task_and_tool_alphabet():
    data = _build(SFTConfig(num_examples=20, valid_examples=2))
    assert data.tokenizer.alphabet == CharTokenizer.train(task_texts(TASKS) + [TOOL_ALPHABET]).alphabet


def test_epochs_are_reshuffled_and_cover_every_example():
    data = D.build_sft_data(SFTConfig(num_examples=16, valid_examples=2), TASKS[:1], "", "", 16, (48, 2, 1))
    first = [data.train[i]["tokens"].tolist() for i in range(16)]
    second = [data.train[i]["tokens"].tolist() for i in range(16, 32)]
    assert sorted(first) == sorted(second) and first != second


def test_jsonl_source(tmp_path):
    path = tmp_path / "pairs.jsonl"
    rows = [{"prompt": f"{a}+{a}=", "response": str(2 * a)} for a in range(12)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    data = D.build_sft_data(SFTConfig(source=str(path), valid_examples=2), TASKS[:1], "", "", 16, (20, 4, 1))
    assert len(data.train.encoded) == 10 and len(data.valid.encoded) == 2
    assert _eot_targets(_epoch(data.train)) == 10
    supervised = sorted(data.tokenizer.decode(s["labels"][s["loss_mask"] > 0].tolist()) for s in _epoch(data.train))
    assert supervised == sorted(str(2 * a) for a in range(10))


@pytest.mark.parametrize("line,problem", [
    ('{"prompt": "1+1="}', 'line 2: missing "response"'),
    ('{"response": "2"}', 'line 2: missing "prompt"'),
    ('{"prompt": "1+1=", "response": 2}', 'line 2: "response" is a int, not a string'),
    ('["1+1=", "2"]', "line 2: a JSON list, not an object"),
    ('{"prompt": "1+1=", ', "line 2: not valid JSON"),
])
def test_bad_jsonl_lines_name_the_line(tmp_path, line, problem):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "2+2=", "response": "4"}\n' + line + "\n")
    with pytest.raises(C.ConfigError) as err:
        D.read_jsonl(str(path))
    assert err.value.field == "sft.source" and problem in str(err.value) and str(path) in str(err.value)


def test_missing_jsonl_file_is_a_config_error(tmp_path):
    with pytest.raises(C.ConfigError, match="no such file"):
        D.read_jsonl(str(tmp_path / "nope.jsonl"))


@pytest.mark.parametrize("override,field", [
    ('sft.source="data.txt"', "sft.source"),
    ("sft.num_examples=0", "sft.num_examples"),
    ("sft.valid_examples=0", "sft.valid_examples"),
    ("sft.error_fraction=1.5", "sft.error_fraction"),
    ("sft.error_fraction=-0.1", "sft.error_fraction"),
    ('sft.overlong="wrap"', "sft.overlong"),
    ("sft.seed=-1", "sft.seed"),
    ("sft.first_index=-5", "sft.first_index"),
    ('sft.bogus=1', "sft.bogus"),
])
def test_bad_sft_config_names_the_field(override, field):
    with pytest.raises(C.ConfigError) as err:
        C.validate(C.load(None, [override]))
    assert err.value.field.startswith(field)


def test_error_fraction_needs_task_demos():
    with pytest.raises(C.ConfigError) as err:
        C.validate(C.load(None, ['sft.source="pairs.jsonl"', "sft.error_fraction=0.2"]))
    assert err.value.field == "sft.error_fraction"


def test_task_without_demo_is_a_clear_error():
    from megatron_ernie.rl.tasks import TaskExample, register_task

    register_task("nodemo_for_sft_test", lambda s, i, o: TaskExample("q", "a"), lambda r, ref, sb: 0.0, replace=True)
    with pytest.raises(C.ConfigError) as err:
        D.task_examples(SFTConfig(num_examples=2), (TaskConfig("nodemo_for_sft_test"),))
    assert err.value.field == "rl.tasks[0].name" and "no demonstrations" in str(err.value)


def test_sft_refuses_an_elastic_config():
    from megatron_ernie.train.objective import LMObjective

    with pytest.raises(C.ConfigError) as err:
        LMObjective().check(C.load(None, ["elastic.enabled=true"]))
    assert err.value.field == "elastic.enabled"


def test_sft_tiny_cpu_config_is_valid():
    cfg = C.load(ROOT / "configs" / "sft_tiny_cpu.toml")
    C.validate(cfg, 2)
    assert {t.name for t in cfg.rl.tasks} == {"arithmetic", "code", "calc", "open_ended"}


# ---------------------------------------------------------------- distributed (one launch)

MODEL = ["model.seq_length=32", "train.global_batch_size=16", "train.micro_batch_size=2",
         "sft.num_examples=96", "sft.valid_examples=4", "optimizer.lr=3e-3", "optimizer.min_lr=3e-3",
         'rl.tasks=[{name="arithmetic", options={digits=2}}, {name="calc", weight=0.5}]']
LAYOUTS = {"dp2": [], "tp2_sp": ["parallel.tensor=2", "parallel.sequence_parallel=true"],
           "pp2": ["parallel.pipeline=2"], "ep2": ["parallel.expert=2"]}
STOP_OPTIONS = {"digits": 2, "ops": "+"}
STOP = ["model.seq_length=16", "train.global_batch_size=32", "train.micro_batch_size=16", "train.iters=200",
        "sft.num_examples=3000", "sft.valid_examples=4", "optimizer.lr=3e-3", "optimizer.min_lr=3e-3",
        'rl.tasks=[{name="arithmetic", options={digits=2, ops="+"}}]']


@pytest.fixture(scope="module")
def sft_results(tmp_path_factory, data_cache):
    case = {"layouts": {"common": MODEL + ["train.iters=5"], "layouts": LAYOUTS},
            "stop": {"common": STOP, "options": STOP_OPTIONS, "eval_seed": 7, "eval_prompts": 100, "max_new": 6,
                     "resume_n": 2, "seeds": [1234, 7]}}
    return run_worker_sft(tmp_path_factory.mktemp("sft"), case)


def run_worker_sft(tmp, case) -> dict:
    out = tmp / "result.json"
    torchrun(2, [ROOT / "tests" / "dist" / "sft_worker.py", "sft", out, json.dumps(case)], timeout=1500)
    return json.loads(out.read_text())


@pytest.mark.slow
@pytest.mark.parametrize("layout", [k for k in LAYOUTS if k != "dp2"])
def test_masked_sft_loss_curve_is_layout_invariant(sft_results, layout):
    ref, got = sft_results["layouts"]["dp2"], sft_results["layouts"][layout]
    assert len(got) == len(ref) == 5
    for a, b in zip(ref, got):
        assert abs(a - b) <= 1e-5 * abs(a), (layout, ref, got)


@pytest.mark.slow
def test_masked_sft_loss_decreases(sft_results):
    ref = sft_results["layouts"]["dp2"]
    assert ref[-1] < ref[0] - 0.1, ref


@pytest.mark.slow
def test_sft_model_stops_after_its_answer(sft_results):
    """Held-out 2-digit sums after 200 SFT steps (two seeds): the answer, then end of text."""
    for r in sft_results["stop"]:
        print(f"stop rate {r['stop_rate']:.2f}, accuracy {r['accuracy']:.2f}, stop right after a number "
              f"{r['stop_after_number']:.2f}; examples {r['examples']}")
        assert r["stop_rate"] >= 0.9 and r["stop_after_number"] >= 0.9, r
        assert r["losses"][-1] < r["losses"][0] / 2


@pytest.mark.slow
def test_sft_from_base_checkpoint_takes_weights_only(sft_results):
    b, s = sft_results["base"], sft_results["stop"][0]
    assert b["iteration"] == 0 and b["consumed_samples"] == 0  # fresh progress (the base ran 200 steps)
    assert b["fingerprint"] == s["fingerprint"]  # the base's weights
    assert b["tokenizer"] == s["tokenizer"]  # the base's tokenizer
    assert b["saved_iteration"] == 2 and {"config.toml", "tokenizer.json"} <= set(b["files"])


@pytest.mark.slow
def test_sft_resume_is_exact(sft_results):
    r = sft_results["resume"]
    assert r["second"] == r["straight"][2:] and r["fp_split"] == r["fp_straight"]
