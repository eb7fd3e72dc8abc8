"""`ernie eval-tasks --config`: one definition per task (options, response budget) for every checkpoint.

The pipeline's scoreboard scores each stage's checkpoint also on domains it
was not trained on. These tests check, with the prompts and budgets actually
used, that such a cell takes the task's options and budget from the
pipeline's definition (the stage that trains the task), not from the
checkpoint (which knows only its own tasks: defaults and its own budget).

* fast: the definitions of a run config and of a pipeline (which stage's
  definition wins), the --max-new-tokens forms and their order, a scripted
  engine evaluated with and without definitions (prompts and budgets seen);
* slow: a real checkpoint whose config lists only arithmetic (budget 4), as an
  arithmetic expert of a pipeline would, scored by the pipeline's own scorer
  (the `ernie eval-tasks` subprocess it runs per stage) on open_ended defined
  by general RL with non-default options (two words of fruit, budget 12), and
  without --config for contrast.
"""

from __future__ import annotations

import dataclasses
import json
import textwrap
from pathlib import Path

import pytest

from harness import ROOT, torchrun
from megatron_ernie import config as C
from megatron_ernie.config.errors import ConfigError
from megatron_ernie.config.pipeline import ScoreConfig
from megatron_ernie.config.rl import SandboxConfig, TaskConfig
from megatron_ernie.posttrain import evaluate as E
from megatron_ernie.posttrain import pipeline as P
from megatron_ernie.posttrain.stages import load_pipeline, plan
from megatron_ernie.posttrain.task_definitions import (TaskDefinition, budgets_argument, from_run_config,
                                                       load_definitions, parse_budgets, write_tasks_file)
from megatron_ernie.rl.reward.worker import RewardWorker
from test_posttrain_eval import ScriptedEngine, _tokenizer

STAGE_TASKS = """
[[rl.tasks]]
name = "arithmetic"
options = { digits = 1, ops = "-" }
[[rl.tasks]]
name = "open_ended"
"""
GENERAL_TASKS = ('rl.tasks=[{name="arithmetic", options={digits=2}}, '
                 '{name="open_ended", options={count=2, categories=["fruit"]}}]')


def write_pipeline(tmp_path: Path, stage_tasks: str = STAGE_TASKS) -> Path:
    """Experts: arith (arithmetic, budget 4). General RL redefines both tasks (budget 12): open_ended is its
    own (two fruit), arithmetic stays the expert's (one-digit subtraction)."""
    head = (ROOT / "configs" / "rl_tiny_cpu.toml").read_text().split("[[rl.tasks]]")[0]
    (tmp_path / "stage.toml").write_text(head.replace("seq_length = 16", "seq_length = 40") + stage_tasks
                                         + "\n[rl.system]\nprompts_per_step = 8\n[slurm]\nnodes = 3\n")
    general_set = json.dumps([GENERAL_TASKS, "rl.sampling.max_new_tokens=12"])
    (tmp_path / "p.toml").write_text(textwrap.dedent(f"""
        [pipeline]
        dir = "out"
        [pipeline.sft]
        config = "stage.toml"
        steps = 3
        [pipeline.expert]
        config = "stage.toml"
        [[pipeline.experts]]
        name = "arith"
        tasks = ["arithmetic"]
        steps = 2
        set = ["rl.sampling.max_new_tokens=4"]
        [pipeline.opd]
        config = "stage.toml"
        steps = 2
        [pipeline.general]
        config = "stage.toml"
        steps = 2
        tasks = ["arithmetic", "open_ended"]
        set = {general_set}
        [pipeline.score]
        prompts = 6
        samples = 1
        """))
    return tmp_path / "p.toml"


# ------------------------------------------------------------------ definitions (fast)
def test_a_pipeline_defines_each_task_by_the_stage_that_trains_it(tmp_path):
    defined = load_definitions(str(write_pipeline(tmp_path)))
    assert defined == {
        "arithmetic": TaskDefinition(TaskConfig(name="arithmetic", options={"digits": 1, "ops": "-"}), 4),
        "open_ended": TaskDefinition(TaskConfig(name="open_ended", options={"count": 2, "categories": ["fruit"]}), 12),
    }
    assert budgets_argument(defined) == "arithmetic=4,open_ended=12"


def test_a_task_only_sft_trains_has_its_options_and_general_rls_budget(tmp_path):
    code = '[[rl.tasks]]\nname = "code"\noptions = { kinds = ["max"], tests = 2 }\n'
    defined = load_definitions(str(write_pipeline(tmp_path, STAGE_TASKS + code)))
    assert defined["code"] == TaskDefinition(TaskConfig(name="code", options={"kinds": ["max"], "tests": 2}), 12)
    assert defined["arithmetic"].max_new_tokens == 4 and defined["open_ended"].max_new_tokens == 12


def test_a_run_config_defines_its_tasks_and_the_tasks_file_reads_back(tmp_path):
    raw = {"rl": {"tasks": [{"name": "code", "options": {"kinds": ["max"]}}, {"name": "calc"}],
                  "sampling": {"max_new_tokens": 30}}}
    defined = from_run_config(raw, "x.toml")
    assert defined["code"] == TaskDefinition(TaskConfig(name="code", options={"kinds": ["max"]}), 30)
    assert defined["calc"].max_new_tokens == 30
    path = write_tasks_file(defined, tmp_path / "tasks.toml")
    back = load_definitions(str(path))  # the file holds no budget: those go on the command line
    assert {n: d.task for n, d in back.items()} == {n: d.task for n, d in defined.items()}
    assert {d.max_new_tokens for d in back.values()} == {0}
    assert from_run_config({"rl": {"tasks": [{"name": "calc"}]}}, "y")["calc"].max_new_tokens == 0
    (tmp_path / "empty.toml").write_text("[model]\nnum_layers = 2\n")
    with pytest.raises(ConfigError, match="defines no task"):
        load_definitions(str(tmp_path / "empty.toml"))
    with pytest.raises(ConfigError) as err:
        from_run_config({"rl": {"tasks": [{"name": "calc", "optoins": {}}]}}, "z")
    assert "optoins" in str(err.value)


@pytest.mark.parametrize("text, expected", [
    ("0", (0, {})), ("32", (32, {})), ("code=64", (0, {"code": 64})),
    ("32,code=64, arithmetic=4", (32, {"code": 64, "arithmetic": 4})), ("", (0, {})),
])
def test_max_new_tokens_forms(text, expected):
    assert parse_budgets(text) == expected


@pytest.mark.parametrize("text", ["x", "code=0", "code=a", "-3", "=5", "a=b=3"])
def test_bad_max_new_tokens_are_config_errors(text):
    with pytest.raises(ConfigError) as err:
        parse_budgets(text)
    assert err.value.field == "--max-new-tokens"


def test_budget_order_task_flag_then_flag_then_config_then_checkpoint():
    cfg = C.load(overrides=["rl.sampling.max_new_tokens=4"])
    defined = TaskDefinition(TaskConfig(name="open_ended"), 12)
    assert E.EvalSettings().budget("open_ended", None, cfg) == 4
    assert E.EvalSettings().budget("open_ended", defined, cfg) == 12
    assert E.EvalSettings(max_new_tokens=20).budget("open_ended", defined, cfg) == 20
    assert E.EvalSettings(max_new_tokens=20, budgets={"open_ended": 7}).budget("open_ended", defined, cfg) == 7
    assert E.EvalSettings(max_new_tokens=20, budgets={"code": 7}).budget("open_ended", defined, cfg) == 20


# ------------------------------------------------------------- scripted engine (fast)
class RecordingEngine(ScriptedEngine):
    """The scripted engine, also keeping every prompt text it was asked to continue."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.prompts = []

    def generate(self, prompts, params):
        self.prompts += [self.tokenizer.decode(p) for p in prompts]
        return super().generate(prompts, params)


def _fruit_answer(prompt: str, params, generator) -> str:
    return "fig,plum,pear,kiwi,lime"  # five fruit: the budget decides how much of it is kept


def test_a_checkpoint_trained_on_arithmetic_gets_the_definition_of_open_ended(tmp_path):
    """An arithmetic-only checkpoint (budget 4) scored on open_ended: with the definition (two fruit,
    budget 12) it sees "two fruit:" prompts and writes 12 tokens; without it, the task's defaults and 4."""
    cfg = C.load(overrides=['rl.tasks=[{name="arithmetic", options={digits=1, ops="-"}}]',
                            "rl.sampling.max_new_tokens=4"])
    tok = _tokenizer("open_ended", "arithmetic")
    defined = load_definitions(str(write_pipeline(tmp_path)))["open_ended"]
    settings = E.EvalSettings(prompts=8, samples=2)
    with RewardWorker(SandboxConfig(), 1) as scorer:
        with_def = RecordingEngine(tok, _fruit_answer)
        result = E.evaluate_task(with_def, tok, cfg, "open_ended", settings, scorer, defined)
        plain = RecordingEngine(tok, _fruit_answer)
        default = E.evaluate_task(plain, tok, cfg, "open_ended", settings, scorer)
    assert result["options"] == {"count": 2, "categories": ["fruit"]} and result["defined_by"] == "config"
    assert result["max_new_tokens"] == 12 and {p.max_new_tokens for p in with_def.calls} == {12}
    assert set(with_def.prompts) == {"two fruit:"} and len(with_def.prompts) == 8 + 8 * 2
    assert result["greedy"]["mean_response_tokens"] == 12  # "fig,plum,pea": 2 right of 3 listed, 2 asked
    assert result["greedy"]["per_prompt"] == pytest.approx([2 / 3] * 8)
    assert default["options"] == {} and default["max_new_tokens"] == 4 and default["defined_by"] == "checkpoint"
    assert {p.max_new_tokens for p in plain.calls} == {4}
    assert all(p.startswith("three ") for p in plain.prompts) and len({p for p in plain.prompts}) > 1
    fruit = [1 / 3 if p == "three fruit:" else 0.0 for p in plain.prompts[:8]]  # "fig,": 1 right of 3 asked
    assert default["greedy"]["per_prompt"] == pytest.approx(fruit)


def test_a_task_the_config_does_not_define_is_refused():
    defined = {"arithmetic": TaskDefinition(TaskConfig(name="arithmetic"), 4)}
    with pytest.raises(ConfigError) as err:
        E._definitions_for(("arithmetic", "code"), defined, "p.toml")
    assert err.value.field == "--tasks" and "code" in str(err.value) and "p.toml" in str(err.value)
    assert E._definitions_for(("arithmetic",), None, "") == {}


def test_the_pipeline_passes_the_definitions_for_every_cell(tmp_path):
    pipeline, home = load_pipeline(str(write_pipeline(tmp_path)))
    stages = plan(pipeline, home)
    definitions, tasks_file = P.eval_definitions(stages, tmp_path / "out")
    assert tasks_file == tmp_path / "out" / "eval_tasks.toml"
    assert {n: d.task for n, d in load_definitions(str(tasks_file)).items()} == \
        {n: d.task for n, d in definitions.items()}
    tasks = P.domains(stages)
    assert tasks == ("arithmetic", "open_ended")
    for stage in stages:  # the same definitions for every row, whatever the stage trained
        command = P.eval_command(stage, pipeline.score, tasks, definitions, tasks_file, tmp_path / "e.json")
        assert command[command.index("--config") + 1] == str(tasks_file)
        assert command[command.index("--max-new-tokens") + 1] == "arithmetic=4,open_ended=12"
        assert command[command.index("--checkpoint") + 1] == str(stage.output)
    with pytest.raises(ConfigError) as err:
        P.stage_scorer(ScoreConfig(prompts=4, tasks=("arithmetic", "code")), tasks, definitions, tasks_file)
    assert err.value.field == "pipeline.score.tasks" and "code" in str(err.value)


# ---------------------------------------------------------------- real checkpoint (slow)
@pytest.fixture(scope="module")
def arithmetic_expert(tmp_path_factory):
    """A tiny real checkpoint whose config lists only arithmetic with a 4-token budget and whose tokenizer
    covers arithmetic and open_ended (a pipeline's shared tokenizer): what an arithmetic expert holds."""
    out = tmp_path_factory.mktemp("expert")
    case = {"run_dir": str(out / "base"), "tokenizer_tasks": ["arithmetic", "open_ended"],
            "overrides": ["model.init_method_std=0.1", "model.seq_length=40", "rl.sampling.max_new_tokens=4",
                          "rl.tasks=[{name='arithmetic', options={digits=1, ops='-'}}]"]}
    torchrun(1, [ROOT / "tests" / "dist" / "eval_expert_worker.py", "checkpoint", out / "result.json",
                 json.dumps(case)], timeout=600)
    return Path(json.loads((out / "result.json").read_text())["checkpoint"])


@pytest.mark.slow
def test_the_pipeline_scorer_scores_an_expert_off_its_domain_with_the_pipeline_definition(arithmetic_expert,
                                                                                         tmp_path):
    pipeline, home = load_pipeline(str(write_pipeline(tmp_path)))
    stages = plan(pipeline, home)
    expert = next(s for s in stages if s.name == "experts/arith")
    expert = dataclasses.replace(expert, output=arithmetic_expert, run_dir=tmp_path / "expert")
    expert.run_dir.mkdir()
    evaluate = P.stage_scorer(pipeline.score, P.domains(stages), *P.eval_definitions(stages, tmp_path / "out"))
    row = evaluate(expert)  # the pipeline's own scorer: an `ernie eval-tasks` subprocess
    result = json.loads((expert.run_dir / "eval.json").read_text())
    assert set(row) == {"arithmetic", "open_ended"}
    open_ended, arithmetic = result["tasks"]["open_ended"], result["tasks"]["arithmetic"]
    assert open_ended["options"] == {"count": 2, "categories": ["fruit"]} and open_ended["max_new_tokens"] == 12
    assert {e["prompt"] for e in open_ended["greedy"]["examples"]} == {"two fruit:"}
    assert arithmetic["options"] == {"digits": 1, "ops": "-"} and arithmetic["max_new_tokens"] == 4
    assert all(e["prompt"].count("-") == 1 and len(e["prompt"]) <= 4 for e in arithmetic["greedy"]["examples"])
    for task in result["tasks"].values():
        assert task["defined_by"] == "config"
        assert 0 < task["greedy"]["mean_response_tokens"] <= task["max_new_tokens"]
    # the same checkpoint without the definitions: open_ended falls back to its defaults and the 4 tokens
    plain = tmp_path / "plain.json"
    assert E.main(["--checkpoint", str(arithmetic_expert), "--tasks", "open_ended", "--prompts", "6",
                   "--json", str(plain)]) == 0
    fallback = json.loads(plain.read_text())["tasks"]["open_ended"]
    assert fallback["options"] == {} and fallback["max_new_tokens"] == 4 and fallback["defined_by"] == "checkpoint"
    assert all(e["prompt"].startswith("three ") for e in fallback["greedy"]["examples"])
    assert fallback["greedy"]["mean_response_tokens"] <= 4
