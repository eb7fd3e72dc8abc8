"""ERNIE 5.1's elastic claim at tiny scale, measured so that it can fail honestly.

    python benchmarks/elastic_cost.py [--iters 1500] [--seeds 1,2] [--arms supernet,targets,gate,ofa]
                                      [--nproc 2] [--out runs/elastic_cost] [--quick] [--force]

The claim: a sub-model extracted from one elastic supernet and continued for
~6% of the supernet's tokens is as good as the same architecture trained from
scratch for all of them. The benchmark, per seed (the init seed varies, the
data order is fixed: data.seed is the same in every arm):

1. **Target** chosen by parameter counts alone (elastic/params.py), before
   anything trains: the grid member closest to 1/3 of the largest's total and
   1/2 of its active parameters, by NON-embedding parameters (embeddings are
   about half of a tiny model, and counting them forces a depth cut); the
   pick by all parameters is printed beside it.
2. **Regime gate**: the plain full model and the target, each from scratch
   for N tokens. If the full model is not ahead by >= 0.04 nats (mean over
   seeds), a supernet has nothing to pass down at this N: the run prints
   "not testable at this N" and stops (--force runs the arms anyway).
3. **Arms**: a supernet trained for N tokens with a recipe (below), then the
   target extracted with its Adam moments and data position
   (`ernie extract --optimizer`) and continued for 6% of N on fresh tokens at
   <= the supernet's final LR (train/continuation.py).
   Recipes (each an ablation row): `supernet` (the sandwich: largest,
   smallest, one random member, in-place distillation), `targets` (+ the
   target trained every step, elastic.targets), `gate` (+ distillation only
   where the largest is better per token, ramped in over the first 20%),
   `ofa` (+ the largest alone for the first 25% of N, experts and channels
   reordered by importance, then the axes open: elastic.open_after), `kd`
   (the `targets` supernet, its continuation distilled from the frozen
   supernet: `--teacher`, train/distill.py).
4. **Report**: every arm and seed on the whole validation split; the supernet
   tax (its largest vs the plain full model at equal tokens); extracted+6%
   minus from-scratch per seed, mean and max, against the targets (mean <=
   +0.02, no seed > +0.04, tax <= 0.02); a cost table in training FLOPs (3 x
   forward matmul FLOPs per token, summed over the exact sub-networks each
   step trained — the sandwich sampler's own members, checked against the
   active parameters the run logged).

Finished runs are reused (each run directory keeps a result.json), so a run
stopped half-way continues where it stopped.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
BASE_CONFIG = ROOT / "configs" / "tiny_cpu.toml"
MODEL = ["model.num_layers=6", "model.hidden_size=96", "model.num_attention_heads=4", "model.num_query_groups=2",
         "model.ffn_hidden_size=192", "model.seq_length=64", "moe.num_experts=8", "moe.router_topk=2",
         "moe.expert_ffn_hidden_size=128", "moe.first_dense_layers=1", "data.vocab_size=1024",
         "train.global_batch_size=16", "train.micro_batch_size=4", "checkpoint.keep_last=1", "parallel.expert=1",
         "optimizer.lr=3e-3", "optimizer.min_lr=3e-4", "schedule.decay_style=\"cosine\""]
ELASTIC = ["elastic.enabled=true", "elastic.depth=[3, 4, 5]", "elastic.ffn=[0.5, 0.75]",
           "elastic.experts=[4, 6]", "elastic.topk=[1]", "elastic.sandwich_random=1", "elastic.eval_subnets=8"]
# expert parallel 1 (2 processes = data parallel 2): `ernie extract --optimizer` runs in one process and
# cannot regroup the dense/expert optimizers an expert-parallel run keeps (extract.check_single_optimizer)
GATE_MIN_GAP = 0.04  # nats the full model must lead the target by for the question to be testable
TARGETS = {"mean_gap": 0.02, "max_gap": 0.04, "tax": 0.02}
CONTINUE_FRACTION = 0.06
ARMS = ("supernet", "targets", "gate", "ofa", "kd")


def recipe(arm: str, iters: int, target: str) -> list[str]:
    """The supernet overrides of one ablation row (each row adds to the plain sandwich)."""
    rows = {
        "supernet": [],
        "targets": [f'elastic.targets=["{target}"]'],
        "gate": [f'elastic.targets=["{target}"]', "elastic.distill_gate=true",
                 f"elastic.distill_ramp_iters={max(1, iters // 5)}"],
        "ofa": [f'elastic.targets=["{target}"]', f"elastic.open_after={max(1, iters // 4)}"],
    }
    return rows[arm]


# ------------------------------------------------------------------ configs
def base_config(overrides=()):
    from megatron_ernie import config as C

    return C.load(str(BASE_CONFIG), [*MODEL, *ELASTIC, *overrides])


def grid_sizes(cfg) -> list[dict]:
    """Every grid member with its parameter counts, all and non-embedding."""
    from megatron_ernie.elastic.params import subnet_size
    from megatron_ernie.elastic.search import grid
    from megatron_ernie.elastic.subnet import choices
    from megatron_ernie.model.build import padded_vocab_size

    vocab = padded_vocab_size(cfg.data.vocab_size, cfg.parallel.tensor)
    h = cfg.model.hidden_size
    embedding = vocab * h * (2 if cfg.model.untie_embeddings_and_output_weights else 1) + h
    rows = []
    for s in grid(choices(cfg.elastic, cfg.model, cfg.moe), cfg.model, cfg.moe):
        size = subnet_size(cfg.model, cfg.moe, vocab, s, cfg.elastic.layer_order)
        rows.append({"subnet": str(s), "total": size.total, "active": size.active, "fpt": size.flops_per_token,
                     "total_ne": size.total - embedding, "active_ne": size.active - embedding})
    return rows


def pick_target(rows: list[dict], non_embedding: bool) -> dict:
    """Closest to 1/3 of the largest's total and 1/2 of its active parameters."""
    t, a = ("total_ne", "active_ne") if non_embedding else ("total", "active")
    big = max(rows, key=lambda r: (r[t], r[a]))
    return min(rows, key=lambda r: abs(r[t] / big[t] - 1 / 3) + abs(r[a] / big[a] - 1 / 2))


def write_plain_config(cfg, subnet_text: str | None, path: Path) -> Path:
    """A standalone (non-elastic) config: the full model, or the target as extraction would write it."""
    from megatron_ernie import config as C
    from megatron_ernie.elastic.extract import subnet_config
    from megatron_ernie.elastic.subnet import parse_subnet, full_subnet

    subnet = parse_subnet(subnet_text, cfg.model, cfg.moe) if subnet_text else full_subnet(cfg.model, cfg.moe)
    plain = subnet_config(cfg, subnet)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(C.dumps(plain))
    return path


def valid_iters(cfg) -> int:
    """Iterations that cover the whole validation split once (megatron builds at least one epoch)."""
    from megatron_ernie.data.pipeline import setup_data

    data = setup_data(cfg.data, cfg.model.seq_length, (cfg.train.global_batch_size, 1, None))
    return max(1, len(data.valid) // cfg.train.global_batch_size)


# --------------------------------------------------------------------- runs
def sh(cmd, log: Path) -> str:
    started = time.time()
    proc = subprocess.run([str(c) for c in cmd], cwd=ROOT, capture_output=True, text=True, env=ENV)
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        sys.exit(f"failed ({log}): {' '.join(map(str, cmd))}\n{proc.stderr[-3000:]}")
    print(f"  [{time.time() - started:7.1f} s] {log.parent.name}/{log.stem}", flush=True)
    return proc.stdout + proc.stderr


def pretrain(nproc: int, config: Path, run_dir: Path, sets: list[str], name: str) -> str:
    args = [x for s in sets for x in ("--set", s)]
    return sh([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "megatron_ernie.cli", "pretrain", "--config", config, "--set", f'run.dir="{run_dir}"',
               "--resume", "auto", *args], run_dir.parent / "logs" / f"{name}.log")


def last_valid(log: str) -> float:
    return float(re.findall(r"validation at iteration \d+ \| loss ([0-9.]+)", log)[-1])


def cached(run_dir: Path, produce) -> dict:
    """The run's result.json, produced once."""
    path = run_dir / "result.json"
    if path.is_file():
        return json.loads(path.read_text())
    result = produce()
    path.write_text(json.dumps(result, indent=1))
    return result


def scratch(args, cfg, subnet_text, name, seed, out: Path) -> dict:
    run_dir = out / f"seed{seed}" / name
    config = write_plain_config(cfg, subnet_text, run_dir.parent / "configs" / f"{name}.toml")
    sets = [f"run.seed={seed}", f"train.iters={args.iters}", f"train.eval_interval={args.iters}",
            f"train.eval_iters={args.valid_iters}", f"checkpoint.save_interval={args.iters}"]
    return cached(run_dir, lambda: {"loss": last_valid(pretrain(args.nproc, config, run_dir, sets, name))})


def recipe_of(arm: str) -> str:
    """The supernet recipe an arm trains: "kd" shares the "targets" supernet (only its continuation differs)."""
    return "targets" if arm == "kd" else arm


def supernet_dir(seed_dir: Path, arm: str) -> Path:
    return seed_dir / f"{recipe_of(arm)}_supernet"


def supernet_arm(args, cfg, arm, target, seed, out: Path) -> dict:
    """Supernet of one recipe, then the target extracted (+ Adam moments, data position) and continued.
    Arm "kd" is the "targets" supernet (shared) continued with the frozen supernet as its teacher."""
    seed_dir = out / f"seed{seed}"
    recipe_arm = recipe_of(arm)
    sup = supernet_dir(seed_dir, arm)
    sets = [*MODEL, *ELASTIC, *recipe(recipe_arm, args.iters, target), f"run.seed={seed}", f"train.iters={args.iters}",
            f"train.eval_interval={args.iters}", f"train.eval_iters={args.valid_iters}",
            f"checkpoint.save_interval={args.iters}"]
    if arm == "ofa":
        sup_result = cached(sup, lambda: ofa_supernet(args, sets, sup, seed_dir))
    else:
        sup_result = cached(sup, lambda: {"loss": last_valid(pretrain(args.nproc, BASE_CONFIG, sup, sets,
                                                                      recipe_arm))})
    return {"supernet": sup_result["loss"], **continued(args, sup, target, seed_dir, arm), "sets": sets}


def ofa_supernet(args, sets, sup: Path, seed_dir: Path) -> dict:
    """Largest alone to elastic.open_after, reorder experts/channels by importance, then open the axes."""
    open_after = max(1, args.iters // 4)
    # the closed phase is the first open_after iterations of the same N-iteration schedule (exit_interval
    # stops the job with a checkpoint; train.iters=open_after would save a schedule that ends there)
    pretrain(args.nproc, BASE_CONFIG, sup, [*sets, f"train.exit_interval={open_after}"], "ofa_closed")
    sh([sys.executable, "-m", "megatron_ernie.cli", "reorder", "--run-dir", sup], seed_dir / "logs" / "ofa_reorder.log")
    return {"loss": last_valid(pretrain(args.nproc, BASE_CONFIG, sup, sets, "ofa_open"))}


def continued(args, sup: Path, target: str, seed_dir: Path, arm: str) -> dict:
    extracted, cont = seed_dir / f"{arm}_extracted", seed_dir / f"{arm}_continued"
    iters = max(1, round(CONTINUE_FRACTION * args.iters))
    teacher = [f'distill.teacher="{sup / "checkpoints"}"', "distill.weight=0.5"] if arm == "kd" else []

    def run():
        if not (extracted / "config.toml").is_file():
            sh([sys.executable, "-m", "megatron_ernie.cli", "extract", "--run-dir", sup, "--subnet", target,
                "--out", extracted, "--optimizer"], seed_dir / "logs" / f"{arm}_extract.log")
        row = sh([sys.executable, "-m", "megatron_ernie.cli", "eval", "--run-dir", sup, "--subnet", target, "--json",
                  "--set", f"train.eval_iters={args.valid_iters}"], seed_dir / "logs" / f"{arm}_target_eval.log")
        in_supernet = json.loads([line for line in row.splitlines() if line.startswith("{")][-1])["valid_loss"]
        ckpt = next((extracted / "checkpoints").glob("iter_*"))
        sets = [f'checkpoint.load="{ckpt}"', f"train.iters={iters}", f"train.eval_interval={iters}",
                f"train.eval_iters={args.valid_iters}", f"checkpoint.save_interval={iters}", *teacher]
        loss = last_valid(pretrain(args.nproc, extracted / "config.toml", cont, sets, f"{arm}_continued"))
        return {"extracted": in_supernet, "continued": loss, "continue_iters": iters}

    return cached(cont, run)


# -------------------------------------------------------------------- FLOPs
def supernet_flops(sets: list[str], iters: int) -> dict:
    """Training FLOPs of a supernet run: 3 x forward matmul FLOPs per token of every member the sandwich
    sampler drew at every iteration (the run's own sampler, replayed), and the members' mean active
    parameters per iteration, to check against what the run logged (elastic/active_params_mean)."""
    from megatron_ernie import config as C
    from megatron_ernie.elastic.params import subnet_size
    from megatron_ernie.elastic.subnet import choices, sample_step, target_subnets
    from megatron_ernie.model.build import padded_vocab_size

    cfg = C.load(str(BASE_CONFIG), sets)
    vocab = padded_vocab_size(cfg.data.vocab_size, cfg.parallel.tensor)
    axes, targets = choices(cfg.elastic, cfg.model, cfg.moe), target_subnets(cfg.elastic, cfg.model, cfg.moe)
    tokens = cfg.train.global_batch_size * cfg.model.seq_length
    total, active_mean = 0, []
    for it in range(iters):
        sizes = [subnet_size(cfg.model, cfg.moe, vocab, s, cfg.elastic.layer_order)
                 for _, s in sample_step(cfg.elastic, axes, it, cfg.run.seed, targets)]
        total += 3 * tokens * sum(z.flops_per_token for z in sizes)
        active_mean.append(sum(z.active for z in sizes) / len(sizes))
    return {"total": total, "active_mean": active_mean}


def logged_active_mean(run_dir: Path) -> list[float]:
    """elastic/active_params_mean per step, read back with TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values = {}
    for events in sorted((run_dir / "tensorboard").glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        if "elastic/active_params_mean" in acc.Tags().get("scalars", []):
            values.update({e.step: e.value for e in acc.Scalars("elastic/active_params_mean")})
    return [values[k] for k in sorted(values)]


def plain_flops(rows: list[dict], subnet: str, tokens: int) -> int:
    return 3 * tokens * next(r["fpt"] for r in rows if r["subnet"] == subnet)


# ------------------------------------------------------------------- report
def spread(values: list[float]) -> str:
    mean = statistics.fmean(values)
    return f"{mean:.4f} [{min(values):.4f}, {max(values):.4f}]" if len(values) > 1 else f"{mean:.4f}"


def regime(results: dict) -> float:
    """Mean over seeds of (target from scratch - full model from scratch): what a supernet could pass down."""
    return statistics.fmean(r["scratch_target"] - r["scratch_full"] for r in results.values())


def print_choice(rows: list[dict], by_ne: dict, by_all: dict) -> None:
    big = max(rows, key=lambda r: (r["total"], r["active"]))
    print("target (closest to 1/3 total, 1/2 active of the largest):")
    for label, r in (("by non-embedding parameters", by_ne), ("by all parameters", by_all)):
        print(f"  {label:<30} {r['subnet']:<34} total {r['total'] / big['total']:.2f} "
              f"(non-emb {r['total_ne'] / big['total_ne']:.2f}), active {r['active'] / big['active']:.2f} "
              f"(non-emb {r['active_ne'] / big['active_ne']:.2f})")


def report(results: dict, arms: list[str], costs: dict, testable: bool = True) -> None:
    seeds = sorted(results)
    print(f"\nvalidation loss on the whole validation split, seeds {seeds} (mean [min, max])")
    print(f"{'arm':<34}{'loss':>28}")
    print(f"{'full model from scratch':<34}{spread([results[s]['scratch_full'] for s in seeds]):>28}")
    print(f"{'target from scratch':<34}{spread([results[s]['scratch_target'] for s in seeds]):>28}")
    for arm in arms:
        for key, label in (("supernet", "supernet largest"), ("extracted", "target in supernet"),
                           ("continued", "extracted + 6% continued")):
            print(f"{arm + ': ' + label:<34}{spread([results[s][arm][key] for s in seeds]):>28}")
    print("\nper seed: " + "; ".join(f"seed {s}: " + ", ".join(
        f"{k}={v:.4f}" if isinstance(v, float) else f"{k}: sup {v['supernet']:.4f} ext {v['extracted']:.4f} "
        f"cont {v['continued']:.4f}" for k, v in results[s].items()) for s in seeds))
    print(f"\n{'arm':<12}{'continued - scratch (mean, max)':>34}{'supernet tax':>16}  verdict")
    for arm in arms:
        gaps = [results[s][arm]["continued"] - results[s]["scratch_target"] for s in seeds]
        tax = statistics.fmean(results[s][arm]["supernet"] - results[s]["scratch_full"] for s in seeds)
        ok = (statistics.fmean(gaps) <= TARGETS["mean_gap"] and max(gaps) <= TARGETS["max_gap"]
              and tax <= TARGETS["tax"])
        verdict = ("PASS" if ok else "MISS") if testable else "no verdict (regime gate failed)"
        print(f"{arm:<12}{statistics.fmean(gaps):>+17.4f}, {max(gaps):>+8.4f}{tax:>+16.4f}  {verdict}"
              f" (targets: mean <= +{TARGETS['mean_gap']}, max <= +{TARGETS['max_gap']}, tax <= {TARGETS['tax']})")
    print(f"\ntraining cost (FLOPs, one seed)")
    for label, flops in costs.items():
        print(f"  {label:<44}{flops:>14.3e}")


# --------------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iters", type=int, default=1500, help="N in iterations (16 x 64 tokens each)")
    p.add_argument("--seeds", default="1,2", help="init seeds (the data order is the same in every arm)")
    p.add_argument("--arms", default=",".join(ARMS), help="supernet recipes, one ablation row each")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "runs" / "elastic_cost"))
    p.add_argument("--force", action="store_true", help="run the arms even when the regime gate says no")
    p.add_argument("--quick", action="store_true", help="smoke run: 16 iterations, one seed, 2 validation batches")
    args = p.parse_args(argv)
    if args.quick:
        args.iters, args.seeds, args.force = 16, "1", True
    args.seed_list = [int(x) for x in args.seeds.split(",") if x.strip()]
    args.arm_list = [a for a in args.arms.split(",") if a.strip()]
    bad = [a for a in args.arm_list if a not in ARMS]
    if bad:
        p.error(f"--arms {bad}: choose from {', '.join(ARMS)}")
    return args


def check_logged(arm: str, run_dir: Path, replayed: list[float]) -> None:
    """The replayed sampler against what the run logged (largest relative difference per step)."""
    logged = logged_active_mean(run_dir)
    if not logged:
        print(f"  {arm}: no elastic/active_params_mean logged; FLOPs from the replayed sampler only")
        return
    n = min(len(logged), len(replayed))
    worst = max(abs(a - b) / b for a, b in zip(logged[-n:], replayed[-n:]))
    print(f"  {arm}: replayed active parameters vs logged over {n} steps: largest relative difference {worst:.1e}")


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.time()
    cfg = base_config([f"train.iters={args.iters}"])
    rows = grid_sizes(cfg)
    by_ne, by_all = pick_target(rows, True), pick_target(rows, False)
    print_choice(rows, by_ne, by_all)
    target = by_ne["subnet"]
    args.valid_iters = 2 if args.quick else valid_iters(cfg)
    tokens_per_iter = cfg.train.global_batch_size * cfg.model.seq_length
    n_tokens = args.iters * tokens_per_iter
    print(f"N = {n_tokens:,} tokens ({args.iters} iterations); validation: {args.valid_iters} batches "
          f"({args.valid_iters * tokens_per_iter:,} tokens)", flush=True)
    out = Path(args.out).resolve() / ("quick" if args.quick else f"n{args.iters}")
    results = {s: {} for s in args.seed_list}
    for seed in args.seed_list:
        results[seed]["scratch_full"] = scratch(args, cfg, None, "scratch_full", seed, out)["loss"]
        results[seed]["scratch_target"] = scratch(args, cfg, target, "scratch_target", seed, out)["loss"]
    gap = regime(results)
    per_seed = ", ".join(f"seed {s}: full {r['scratch_full']:.4f}, target {r['scratch_target']:.4f}"
                         for s, r in sorted(results.items()))
    print(f"regime gate: target - full model, both from scratch: {gap:+.4f} nats (need >= {GATE_MIN_GAP}; "
          f"{per_seed})")
    if gap < GATE_MIN_GAP and not args.force:
        print(f"not testable at this N: the full model is not ahead of the target, so a supernet has nothing to "
              f"pass down; train longer (--iters) or pass --force to run the arms anyway")
        return 0
    full = max(rows, key=lambda r: r["total"])["subnet"]
    costs = {"target from scratch (N tokens)": plain_flops(rows, target, n_tokens),
             "full model from scratch (N tokens)": plain_flops(rows, full, n_tokens)}
    for arm in args.arm_list:
        for seed in args.seed_list:
            results[seed][arm] = supernet_arm(args, cfg, arm, target, seed, out)
        sets = results[args.seed_list[0]][arm].pop("sets")
        for seed in args.seed_list[1:]:
            results[seed][arm].pop("sets")
        flops = supernet_flops(sets, args.iters)
        check_logged(arm, supernet_dir(out / f"seed{args.seed_list[0]}", arm), flops["active_mean"])
        cont = results[args.seed_list[0]][arm]["continue_iters"] * tokens_per_iter
        costs[f"{arm}: supernet (N tokens)"] = flops["total"]
        teacher = plain_flops(rows, full, cont) // 3 if arm == "kd" else 0  # the teacher's forward passes
        costs[f"{arm}: supernet + continuation"] = flops["total"] + plain_flops(rows, target, cont) + teacher
    family = json.loads((supernet_dir(out / f"seed{args.seed_list[0]}", args.arm_list[0]) / "elastic"
                         / "family.json").read_text()) if args.arm_list else []
    if family:
        costs[f"the family's {len(family)} members, each from scratch"] = sum(
            plain_flops(rows, r["subnet"], n_tokens) for r in family)
    report(results, args.arm_list, costs, testable=gap >= GATE_MIN_GAP)
    (out / "results.json").write_text(json.dumps({"target": target, "n_tokens": n_tokens, "results": results,
                                                  "costs": costs}, indent=1))
    print(f"\n[bench] {time.time() - started:.0f} s; results in {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
