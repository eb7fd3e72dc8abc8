"""[rl.distill] and advantage = "opd": valid combinations load, bad ones name the field, value and fix."""

import tomllib

import pytest

from megatron_ernie import config as C
from megatron_ernie.config.loader import build

OPD = ['rl.algorithm.advantage="opd"', 'rl.distill.teachers={math="/ckpt/math", code="/ckpt/code"}',
       'rl.tasks=[{name="arithmetic"}, {name="code"}]', 'rl.distill.routes={arithmetic="math", code="code"}']


def load_rl(overrides):
    cfg = C.load(None, overrides)
    cfg.rl.validate("rl")
    return cfg


def test_opd_config_loads_validates_and_round_trips():
    cfg = load_rl(OPD + ['rl.distill.payload="full"', "rl.distill.alpha=0.25"])
    d = cfg.rl.distill
    assert d.enabled and d.aliases == ("code", "math") and d.payload == "full" and d.alpha == 0.25
    assert d.routes == {"arithmetic": "math", "code": "code"}
    assert build(C.ErnieConfig, tomllib.loads(C.dumps(cfg))) == cfg


def test_distillation_is_off_by_default():
    cfg = load_rl([])
    assert not cfg.rl.distill.enabled and cfg.rl.algorithm.advantage == "grpo"


# (overrides on top of OPD, the field the error must name, words of the fix)
BAD = [
    (['rl.distill.routes={arithmetic="math"}'], "rl.distill.routes", "task 'code' (rl.tasks[1]) has no teacher"),
    (['rl.distill.routes={arithmetic="math", code="coder"}'], "rl.distill.routes.code",
     "one of the teachers ['code', 'math']"),
    (['rl.distill.routes={arithmetic="math", code="code", poetry="math"}'], "rl.distill.routes.poetry",
     "no task 'poetry' in rl.tasks"),
    (['rl.distill.payload="logits"'], "rl.distill.payload", "choose one of ['sampled', 'full']"),
    (["rl.distill.alpha=-0.1"], "rl.distill.alpha", "finite number >= 0"),
    (["rl.distill.alpha=nan"], "rl.distill.alpha", "finite number"),
    (["rl.distill.alpha=inf"], "rl.distill.alpha", "finite number"),
    (["rl.sampling.temperature=0.7"], "rl.sampling.temperature", "set rl.sampling.temperature = 1"),
    (['rl.algorithm.advantage="grpo"'], "rl.distill.teachers", 'advantage = "opd"'),
    (['rl.distill.teachers={}', "rl.distill.routes={}"], "rl.algorithm.advantage", "needs teachers"),
    (['rl.distill.teachers={math=""}', 'rl.distill.routes={arithmetic="math", code="math"}'],
     "rl.distill.teachers.math", "checkpoint directory"),
    (['rl.distill.teachers="math"'], "rl.distill.teachers", "expected a dict"),
    (['rl.distill.teachers={"math/v2"="/c"}', 'rl.distill.routes={arithmetic="math/v2", code="math/v2"}'],
     "rl.distill.teachers", "letters, digits"),
]


@pytest.mark.parametrize("overrides,field,fix", BAD, ids=[b[1] + ":" + ",".join(b[0]) for b in BAD])
def test_bad_distill_config_names_field_value_and_fix(overrides, field, fix):
    with pytest.raises(C.ConfigError) as err:
        load_rl(OPD + overrides)
    assert err.value.field == field, str(err.value)
    assert fix in str(err.value), str(err.value)


def test_routes_without_teachers_are_an_error():
    with pytest.raises(C.ConfigError, match=r"rl.distill.routes = .*declare the teachers or remove the routes"):
        load_rl(['rl.distill.routes={arithmetic="math"}'])


def test_unmapped_task_message_shows_value_and_fix():
    with pytest.raises(C.ConfigError) as err:
        load_rl(OPD + ['rl.distill.routes={arithmetic="math"}'])
    assert str(err.value).startswith("rl.distill.routes = {'arithmetic': 'math'}: task 'code'")
    assert 'add code = "<alias>"' in str(err.value)
