"""`ernie eval-tasks`: mean task reward of a checkpoint on fixed held-out prompts.

    ernie eval-tasks --checkpoint runs/rl-tiny --tasks arithmetic,code,calc [--prompts 64] [--json out.json]
    ernie eval-tasks --checkpoint runs/posttrain/experts/arith --tasks arithmetic,code \
        --config configs/posttrain_tiny_cpu.toml --max-new-tokens 48,arithmetic=4

Held-out prompts: every task generates its examples deterministically from
(seed, index) (rl/tasks/registry.py). Training reads lower indices: the RL
prompt stream (rl/controller.py PromptStream) counts from 0, one index per
prompt, and SFT demonstrations start at sft.first_index (default 1,000,000).
Evaluation uses indices [HELD_OUT_START, HELD_OUT_START + prompts) at the
task's own seed, ten million past the start, which no run of this project
reaches (a checkpoint whose SFT range reaches it is refused), so every stage
of a pipeline is scored on the same never-trained-on example indices. (A
task with few distinct prompts, e.g. one-digit subtraction with 55, repeats
prompt texts across indices: held out by index, not by text.)

Each task is decoded twice: greedily (top-1 at every step, deterministic) and
by sampling at temperature 1 (the policy's own distribution, the quantity RL
maximises; reproducible for a given --seed). Responses are scored by the
task's reward function exactly as a reward worker scores them
(rl/reward/worker.py score_sample, code in the sandbox). Tool-use tasks
(--agent-tasks, default the shipped "calc") run as multi-turn episodes in the
agent loop (rl/rollout/agent_loop.py).

Standard error: with K samples per prompt, the unit of the estimate is a
prompt (its mean reward r_i, i = 1..N), so SE = s / sqrt(N) with s the sample
standard deviation (ddof = 1) of the r_i; for 0/1 rewards and K = 1 this is
sqrt(p(1-p)/(N-1)) with p the mean.

Task definitions (options, seed, response budget): with --config, the
config's (a run config's [[rl.tasks]] or a pipeline file's, each task as the
stage that trains it defines it; posttrain/task_definitions.py), the same for
every checkpoint, so checkpoints compare on one distribution per task, also
on tasks they were not trained on (the scoreboard's off-diagonal cells);
a task --config does not define is an error. Without --config, the
checkpoint's own (its [[rl.tasks]] entry of that name, e.g. one-digit
subtraction for configs/rl_tiny_cpu.toml), else the task's defaults.
The response budget of a task: --max-new-tokens task=N, else a bare
--max-new-tokens N, else the config's, else the checkpoint's
rl.sampling.max_new_tokens (always cut to what fits model.seq_length).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from megatron_ernie.config.errors import ConfigError
from megatron_ernie.config.rl import TaskConfig
from megatron_ernie.posttrain.task_definitions import TaskDefinition, load_definitions, parse_budgets

HELD_OUT_START = 10_000_000  # first example index of the evaluation prompts (training uses 0, 1, 2, ...)
MODES = ("greedy", "sampled")
AGENT_TASKS = ("calc",)      # shipped tasks whose prompts are solved with tool calls
DEFAULT_AGENT_TURNS = 3      # call, read the result, answer


@dataclass(frozen=True)
class Score:
    """Mean reward over N prompts and its standard error (see the module docstring)."""

    mean: float
    stderr: float
    n: int

    def as_dict(self) -> dict:
        return {"mean": self.mean, "stderr": self.stderr, "n": self.n}


def mean_and_stderr(rewards_per_prompt: Sequence[float]) -> Score:
    """Mean of per-prompt rewards and s/sqrt(N) (ddof 1); N must be >= 2 for a standard error."""
    r = np.asarray(rewards_per_prompt, dtype=np.float64)
    if r.ndim != 1 or len(r) < 2:
        raise ValueError(f"a standard error needs at least 2 prompts, got {len(r)}")
    return Score(float(r.mean()), float(r.std(ddof=1) / math.sqrt(len(r))), len(r))


@dataclass(frozen=True)
class EvalSettings:
    prompts: int = 64
    samples: int = 1                    # sampled responses per prompt (T = 1)
    seed: int = 0
    max_new_tokens: int = 0             # 0: the checkpoint's rl.sampling.max_new_tokens
    batch: int = 32                     # prompts per generate() call
    agent_tasks: tuple[str, ...] = AGENT_TASKS
    agent_turns: int = DEFAULT_AGENT_TURNS
    reward_workers: int = 8              # concurrent sandboxes (see rl.system.reward_concurrency)
    budgets: dict = field(default_factory=dict)  # task -> max_new_tokens, before every other budget

    def validate(self) -> None:
        for name, low in (("prompts", 2), ("samples", 1), ("batch", 1), ("agent_turns", 2),
                          ("reward_workers", 1), ("max_new_tokens", 0)):
            value = getattr(self, name)
            if not isinstance(value, int) or value < low:
                raise ConfigError(f"--{name.replace('_', '-')}", value, f"use an integer >= {low}")
        for task, value in self.budgets.items():
            if not isinstance(value, int) or value < 1:
                raise ConfigError("--max-new-tokens", f"{task}={value}", "give each task a budget >= 1")

    def budget(self, task_name: str, definition: TaskDefinition | None, cfg) -> int:
        """New tokens per response for a task (the order is in the module docstring)."""
        configured = definition.max_new_tokens if definition is not None else 0
        return (self.budgets.get(task_name) or self.max_new_tokens or configured
                or cfg.rl.sampling.max_new_tokens)


def task_config_for(name: str, cfg) -> TaskConfig:
    """The checkpoint's [[rl.tasks]] entry named `name` (seed and options as trained), else the defaults."""
    for task_cfg in cfg.rl.tasks:
        if task_cfg.name == name:
            return task_cfg
    return TaskConfig(name=name)


def held_out_examples(task_cfg: TaskConfig, count: int, start: int = HELD_OUT_START):
    """The fixed evaluation examples of a task: indices [start, start + count) of its stream."""
    from megatron_ernie.rl.tasks import resolve_task

    return resolve_task(task_cfg, f"--tasks ({task_cfg.name})").examples(task_cfg.seed, start, count,
                                                                        task_cfg.options)


def _check_not_trained_on(cfg, prompts: int) -> None:
    """Refuse a checkpoint whose SFT demonstrations (config [sft], source "tasks") reach the held-out indices."""
    sft = getattr(cfg, "sft", None)
    if sft is None or getattr(sft, "source", "") != "tasks":
        return
    last = sft.first_index + sft.num_examples + sft.valid_examples
    if sft.first_index < HELD_OUT_START + prompts and last > HELD_OUT_START:
        raise ConfigError("sft.first_index", sft.first_index, f"the checkpoint was fine-tuned on task examples "
                                                              f"[{sft.first_index}, {last}), which overlap the held-out "
                                                              f"indices from {HELD_OUT_START}: its scores would not "
                                                              "be held out; retrain with a first_index below that")


def _encode_prompts(tokenizer, task_name: str, examples) -> list[list[int]]:
    try:
        return [tokenizer.encode(ex.prompt) for ex in examples]
    except ValueError as err:  # a character tokenizer without the task's characters
        raise ConfigError("--tasks", task_name, f"the checkpoint's tokenizer cannot encode this task's "
                                                f"prompts ({err}); evaluate tasks the model was trained on") from None


def _sampling_params(mode: str, tokenizer, max_new_tokens: int):
    """Greedy = top-1 at T = 1; sampled = the full distribution at T = 1."""
    from megatron_ernie.rl.rollout.engine import SamplingParams

    top_k = 1 if mode == "greedy" else 0
    return SamplingParams(temperature=1.0, top_k=top_k, max_new_tokens=max_new_tokens,
                          stop_token_ids=(tokenizer.eod_id,))


def _response_budget(requested: int, prompts: list[list[int]], seq_length: int, task_name: str) -> int:
    """New tokens per response: as requested, cut so that the longest prompt still fits the model."""
    room = seq_length - max(len(p) for p in prompts)
    if room < 1:
        raise ConfigError("--tasks", task_name, f"its prompts ({max(len(p) for p in prompts)} tokens) fill "
                                                f"the model's seq_length ({seq_length}); evaluate another task")
    return min(requested, room)


# ------------------------------------------------------------------ generation
def _check_agent_tokenizer(tokenizer, task_name: str) -> None:
    from megatron_ernie.rl.agent.tools import STOP_STRING

    try:
        tokenizer.encode(STOP_STRING)
    except ValueError:
        raise ConfigError("--agent-tasks", task_name, "the checkpoint's tokenizer cannot write tool calls "
                                                      f"({STOP_STRING!r}); it was not trained for tool use: "
                                                      "leave the task out of --agent-tasks") from None


def _generate(engine, tokenizer, prompts: list[list[int]], params, agent_turns: int) -> list[dict]:
    """One response per prompt: tokens, rollout log-probs, environment mask, why it ended."""
    if agent_turns <= 1:
        return [{"tokens": g.response_tokens, "logprobs": g.logprobs, "env_mask": None,
                 "finish": g.finish_reason} for g in engine.generate(prompts, params)]
    from megatron_ernie.rl.rollout.agent_loop import run_episodes

    return [{"tokens": e.response_tokens, "logprobs": e.rollout_logprobs, "env_mask": e.env_mask,
             "finish": "length" if e.truncated else "stop"}
            for e, _ in run_episodes(engine, tokenizer, prompts, params, agent_turns)]


def _samples(engine, tokenizer, task_name: str, examples, prompts, params, copies: int, agent_turns: int,
             batch: int) -> list:
    """Samples (prompt-major: prompt i's `copies` responses are adjacent), generated `batch` prompts at a time."""
    from megatron_ernie.rl.protocol import Sample

    out = []
    for first in range(0, len(prompts), batch):
        chunk = [p for p in prompts[first:first + batch] for _ in range(copies)]
        for j, r in enumerate(_generate(engine, tokenizer, chunk, params, agent_turns)):
            i = first + j // copies
            out.append(Sample(
                prompt_id=f"{HELD_OUT_START + i}:{task_name}", sample_index=j % copies, task=task_name,
                prompt_tokens=np.asarray(prompts[i], dtype=np.int32),
                response_tokens=np.asarray(r["tokens"], dtype=np.int32),
                rollout_logprobs=np.asarray(r["logprobs"], dtype=np.float32),
                policy_version=max(engine.policy_version, 0), env_mask=r["env_mask"],
                response_text=tokenizer.decode(r["tokens"]), reference=examples[i].reference,
                finish_reason=r["finish"]))
    return out


def _summary(scored, prompts: int, copies: int, examples) -> dict:
    rewards = np.array([s.reward for s in scored], dtype=np.float64).reshape(prompts, copies)
    statuses: dict[str, int] = {}
    for s in scored:
        statuses[s.status] = statuses.get(s.status, 0) + 1
    shown = [{"prompt": examples[k // copies].prompt, "response": s.sample.response_text, "reward": s.reward}
             for k, s in enumerate(scored[:3 * copies:copies])]
    lengths = [len(s.sample.response_tokens) for s in scored]
    per_prompt = rewards.mean(axis=1)
    return {**mean_and_stderr(per_prompt).as_dict(), "per_prompt": per_prompt.tolist(), "samples_per_prompt": copies,
            "statuses": statuses, "mean_response_tokens": float(np.mean(lengths)), "examples": shown}


def _sampler_seed(seed: int, task_name: str) -> int:
    """Each task's draws reproducible on their own (independent of which tasks run before it) and
    different between tasks (one shared seed would replay the same random numbers on every task)."""
    return (seed * 1_000_003 + zlib.crc32(task_name.encode())) % 2**63


def evaluate_task(engine, tokenizer, cfg, task_name: str, settings: EvalSettings, scorer,
                  definition: TaskDefinition | None = None) -> dict:
    """{"greedy": summary, "sampled": summary, ...} of one task on its held-out prompts; `definition`
    (from --config) replaces the checkpoint's own options and budget for the task."""
    task_cfg = definition.task if definition is not None else task_config_for(task_name, cfg)
    _check_not_trained_on(cfg, settings.prompts)
    examples = held_out_examples(task_cfg, settings.prompts)
    prompts = _encode_prompts(tokenizer, task_name, examples)
    agent_turns = settings.agent_turns if task_name in settings.agent_tasks else 1
    if agent_turns > 1:
        _check_agent_tokenizer(tokenizer, task_name)
    budget = _response_budget(settings.budget(task_name, definition, cfg), prompts, engine.max_seq_length, task_name)
    result = {"options": dict(task_cfg.options), "seed": task_cfg.seed, "max_new_tokens": budget,
              "agent_turns": agent_turns, "defined_by": "config" if definition is not None else "checkpoint"}
    for mode in MODES:
        engine.generator.manual_seed(_sampler_seed(settings.seed, task_name))
        copies = 1 if mode == "greedy" else settings.samples
        samples = _samples(engine, tokenizer, task_name, examples, prompts,
                           _sampling_params(mode, tokenizer, budget), copies, agent_turns, settings.batch)
        result[mode] = _summary(scorer.score(samples), settings.prompts, copies, examples)
    return result


def _definitions_for(tasks: Sequence[str], definitions: dict | None, source: str) -> dict:
    """task -> its definition from --config (every task must have one), or {} without --config."""
    if definitions is None:
        return {}
    missing = [t for t in tasks if t not in definitions]
    if missing:
        raise ConfigError("--tasks", ",".join(missing), f"not defined by --config {source} (it defines "
                                                        f"{sorted(definitions)}); add [[rl.tasks]] entries "
                                                        "for them or leave them out")
    return {t: definitions[t] for t in tasks}


def evaluate_checkpoint(path, tasks: Sequence[str], settings: EvalSettings = EvalSettings(),
                        definitions: dict | None = None, source: str = "") -> dict:
    """Load the checkpoint (fp32, TP1, this process) and evaluate every task; the JSON-ready result.
    `definitions` (task -> TaskDefinition, from --config `source`) define the tasks instead of the checkpoint."""
    from megatron_ernie.rl.reward.worker import RewardWorker
    from megatron_ernie.rl.rollout.checkpoint_engine import engine_from_checkpoint, resolve_checkpoint

    settings.validate()
    if not tasks:
        raise ConfigError("--tasks", "", "name at least one task, e.g. --tasks arithmetic,code")
    defined = _definitions_for(tasks, definitions, source)
    engine, tokenizer, cfg = engine_from_checkpoint(path, dtype="fp32", seed=settings.seed)
    with RewardWorker(cfg.rl.sandbox, settings.reward_workers) as scorer:
        results = {name: evaluate_task(engine, tokenizer, cfg, name, settings, scorer, defined.get(name))
                   for name in tasks}
    return {"checkpoint": str(resolve_checkpoint(path)), "iteration": engine.policy_version,
            "held_out_start": HELD_OUT_START, "settings": dataclasses.asdict(settings), "tasks": results}


def scores(result: dict, mode: str = "greedy") -> dict[str, tuple[float, float]]:
    """{task: (mean, stderr)} of one decoding mode: a row of the domain x stage scoreboard."""
    return {task: (r[mode]["mean"], r[mode]["stderr"]) for task, r in result["tasks"].items()}


def format_table(result: dict) -> str:
    lines = [f"checkpoint {result['checkpoint']} (iteration {result['iteration']}), "
             f"{result['settings']['prompts']} held-out prompts per task from index {result['held_out_start']}",
             f"{'task':<14} {'greedy':>16} {'sampled T=1':>16}  statuses (greedy)"]
    for task, r in result["tasks"].items():
        cells = [f"{r[m]['mean']:.3f} ± {r[m]['stderr']:.3f}" for m in MODES]
        statuses = ", ".join(f"{k} {v}" for k, v in sorted(r["greedy"]["statuses"].items()))
        lines.append(f"{task:<14} {cells[0]:>16} {cells[1]:>16}  {statuses}")
    return "\n".join(lines)


# ------------------------------------------------------------------------ CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ernie eval-tasks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    d = EvalSettings()
    p.add_argument("--checkpoint", required=True, help="an iter_N directory, or a run/checkpoints directory (latest)")
    p.add_argument("--tasks", required=True, help="comma-separated task names, e.g. arithmetic,code,calc")
    p.add_argument("--prompts", type=int, default=d.prompts, help="held-out prompts per task (>= 2)")
    p.add_argument("--samples", type=int, default=d.samples, help="sampled responses per prompt at T=1")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the T=1 sampler")
    p.add_argument("--max-new-tokens", default=str(d.max_new_tokens),
                   help="response budget: N for every task, task=N for one, or a mix, e.g. 32,code=64 "
                        "(0 / unset: the --config's, else the checkpoint's rl.sampling.max_new_tokens)")
    p.add_argument("--config", default="",
                   help="define the tasks (options, seed, budget) by this TOML: a run config with [[rl.tasks]] "
                        "or a pipeline file; default: the checkpoint's own tasks")
    p.add_argument("--batch", type=int, default=d.batch, help="prompts per generation batch")
    p.add_argument("--agent-tasks", default=",".join(d.agent_tasks),
                   help="tasks run as tool-use episodes in the agent loop")
    p.add_argument("--agent-turns", type=int, default=d.agent_turns, help="model turns per tool-use episode")
    p.add_argument("--reward-workers", type=int, default=d.reward_workers, help="concurrent sandboxes")
    p.add_argument("--json", default="", help="also write the full result (with example responses) here")
    return p


def _names(text: str) -> tuple[str, ...]:
    return tuple(n.strip() for n in text.split(",") if n.strip())


def main(argv=None) -> int:
    from megatron_ernie.checkpoint.store import CheckpointError

    args = build_parser().parse_args(argv)
    try:
        default_budget, budgets = parse_budgets(args.max_new_tokens)
        settings = EvalSettings(args.prompts, args.samples, args.seed, default_budget, args.batch,
                                _names(args.agent_tasks), args.agent_turns, args.reward_workers, budgets)
        definitions = load_definitions(args.config) if args.config else None
        result = evaluate_checkpoint(args.checkpoint, _names(args.tasks), settings, definitions, args.config)
    except (CheckpointError, ConfigError) as err:
        print(f"ernie eval-tasks: error: {err}", file=sys.stderr)
        return 2
    print(format_table(result))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
