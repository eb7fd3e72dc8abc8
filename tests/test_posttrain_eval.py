"""Post-training evaluation: models from checkpoints, `ernie eval-tasks`, the domain x stage scoreboard.

Fast tests need no torch.distributed: checkpoint errors are found before a
model is built, the evaluation logic runs on a scripted engine (answers are a
function of the prompt, so rewards are known), and the scoreboard is files.
Slow tests make real checkpoints with the CLI (a pretraining supernet saved at
EP2, an elastic extraction of it, a 3-step RL run, a short SFT run), compare
the engine built from each with the pretraining model's forward in one
single-process launch, and run `ernie eval-tasks` on them.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from harness import ROOT, free_port, torchrun
from megatron_ernie import config as C
from megatron_ernie.checkpoint.store import CheckpointError
from megatron_ernie.config.errors import ConfigError
from megatron_ernie.config.rl import SandboxConfig, TaskConfig
from megatron_ernie.data.char_tokenizer import CharTokenizer
from megatron_ernie.posttrain import evaluate as E
from megatron_ernie.posttrain.scoreboard import format_scoreboard, save_scoreboard_png, write_scoreboard
from megatron_ernie.rl.reward.worker import RewardWorker
from megatron_ernie.rl.rollout.checkpoint_engine import engine_from_checkpoint, resolve_checkpoint
from megatron_ernie.rl.rollout.engine import Generation, GenerationEngine
from megatron_ernie.rl.task_tokenizer import TOOL_ALPHABET, task_texts
from megatron_ernie.rl.tasks import get_task

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------ checkpoint errors (fast)

def _fake_checkpoint(root: Path, with_config=True, with_tokenizer=True) -> Path:
    """A checkpoint directory as far as the files read before the weights (meta, config, tokenizer)."""
    ckpt = root / "checkpoints" / "iter_0000005"
    ckpt.mkdir(parents=True)
    meta = {"iteration": 5, "consumed_samples": 0, "consumed_tokens": 0, "layout": {"world": 1}, "extra": {}}
    (ckpt / "meta.json").write_text(json.dumps(meta))
    (root / "checkpoints" / "latest").write_text("iter_0000005\n")
    if with_config:
        (ckpt / "config.toml").write_text(C.dumps(C.load()))
    if with_tokenizer:
        CharTokenizer("0123456789+-=").save(ckpt / "tokenizer.json")
    return ckpt


def test_checkpoint_resolution_follows_latest(tmp_path):
    ckpt = _fake_checkpoint(tmp_path)
    assert resolve_checkpoint(tmp_path) == ckpt                   # a run directory
    assert resolve_checkpoint(tmp_path / "checkpoints") == ckpt   # a checkpoints directory
    assert resolve_checkpoint(ckpt) == ckpt                       # the iter_N directory itself


@pytest.mark.parametrize("breakage, error, words", [
    ("no_dir", ConfigError, ["no such directory"]),
    ("empty_dir", CheckpointError, ["holds no checkpoint", "latest"]),
    ("latest_dangling", CheckpointError, ["iter_0000009", "incomplete or missing"]),
    ("meta_damaged", CheckpointError, ["meta.json is damaged"]),
    ("no_config", CheckpointError, ["no config.toml", "copy the run's resolved config.toml"]),
    ("no_tokenizer", CheckpointError, ["no tokenizer.json", "copy the tokenizer"]),
    ("bad_tokenizer", ConfigError, ["tokenizer.json"]),
])
def test_bad_checkpoints_give_clear_errors(tmp_path, breakage, error, words):
    run = tmp_path / "run"
    if breakage == "no_dir":
        path = tmp_path / "nowhere"
    elif breakage == "empty_dir":
        path = tmp_path / "empty"
        path.mkdir()
    else:
        ckpt = _fake_checkpoint(run, with_config=breakage != "no_config", with_tokenizer=breakage != "no_tokenizer")
        path = run
        if breakage == "latest_dangling":
            (run / "checkpoints" / "latest").write_text("iter_0000009\n")
        if breakage == "meta_damaged":
            (ckpt / "meta.json").write_text('{"iteration": 5, "consu')
        if breakage == "bad_tokenizer":
            (ckpt / "tokenizer.json").write_text("not json")
    with pytest.raises(error) as info:
        engine_from_checkpoint(path)
    for word in words:
        assert word in str(info.value), (word, str(info.value))
    assert str(path) in str(info.value) or breakage in ("latest_dangling", "bad_tokenizer")


# ------------------------------------------------------------ evaluation logic (fast)

def test_standard_error_formula():
    score = E.mean_and_stderr([1, 0, 1, 1, 0, 1, 1, 1])
    p, n = 6 / 8, 8
    assert score.mean == pytest.approx(p) and score.n == 8
    assert score.stderr == pytest.approx(math.sqrt(p * (1 - p) / (n - 1)))  # 0/1 rewards: sqrt(p(1-p)/(N-1))
    r = [0.2, 0.5, 0.9]
    mean = sum(r) / 3
    assert E.mean_and_stderr(r).stderr == pytest.approx(math.sqrt(sum((x - mean) ** 2 for x in r) / 2 / 3))
    assert E.mean_and_stderr([1, 1, 1]).stderr == 0.0
    with pytest.raises(ValueError, match="at least 2 prompts"):
        E.mean_and_stderr([1.0])


def test_held_out_prompts_are_fixed_and_past_the_training_stream():
    task_cfg = TaskConfig(name="arithmetic", seed=3, options={"digits": 3})
    first = E.held_out_examples(task_cfg, 20)
    assert first == E.held_out_examples(task_cfg, 20)                 # fixed
    make = get_task("arithmetic").make_example
    assert first == [make(3, E.HELD_OUT_START + i, {"digits": 3}) for i in range(20)]
    training = get_task("arithmetic").examples(3, 0, 20, {"digits": 3})  # what RL step 0 reads
    assert [e.prompt for e in first] != [e.prompt for e in training]


def test_a_checkpoint_fine_tuned_on_the_held_out_indices_is_refused():
    tok = _tokenizer("arithmetic")
    cfg = C.load(overrides=[f"sft.first_index={E.HELD_OUT_START - 100}", "sft.num_examples=200"])
    with RewardWorker(SandboxConfig(), 1) as scorer:
        with pytest.raises(ConfigError, match="sft.first_index.*overlap the held-out"):
            E.evaluate_task(ScriptedEngine(tok, _arithmetic_answer), tok, cfg, "arithmetic",
                            E.EvalSettings(prompts=3), scorer)


def test_task_options_come_from_the_checkpoint_config():
    cfg = C.load(overrides=['rl.tasks=[{name="arithmetic", seed=4, options={digits=1, ops="-"}}]'])
    assert E.task_config_for("arithmetic", cfg) == TaskConfig(name="arithmetic", seed=4,
                                                              options={"digits": 1, "ops": "-"})
    assert E.task_config_for("code", cfg) == TaskConfig(name="code")  # not trained on: the task's defaults


class ScriptedEngine(GenerationEngine):
    """A deterministic stand-in for MegatronEngine: the response is `answer(prompt text, params, generator)`."""

    def __init__(self, tokenizer, answer, max_seq_length: int = 256):
        self.tokenizer, self.answer, self.max_seq_length = tokenizer, answer, max_seq_length
        self.generator = torch.Generator().manual_seed(0)
        self.policy_version = 7
        self.calls = []

    def generate(self, prompts, params):
        self.calls.append(params)
        out = []
        for prompt in prompts:
            ids = self.tokenizer.encode(self.answer(self.tokenizer.decode(prompt), params, self.generator))
            ids = ids[: params.max_new_tokens]
            out.append(Generation(np.asarray(ids, dtype=np.int32), np.zeros(len(ids), np.float32), None, "stop"))
        return out

    def weight_shapes(self):
        return {}

    def load_weights(self, tensors, version):
        pass


def _tokenizer(*names) -> CharTokenizer:
    return CharTokenizer.train(task_texts([TaskConfig(name=n) for n in names], 500) + [TOOL_ALPHABET])


def _arithmetic_answer(prompt: str, params, generator) -> str:
    """Right when greedy; at T=1 right with probability 1/2 (from the engine's seeded generator)."""
    a, op, b = prompt[:-1].partition("+") if "+" in prompt else prompt[:-1].partition("-")
    right = int(a) + int(b) if op == "+" else int(a) - int(b)
    if params.top_k == 1 or torch.rand((), generator=generator) < 0.5:
        return str(right)
    return str(right + 1)


def test_greedy_is_top1_and_sampled_is_the_full_distribution_at_t1():
    tok = _tokenizer("arithmetic")
    engine = ScriptedEngine(tok, _arithmetic_answer)
    cfg = C.load()
    with RewardWorker(SandboxConfig(), 1) as scorer:
        result = E.evaluate_task(engine, tok, cfg, "arithmetic", E.EvalSettings(prompts=40, samples=4), scorer)
    assert {(p.temperature, p.top_k, p.top_p) for p in engine.calls} == {(1.0, 1, 1.0), (1.0, 0, 1.0)}
    greedy, sampled = result["greedy"], result["sampled"]
    assert greedy["mean"] == 1.0 and greedy["stderr"] == 0.0 and greedy["statuses"] == {"ok": 40}
    assert sampled["samples_per_prompt"] == 4 and len(sampled["per_prompt"]) == 40
    assert set(sampled["per_prompt"]) <= {0.0, 0.25, 0.5, 0.75, 1.0}
    assert 0.3 < sampled["mean"] < 0.7
    per_prompt = np.array(sampled["per_prompt"])
    assert sampled["stderr"] == pytest.approx(per_prompt.std(ddof=1) / math.sqrt(40))
    assert sum(sampled["statuses"].values()) == 160


def test_sampled_scores_are_reproducible_for_a_seed():
    tok = _tokenizer("arithmetic")
    cfg = C.load()

    def run(seed):
        engine = ScriptedEngine(tok, _arithmetic_answer)
        with RewardWorker(SandboxConfig(), 1) as scorer:
            settings = E.EvalSettings(prompts=30, samples=2, seed=seed, batch=7)
            return E.evaluate_task(engine, tok, cfg, "arithmetic", settings, scorer)["sampled"]["per_prompt"]

    assert run(1) == run(1)
    assert run(1) != run(2)


def test_agent_task_runs_tool_episodes():
    """calc through the agent loop: the scripted model calls the calculator, then answers with its result."""
    from megatron_ernie.rl.agent.tools import calculator

    def answer(history: str, params, generator) -> str:
        if "<result>" not in history:
            return f"<tool>calc\n{history.rstrip('=')}</tool>"
        return history.split("<result>")[-1].split("</result>")[0]

    tok = _tokenizer("calc")
    engine = ScriptedEngine(tok, answer)
    settings = E.EvalSettings(prompts=6, max_new_tokens=60)
    with RewardWorker(SandboxConfig(), 1) as scorer:
        result = E.evaluate_task(engine, tok, C.load(), "calc", settings, scorer)
    assert result["agent_turns"] == E.DEFAULT_AGENT_TURNS
    assert result["greedy"]["mean"] == 1.0 and result["sampled"]["mean"] == 1.0
    example = result["greedy"]["examples"][0]
    expression = example["prompt"].rstrip("=")
    assert example["response"] == f"<tool>calc\n{expression}</tool><result>{calculator(expression)}</result>" \
                                  f"{calculator(expression)}"
    # without the agent loop the same model never sees a result: its answer is the unexecuted call
    with RewardWorker(SandboxConfig(), 1) as scorer:
        plain = E.evaluate_task(engine, tok, C.load(), "calc",
                                E.EvalSettings(prompts=6, max_new_tokens=60, agent_tasks=()), scorer)
    assert plain["agent_turns"] == 1 and plain["greedy"]["mean"] < 1.0


def test_open_ended_task_is_scored_by_its_rubric():
    def answer(prompt: str, params, generator) -> str:  # the first two words of the category and a wrong one
        from megatron_ernie.rl.tasks.open_ended import CATEGORIES

        words = CATEGORIES[prompt.split(" ")[1].rstrip(":")]
        return f"{words[0]},{words[1]},qqq"

    tok = _tokenizer("open_ended")
    tok = CharTokenizer(tok.alphabet + "q")
    with RewardWorker(SandboxConfig(), 1) as scorer:
        result = E.evaluate_task(ScriptedEngine(tok, answer), tok, C.load(), "open_ended",
                                 E.EvalSettings(prompts=5), scorer)
    assert result["greedy"]["per_prompt"] == pytest.approx([2 / 3] * 5)


def test_tasks_the_tokenizer_cannot_write_are_config_errors():
    tok = CharTokenizer("0123456789-=")
    with RewardWorker(SandboxConfig(), 1) as scorer:
        with pytest.raises(ConfigError, match="cannot encode this task's prompts"):
            E.evaluate_task(ScriptedEngine(tok, _arithmetic_answer), tok, C.load(), "open_ended",
                            E.EvalSettings(prompts=3), scorer)
        tok = _tokenizer("calc")
        tok_no_tools = CharTokenizer("".join(set(tok.alphabet) - set("<>/")))
        with pytest.raises(ConfigError, match="cannot write tool calls"):
            E.evaluate_task(ScriptedEngine(tok_no_tools, _arithmetic_answer), tok_no_tools, C.load(), "calc",
                            E.EvalSettings(prompts=3), scorer)
    with pytest.raises(ConfigError, match="--prompts"):
        E.EvalSettings(prompts=1).validate()


# ------------------------------------------------------------ scoreboard (fast)

BOARD = {"sft": {"arithmetic": (0.21, 0.04), "code": (0.1, 0.03)},
         "expert:arithmetic": {"arithmetic": (0.62, 0.05)},
         "opd": {"arithmetic": (0.55, 0.05), "code": (0.3, 0.041), "open_ended": (0.4, 0.02)}}


def test_scoreboard_table_lists_every_stage_and_domain():
    lines = format_scoreboard(BOARD).splitlines()
    assert lines[0].split() == ["stage", "arithmetic", "code", "open_ended"]
    assert [line.split()[0] for line in lines[1:]] == ["sft", "expert:arithmetic", "opd"]
    assert lines[1].split()[1:] == ["0.210", "±", "0.040", "0.100", "±", "0.030", "-"]
    assert lines[2].split()[1:] == ["0.620", "±", "0.050", "-", "-"]
    assert "0.300 ± 0.041" in lines[3] and "0.400 ± 0.020" in lines[3]
    with pytest.raises(ValueError, match="stderr >= 0"):
        format_scoreboard({"sft": {"code": (0.1, -1.0)}})


def test_scoreboard_png_and_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    paths = write_scoreboard(BOARD, tmp_path / "board")
    png = paths["png"].read_bytes()
    assert len(png) > 1000 and png[:8] == PNG_MAGIC
    import matplotlib.image

    image = matplotlib.image.imread(paths["png"])
    assert image.shape[0] > 100 and image.shape[1] > 200 and image.std() > 0.05  # drawn, not blank
    assert paths["table"].read_text() == format_scoreboard(BOARD) + "\n"
    files = list((tmp_path / "board" / "tensorboard").glob("events.out.tfevents.*"))
    acc = EventAccumulator(str(files[0]))
    acc.Reload()
    assert [(e.step, round(e.value, 4)) for e in acc.Scalars("scoreboard/arithmetic")] == \
        [(0, 0.21), (1, 0.62), (2, 0.55)]
    assert [e.step for e in acc.Scalars("scoreboard/open_ended")] == [2]
    other = save_scoreboard_png({"sft": {"a": (0.5, 0.1)}}, tmp_path / "small.png")
    assert other.read_bytes()[:8] == PNG_MAGIC


# ------------------------------------------------------------ real checkpoints (slow)

SFT_ARITHMETIC = """
[run]
name = "sft-eval"
seed = 1234
[model]
num_layers = 2
hidden_size = 64
num_attention_heads = 4
num_query_groups = 2
ffn_hidden_size = 128
seq_length = 16
[optimizer]
lr = 3e-3
min_lr = 3e-3
weight_decay = 0.0
[schedule]
warmup_iters = 5
[train]
iters = 200
global_batch_size = 32
micro_batch_size = 32
eval_interval = 0
[checkpoint]
save_interval = 200
[sft]
source = "tasks"
num_examples = 2048
valid_examples = 16
error_fraction = 0.0
[[rl.tasks]]
name = "arithmetic"
options = { digits = 1, ops = "-" }
"""


def _cli(*args, timeout=900):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "megatron_ernie.cli", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, data_cache):
    """A pretraining supernet (saved at EP2), its extracted sub-network, a 3-step RL run, a 200-step SFT run."""
    root = tmp_path_factory.mktemp("posttrain-ckpts")
    torchrun(2, ["-m", "megatron_ernie.cli", "pretrain", "--config", ROOT / "configs/tiny_cpu.toml",
                 "--set", f'run.dir="{root / "pretrain"}"', "--set", "train.iters=2",
                 "--set", "checkpoint.save_interval=2", "--set", "train.eval_interval=0"])
    _cli("extract", "--run-dir", root / "pretrain", "--subnet", "depth=3,ffn=0.5,experts=2,topk=1",
         "--out", root / "extracted")
    _cli("rl", "--config", ROOT / "configs/rl_tiny_cpu.toml", "--set", f'run.dir="{root / "rl"}"',
         "--set", "train.iters=3")
    (root / "sft.toml").write_text(SFT_ARITHMETIC)
    torchrun(1, ["-m", "megatron_ernie.cli", "sft", "--config", root / "sft.toml",
                 "--set", f'run.dir="{root / "sft"}"'], timeout=900)
    return {name: root / name for name in ("pretrain", "extracted", "rl", "sft")}


@pytest.fixture(scope="module")
def engines(checkpoints, tmp_path_factory):
    broken = tmp_path_factory.mktemp("broken")
    rl = resolve_checkpoint(checkpoints["rl"])
    damaged = shutil.copytree(rl, broken / "damaged")
    shard = max(damaged.glob("*.distcp"), key=lambda p: p.stat().st_size)
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size // 2)
    wrong = shutil.copytree(rl, broken / "wrong_tokenizer")  # a BPE tokenizer on a character model
    shutil.copyfile(resolve_checkpoint(checkpoints["pretrain"]) / "tokenizer.json", wrong / "tokenizer.json")
    case = {"checkpoints": {k: str(v) for k, v in checkpoints.items()},
            "broken": {"damaged": str(damaged), "wrong_tokenizer": str(wrong)}}
    out = broken / "result.json"
    torchrun(1, [ROOT / "tests" / "dist" / "posttrain_worker.py", "engines", out, json.dumps(case)])
    return json.loads(out.read_text())


@pytest.mark.slow
@pytest.mark.parametrize("source", ["pretrain", "extracted", "rl", "sft"])
def test_engine_logits_equal_the_pretraining_model_forward(engines, source):
    r = engines["engines"][source]
    assert r["untrained_gap"] > 0.1  # the reference starts from another init: equality below means both loaded
    assert r["max_abs_logit_diff"] <= 1e-5 * max(1.0, r["logit_scale"])
    assert r["generation_logprob_gap"] < 1e-5  # KV-cached greedy decoding == full-sequence forward
    assert r["tokenizer"] == ("ByteBPETokenizer" if source in ("pretrain", "extracted") else "CharTokenizer")


@pytest.mark.slow
def test_broken_real_checkpoints_are_refused_with_the_reason(engines):
    errors = engines["errors"]
    assert "is truncated" in errors["damaged"] and "Copy the complete checkpoint" in errors["damaged"]
    wrong = errors["wrong_tokenizer"]
    assert "embedding.word_embeddings.weight" in wrong and "tokenizer.json is not the one" in wrong


def _eval_tasks(checkpoint, out: Path, *args) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
           "MASTER_PORT": str(free_port())}
    proc = subprocess.run([sys.executable, "-m", "megatron_ernie.posttrain.evaluate", "--checkpoint",
                           str(checkpoint), "--json", str(out), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert "greedy" in proc.stdout and "held-out prompts" in proc.stdout
    return result


@pytest.mark.slow
def test_eval_tasks_on_real_checkpoints(checkpoints, tmp_path):
    args = ("--tasks", "arithmetic", "--prompts", "120", "--max-new-tokens", "3", "--samples", "2")
    untrained = _eval_tasks(checkpoints["rl"], tmp_path / "a.json", *args, "--seed", "1")
    again = _eval_tasks(checkpoints["rl"], tmp_path / "b.json", *args, "--seed", "1")
    reseeded = _eval_tasks(checkpoints["rl"], tmp_path / "c.json", *args, "--seed", "2")
    trained = _eval_tasks(checkpoints["sft"], tmp_path / "d.json", *args, "--seed", "1")
    for result in (untrained, trained):
        assert result["iteration"] in (3, 200) and result["held_out_start"] == E.HELD_OUT_START
        for mode in E.MODES:
            r = result["tasks"]["arithmetic"][mode]
            assert 0.0 <= r["mean"] <= 1.0 and r["n"] == 120
            assert r["mean"] == pytest.approx(np.mean(r["per_prompt"]))
            assert r["stderr"] == pytest.approx(np.std(r["per_prompt"], ddof=1) / math.sqrt(120))
    a, b, c = (x["tasks"]["arithmetic"] for x in (untrained, again, reseeded))
    assert a == b                                         # same seed: identical, sampled included
    assert a["greedy"] == c["greedy"]                     # greedy does not depend on the seed
    assert a["sampled"]["per_prompt"] != c["sampled"]["per_prompt"]
    before, after = untrained["tasks"]["arithmetic"]["greedy"], trained["tasks"]["arithmetic"]["greedy"]
    print(f"\nheld-out greedy reward, 1-digit subtraction: RL 3 steps {before['mean']:.3f} ± {before['stderr']:.3f}, "
          f"SFT 200 steps {after['mean']:.3f} ± {after['stderr']:.3f}")
    assert after["mean"] - before["mean"] > 3 * math.hypot(before["stderr"], after["stderr"])


@pytest.mark.slow
def test_eval_tasks_refuses_a_task_outside_the_tokenizer(checkpoints):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "megatron_ernie.posttrain.evaluate", "--checkpoint",
                           str(checkpoints["rl"]), "--tasks", "open_ended", "--prompts", "4"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2
    assert "--tasks = 'open_ended'" in proc.stderr and "cannot encode" in proc.stderr


def test_extracting_adam_moments_of_an_expert_parallel_supernet_names_the_reshard_first(checkpoints, tmp_path):
    """One process cannot regroup the dense/expert optimizers of an EP2 supernet: a named refusal, not a
    KeyError from deep inside megatron-core, and the command it names works (tested in convert's tests)."""
    from megatron_ernie.config.errors import ConfigError
    from megatron_ernie.elastic import extract

    with pytest.raises(ConfigError) as err:
        extract.main(["--run-dir", str(checkpoints["pretrain"]), "--subnet", "depth=3", "--out", str(tmp_path / "x"),
                      "--optimizer"])
    text = str(err.value)
    assert "--optimizer" in text and "expert parallel 2" in text and "convert reshard" in text
    assert "parallel.expert=1" in text and not (tmp_path / "x").exists()
