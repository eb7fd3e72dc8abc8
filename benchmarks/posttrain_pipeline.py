"""The post-training pipeline's central claim, measured: domain experts beat SFT, OPD gathers them.

    python benchmarks/posttrain_pipeline.py [--seeds 1,2] [--quick] [--out runs/posttrain-bench]

For each seed: `ernie pipeline` on benchmarks/configs/posttrain_bench.toml
(SFT -> one RL expert per domain -> multi-teacher OPD into the SFT model ->
general RL), with the seed added to every stage (run.seed: initialisation,
sampling; sft.seed: which demonstrations are deliberately wrong), then the
baseline: ONE mixed-domain RL run from the same SFT checkpoint on all the
experts' tasks, given as many samples (steps x prompts x samples per prompt)
as all experts together. Every stage's output is scored by the benchmark
itself on every domain (held-out prompts of ernie eval-tasks, greedy and
sampled at T=1), with each task's options and response budget taken from
the stages that train it, so that an expert is scored on another domain's
real distribution, not on that task's defaults (eval-tasks falls back to the
defaults for a task the checkpoint was not trained on).

Prints, per decoding mode: the domain x stage matrix per seed and averaged
over seeds (mean ± half the range over seeds), each expert's own-domain gain
over SFT, the fraction of that gain the OPD student recovers, the general
stage's change per domain, the baseline row, and the issue's targets
(expert gain >= 10 points; OPD recovers >= 60% of each gain and its domain
average beats every expert's; general RL loses <= 3 points per verifiable
domain) with PASS/MISS. Reruns skip every finished stage (the manifest).
`--quick` is a smoke run (a few steps per stage, few prompts): plumbing only.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import subprocess
import sys
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's package, also when the installed one is another copy
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH", "")]))}
# Scoring runs beside the other seed's training: with torch's default threads per process, the
# processes oversubscribe the cores and spin (measured on 2 cores beside a training run: 30 s of CPU
# for 16 prompts per domain at 2 threads, 12 s at 1); an OMP_NUM_THREADS the user set wins.
SCORING_ENV = {**ENV, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
DEFAULT_CONFIG = ROOT / "benchmarks" / "configs" / "posttrain_bench.toml"
BASELINE = "baseline"
MODES = ("greedy", "sampled")
JUDGE_EXAMPLES = 400  # held-out verdict examples for the judge-rubric agreement
QUICK_STEPS = {"sft": 20, "expert": 2, "opd": 2, "judge": 10, "general": 2}


# ------------------------------------------------------------------ planning
def seed_pipeline(pipeline, home: Path, seed: int, out: Path, quick: bool):
    """The pipeline of one seed: its own directory, absolute config paths, the seed in every stage,
    the pipeline's own scoring off (the benchmark scores every stage on every domain itself)."""
    from megatron_ernie.config.pipeline import ScoreConfig

    seeded = (f"run.seed={1000 + seed}",)

    def stage(s, extra=(), steps=None):
        config = str((home / s.config).resolve()) if s.config else ""
        return dataclasses.replace(s, config=config, set=(*s.set, *seeded, *extra),
                                   steps=s.steps if steps is None else steps)

    q = QUICK_STEPS if quick else {}
    experts = tuple(dataclasses.replace(e, steps=q.get("expert", e.steps)) for e in pipeline.experts)
    return dataclasses.replace(
        pipeline, dir=str(out / f"seed{seed}"), base=str((home / pipeline.base).resolve()) if pipeline.base else "",
        sft=stage(pipeline.sft, (f"sft.seed={seed}",), q.get("sft")), expert=stage(pipeline.expert),
        experts=experts, opd=stage(pipeline.opd, (), q.get("opd")),
        judge=stage(pipeline.judge, (), q.get("judge")) if pipeline.judge.config else pipeline.judge,
        general=stage(pipeline.general, (), q.get("general")), score=ScoreConfig(prompts=0))


def baseline_pipeline(pipeline):
    """The same pipeline with one expert, "baseline", on every expert's tasks, trained for the experts'
    total steps; planning it gives the baseline RL run from the SFT checkpoint (experts/baseline)."""
    from megatron_ernie.config.pipeline import ExpertConfig

    tasks = tuple(t for e in pipeline.experts for t in e.tasks)
    steps = sum(e.steps or pipeline.expert.steps for e in pipeline.experts)
    return dataclasses.replace(pipeline, experts=(ExpertConfig(BASELINE, tasks, steps),))


def weighted_by_expert_samples(baseline, pipeline):
    """The baseline stage with each task's weight set to the steps its expert trains, so that in
    expectation the mixed run draws as many samples of every domain as the experts together do (a
    domain whose expert trains briefly, such as code, gets the same small share in the baseline)."""
    import re

    steps = {t: e.steps or pipeline.expert.steps for e in pipeline.experts for t in e.tasks}
    text = baseline.config_text
    for task, n in steps.items():
        text = re.sub(rf'(name = "{task}"\nweight = )[0-9.e+-]+', rf"\g<1>{float(n)}", text)
    return dataclasses.replace(baseline, config_text=text)


def samples_of(stage) -> int:
    """Rollout samples a stage trains on: steps x prompts per step x samples per prompt."""
    cfg = tomllib.loads(stage.config_text)
    return cfg["train"]["iters"] * cfg["rl"]["system"]["prompts_per_step"] * cfg["rl"]["sampling"]["n_per_prompt"]


def eval_plan(stages) -> dict:
    """{task: {"options", "seed", "module", "max_new_tokens"}}: each task as the stage that trains it alone
    sees it (an expert's), else as general RL sees it; the same for every row of the matrix."""
    plan = {}
    order = {"experts": 0, "general": 1}
    for stage in sorted(stages, key=lambda s: order.get(s.name.split("/")[0], 2)):
        cfg = tomllib.loads(stage.config_text)
        for task in cfg.get("rl", {}).get("tasks", []):
            plan.setdefault(task["name"], {"options": task.get("options", {}), "seed": task.get("seed", 0),
                                           "module": task.get("module", ""),
                                           "max_new_tokens": cfg["rl"]["sampling"]["max_new_tokens"]})
    return plan


# ---------------------------------------------------------------- evaluation
def evaluate_one(checkpoint: str, plan: dict, prompts: int, samples: int, out: str) -> None:
    """Score one checkpoint on every task of `plan` (runs in its own process: a clean torch world).

    eval-tasks' own per-task logic (evaluate_task) on the checkpoint's config with its [[rl.tasks]]
    replaced by the plan's, and the response budget per task from the plan."""
    from megatron_ernie.config.rl import TaskConfig
    from megatron_ernie.posttrain.evaluate import EvalSettings, evaluate_task
    from megatron_ernie.rl.reward.worker import RewardWorker
    from megatron_ernie.rl.rollout.checkpoint_engine import engine_from_checkpoint

    engine, tokenizer, cfg = engine_from_checkpoint(checkpoint, dtype="fp32", seed=0)
    tasks = tuple(TaskConfig(name=n, seed=p["seed"], options=p["options"], module=p["module"]) for n, p in plan.items())
    cfg = dataclasses.replace(cfg, rl=dataclasses.replace(cfg.rl, tasks=tasks))
    result = {}
    with RewardWorker(cfg.rl.sandbox, 2) as scorer:
        for name, p in plan.items():
            settings = EvalSettings(prompts=prompts, samples=samples, max_new_tokens=p["max_new_tokens"])
            r = evaluate_task(engine, tokenizer, cfg, name, settings, scorer)
            result[name] = {m: [r[m]["mean"], r[m]["stderr"]] for m in MODES}
    Path(out).write_text(json.dumps(result, indent=1) + "\n")


def judge_agreement_of(checkpoint: str, examples: int, out: str) -> None:
    """Judge-rubric agreement (rl/judge/agreement.py) on held-out verdict examples far past training's."""
    from megatron_ernie.config.rl import TaskConfig
    from megatron_ernie.rl.judge.agreement import judge_agreement
    from megatron_ernie.rl.judge.data import FIRST_INDEX, judge_examples
    from megatron_ernie.rl.judge.scorer import load_judge

    scorer, tokenizer, _ = load_judge(checkpoint)
    held_out = judge_examples((TaskConfig(name="open_ended"),), FIRST_INDEX + 1_000_000, examples)
    Path(out).write_text(json.dumps(dataclasses.asdict(judge_agreement(scorer, tokenizer, held_out))) + "\n")


def score_judge(stage, examples: int) -> dict:
    """{accuracy, correlation, ...} of the judge stage's checkpoint, cached in <run dir>/bench_agreement.json."""
    out = stage.run_dir / "bench_agreement.json"
    if not out.is_file():
        command = [sys.executable, __file__, "--judge-agreement", str(stage.output), "--prompts", str(examples),
                   "--json", str(out)]
        with open(stage.run_dir / "bench_agreement.log", "wb") as log:
            if subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=SCORING_ENV).returncode:
                raise RuntimeError(f"judge agreement failed; see {stage.run_dir / 'bench_agreement.log'}")
    return json.loads(out.read_text())


def score_stage(stage, plan: dict, prompts: int, samples: int) -> dict:
    """{task: {mode: [mean, stderr]}} of a finished stage, cached in <run dir>/bench_eval.json."""
    out = stage.run_dir / "bench_eval.json"
    key = json.dumps({"plan": plan, "prompts": prompts, "samples": samples, "output": str(stage.output)},
                     sort_keys=True)
    cached = stage.run_dir / "bench_eval.key"
    if out.is_file() and cached.is_file() and cached.read_text() == key:
        return json.loads(out.read_text())
    command = [sys.executable, __file__, "--evaluate-one", str(stage.output), "--plan", json.dumps(plan),
               "--prompts", str(prompts), "--samples", str(samples), "--json", str(out)]
    with open(stage.run_dir / "bench_eval.log", "wb") as log:
        if subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=SCORING_ENV).returncode:
            raise RuntimeError(f"scoring {stage.name} failed; see {stage.run_dir / 'bench_eval.log'}")
    cached.write_text(key)
    return json.loads(out.read_text())


# ------------------------------------------------------------------- running
def run_seed(pipeline, seed_dir: Path, args) -> dict:
    """Pipeline + baseline of one seed; {stage: {task: {mode: [mean, stderr]}}} and the samples per stage.
    With args.score_only nothing is trained: the stages already finished are scored."""
    from megatron_ernie import config as C
    from megatron_ernie.config.pipeline import PipelineFile
    from megatron_ernie.posttrain.manifest import Manifest
    from megatron_ernie.posttrain.pipeline import resumable, run_group, start_over
    from megatron_ernie.posttrain.stages import plan

    seed_dir.mkdir(parents=True, exist_ok=True)
    path = seed_dir / "pipeline.toml"
    path.write_text(C.dumps(PipelineFile(pipeline)))
    started = time.time()
    stages = plan(pipeline, seed_dir)
    baseline = weighted_by_expert_samples(plan(baseline_pipeline(pipeline), seed_dir)[1], pipeline)
    if not args.score_only:
        code = subprocess.run([sys.executable, "-m", "megatron_ernie.cli", "pipeline", "--config", str(path)],
                              cwd=ROOT, env=ENV).returncode
        if code != 0:
            raise RuntimeError(f"the pipeline of {seed_dir.name} failed (exit {code}); see {seed_dir}/*/stage.log")
        manifest = Manifest(seed_dir / "manifest.json")  # read after the pipeline wrote it: run_group updates it
        if not manifest.is_done(baseline.name, baseline.config_hash, baseline.output):
            if not resumable(baseline, manifest):  # an earlier plan's baseline is not resumed
                start_over(baseline)
            run_group([baseline], manifest, 1)
        print(f"[bench] {seed_dir.name}: stages done in {time.time() - started:.0f} s; scoring", flush=True)
    finished = [s for s in [*stages, baseline] if (s.output / "meta.json").is_file()]  # a checkpoint saved at the end
    tasks, scored, judge = eval_plan(stages), {}, {}
    for stage in finished:
        if stage.name == "judge":  # a verdict model, not a policy: scored by its agreement with the rubric
            judge = score_judge(stage, JUDGE_EXAMPLES)
            continue
        scored[BASELINE if stage is baseline else stage.name] = score_stage(stage, tasks, args.prompts, args.samples)
        (seed_dir / "scores.json").write_text(json.dumps(scored, indent=1) + "\n")  # partial results survive
    samples = {("baseline" if s is baseline else s.name): samples_of(s) for s in [*stages[1:], baseline]}
    print(f"[bench] {seed_dir.name}: done in {time.time() - started:.0f} s", flush=True)
    return {"scores": scored, "samples": samples, "judge": judge}


# ------------------------------------------------------------------ analysis
def cell(values: list[float]) -> tuple[float, float]:
    """Mean over seeds and half the range (the spread of two seeds; 0 for one)."""
    return sum(values) / len(values), (max(values) - min(values)) / 2


def mode_table(per_seed: dict, mode: str, part: int = 0) -> dict:
    """{stage: {task: [value per seed]}} of one decoding mode, from {seed: {stage: {task: {mode: [m, se]}}}};
    part 0 takes the means, part 1 their standard errors over held-out prompts."""
    table: dict = {}
    for scores in per_seed.values():
        for stage, row in scores.items():
            for task, by_mode in row.items():
                table.setdefault(stage, {}).setdefault(task, []).append(by_mode[mode][part])
    return table


def seed_mean_se(errors: list[float]) -> float:
    """Standard error of the mean over seeds of independent cells, in points: sqrt(sum se_i^2) / n."""
    return 100 * math.sqrt(sum(e * e for e in errors)) / len(errors)


def recovery_se(got: float, gain: float, se_sft: float, se_expert: float, se_opd: float) -> float:
    """Delta-method standard error of got / gain, where got = opd - sft and gain = expert - sft share the
    SFT cell (covariance se_sft^2): Var(r) = (Var(got) + r^2 Var(gain) - 2 r se_sft^2) / gain^2."""
    if gain <= 0:
        return float("nan")
    r = got / gain
    var_got, var_gain = se_opd ** 2 + se_sft ** 2, se_expert ** 2 + se_sft ** 2
    return math.sqrt(max(var_got + r * r * var_gain - 2 * r * se_sft ** 2, 0.0)) / gain


def format_matrix(table: dict, tasks: list[str], title: str) -> str:
    """Rows = stages, columns = domains (+ their average); cells mean ± spread over seeds, in points."""
    width = 14
    lines = [title, f"{'stage':<16}" + "".join(f"{t:>{width}}" for t in [*tasks, "average"])]
    for stage, row in table.items():
        means = [cell(row[t]) for t in tasks]
        avg = cell([sum(row[t][i] for t in tasks) / len(tasks) for i in range(len(row[tasks[0]]))])
        lines.append(f"{stage:<16}" + "".join(f"{100 * m:>8.1f} ±{100 * s:>4.1f}" for m, s in [*means, avg]))
    return "\n".join(lines)


def targets(table: dict, experts: dict[str, list[str]], verifiable: list[str], errors: dict | None = None) -> list[str]:
    """The issue's targets on the seed-averaged table (points = 100 x mean reward), each with its standard
    error when `errors` (mode_table(..., part=1)) is given: with 128 prompts one cell's SE is ~3-4 points,
    so a recovery fraction of a 10-point gain carries an SE of ~30-50% and a verdict near its threshold
    says little; the SE tells the reader which verdicts are resolved. Cells are treated as independent;
    every stage is scored on the same prompts, so the SE of a difference is, if anything, smaller."""
    mean = {stage: {t: 100 * cell(v)[0] for t, v in row.items()} for stage, row in table.items()}
    se = {stage: {t: seed_mean_se(v) for t, v in row.items()} for stage, row in errors.items()} if errors else None
    avg = {stage: sum(row[t] for t in verifiable) / len(verifiable) for stage, row in mean.items()}

    def diff_se(a: str, b: str, task: str) -> float | None:
        return math.hypot(se[a][task], se[b][task]) if se else None

    def avg_se(stage: str) -> float:
        return math.sqrt(sum(se[stage][t] ** 2 for t in verifiable)) / len(verifiable)

    lines = []
    for name, tasks in experts.items():
        for task in tasks if f"experts/{name}" in mean and "sft" in mean else ():
            expert = f"experts/{name}"
            gain = mean[expert][task] - mean["sft"][task]
            lines.append(_verdict(f"expert {name} gain over SFT on {task}", gain, gain >= 10, ">= 10 points",
                                  se=diff_se(expert, "sft", task)))
            if "opd" in mean:
                got = mean["opd"][task] - mean["sft"][task]
                frac = got / gain if gain > 0 else float("nan")
                frac_se = (100 * recovery_se(got, gain, se["sft"][task], se[expert][task], se["opd"][task])
                           if se else None)
                lines.append(_verdict(f"OPD recovers of {name}'s gain on {task}", 100 * frac, frac >= 0.6,
                                      f">= 60% (OPD {got:+.1f} of {gain:+.1f} points)", unit="%", se=frac_se))
    if "opd" in avg and all(f"experts/{n}" in avg for n in experts):
        best_name = max(experts, key=lambda n: avg[f"experts/{n}"])
        best = avg[f"experts/{best_name}"]
        lines.append(_verdict("OPD average minus best expert average", avg["opd"] - best, avg["opd"] > best, "> 0",
                              se=math.hypot(avg_se("opd"), avg_se(f"experts/{best_name}")) if se else None))
    if "general" in mean and "opd" in mean:
        for task in verifiable:
            change = mean["general"][task] - mean["opd"][task]
            lines.append(_verdict(f"general RL change on {task}", change, change >= -3, ">= -3 points",
                                  se=diff_se("general", "opd", task)))
        for task in [t for t in mean["general"] if t not in verifiable]:  # the open-ended domains
            change = mean["general"][task] - mean["opd"][task]
            lines.append(_verdict(f"general RL change on {task} (rubric)", change, change > 0, "> 0 points",
                                  se=diff_se("general", "opd", task)))
    if BASELINE in avg and "opd" in avg:
        lines.append(_verdict("OPD average minus baseline average", avg["opd"] - avg[BASELINE],
                              avg["opd"] > avg[BASELINE], "> 0 (not an issue target)",
                              se=math.hypot(avg_se("opd"), avg_se(BASELINE)) if se else None))
    return lines


def _verdict(what: str, value: float, ok: bool, target: str, unit: str = " points", se: float | None = None) -> str:
    error = "" if se is None else f" ± {se:.1f} SE"
    return f"  {'PASS' if ok else 'MISS'}  {what}: {value:+.1f}{unit.strip() and unit}{error}  (target {target})"


def report(per_seed: dict, experts: dict[str, list[str]], verifiable: list[str], tasks: list[str]) -> str:
    """Every table of the benchmark for both decoding modes (what the script prints)."""
    out = []
    for mode in MODES:
        for seed, scores in per_seed.items():
            out.append(format_matrix(mode_table({seed: scores}, mode), tasks, f"\n[{mode}] seed {seed}"))
        table = mode_table(per_seed, mode)
        out.append(format_matrix(table, tasks, f"\n[{mode}] mean ± half-range over seeds {list(per_seed)}"))
        out.append(f"[{mode}] targets (± the standard error over held-out prompts, seeds pooled):")
        out.extend(targets(table, experts, verifiable, mode_table(per_seed, mode, part=1)))
    return "\n".join(out)


def judge_report(judges: dict) -> str:
    """One line per seed: the learned judge's agreement with the rubric on held-out verdicts."""
    lines = ["\njudge-rubric agreement (held-out verdicts; chance = 0.5):"]
    for seed, j in judges.items():
        lines.append(f"  seed {seed}: " + (f"accuracy {j['accuracy']:.3f}, Pearson r {j['correlation']:.3f}, "
                                           f"mean |score - rubric| {j.get('mean_abs_error', float('nan')):.3f}, "
                                           f"mean p(y) {j['mean_score_yes']:.3f} (rubric y) vs "
                                           f"{j['mean_score_no']:.3f} (rubric n), {j['examples']} examples"
                                           if j else "no judge stage"))
        if j and j.get("by_kind"):
            from megatron_ernie.rl.judge.agreement import Agreement

            lines.append("    " + Agreement(**j).kinds_line())
    return "\n".join(lines)


# ----------------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="the pipeline file to measure")
    p.add_argument("--seeds", default="1,2", help="comma-separated seeds (>= 2 for a spread)")
    p.add_argument("--out", default=str(ROOT / "runs" / "posttrain-bench"))
    p.add_argument("--quick", action="store_true", help="smoke run: a few steps per stage, 8 prompts")
    p.add_argument("--prompts", type=int, default=0, help="held-out prompts per domain (0: 128, quick 8)")
    p.add_argument("--samples", type=int, default=0,
                   help="T=1 samples per prompt (0: 4, quick 1); at 1 one seed's T=1 cell has an SE of ~3.5-4 "
                        "points, at 4 ~2 (arithmetic, code) to ~3 (calc, whose prompts differ more than "
                        "its samples)")
    p.add_argument("--score-only", action="store_true", help="train nothing: score and report the finished stages")
    p.add_argument("--evaluate-one", default="", help=argparse.SUPPRESS)
    p.add_argument("--judge-agreement", default="", help=argparse.SUPPRESS)
    p.add_argument("--plan", default="", help=argparse.SUPPRESS)
    p.add_argument("--json", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for name in ("prompts", "samples"):  # checked here, not by the scoring subprocess after every stage trained
        if getattr(args, name) < 0:
            p.error(f"--{name} {getattr(args, name)}: use a positive count, or 0 for the default")
    args.prompts = args.prompts or (8 if args.quick else 128)
    args.samples = args.samples or (1 if args.quick else 4)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ["PYTHONPATH"] = ENV["PYTHONPATH"]  # the stages this process starts itself (the baseline)
    if args.evaluate_one:
        evaluate_one(args.evaluate_one, json.loads(args.plan), args.prompts, args.samples, args.json)
        return 0
    if args.judge_agreement:
        judge_agreement_of(args.judge_agreement, args.prompts, args.json)
        return 0
    from megatron_ernie.posttrain.stages import load_pipeline

    template, home = load_pipeline(args.config)
    out = Path(args.out).resolve() / ("quick" if args.quick else "full")
    started, per_seed, judges = time.time(), {}, {}
    for seed in [int(s) for s in args.seeds.split(",") if s.strip()]:
        result = run_seed(seed_pipeline(template, home, seed, out, args.quick), out / f"seed{seed}", args)
        per_seed[seed] = result["scores"]
        judges[seed] = result["judge"]
        (out / "results.json").write_text(json.dumps(per_seed, indent=1) + "\n")
        print(f"[bench] samples per stage: {result['samples']}", flush=True)
    experts = {e.name: list(e.tasks) for e in template.experts}
    verifiable = [t for ts in experts.values() for t in ts]
    tasks = list(next(iter(next(iter(per_seed.values())).values()), {}))
    print(report(per_seed, experts, verifiable, tasks))
    print(judge_report(judges))
    print(f"\n[bench] total {time.time() - started:.0f} s; scores in {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
