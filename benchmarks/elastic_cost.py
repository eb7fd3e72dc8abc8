"""The seed's claim at tiny scale: one elastic supernet vs training each size from scratch.

    python benchmarks/elastic_cost.py [--iters 300] [--nproc 2] [--out runs/elastic_cost]

1. train an elastic MoE supernet for N tokens (sandwich rule + in-place distillation);
2. search its grid, extract the sub-network closest to 1/3 of the total and 1/2
   of the active parameters, continue training it for 6% of N tokens;
3. train the same architecture from scratch for N tokens;
4. report validation losses, tokens and training FLOPs side by side, plus the
   family of sub-networks (loss vs active parameters) from the one supernet.

Training FLOPs are counted as 6 x (active matmul parameters) per token for
every sub-network forward/backward (the sandwich runs several per token).
Everything runs through the real CLI (torchrun, ernie pretrain/search/extract).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL = ["model.num_layers=6", "model.hidden_size=96", "model.num_attention_heads=4", "model.num_query_groups=2",
         "model.ffn_hidden_size=192", "model.seq_length=64", "moe.num_experts=8", "moe.router_topk=2",
         "moe.expert_ffn_hidden_size=128", "moe.first_dense_layers=1", "data.vocab_size=1024",
         "train.global_batch_size=16", "train.micro_batch_size=4", "train.eval_iters=8",
         "checkpoint.keep_last=1", "parallel.expert=2"]
ELASTIC = ["elastic.enabled=true", "elastic.depth=[3, 4, 5]", "elastic.ffn=[0.5, 0.75]",
           "elastic.experts=[4, 6]", "elastic.topk=[1]", "elastic.sandwich_random=1", "elastic.eval_subnets=8"]


def sh(cmd, env=None) -> str:
    t0 = time.time()
    proc = subprocess.run([str(c) for c in cmd], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})
    if proc.returncode != 0:
        sys.exit(f"failed: {' '.join(map(str, cmd))}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    print(f"  [{time.time() - t0:6.1f} s] {' '.join(map(str, cmd[:6]))} ...", flush=True)
    return proc.stdout


def pretrain(nproc, run_dir, overrides) -> str:
    sets = [x for o in overrides for x in ("--set", o)]
    return sh([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "megatron_ernie.cli", "pretrain", "--config", ROOT / "configs/tiny_cpu.toml",
               "--set", f"run.dir=\"{run_dir}\"", *sets])


def last_eval(log: str) -> float:
    return float(re.findall(r"validation at iteration \d+ \| loss ([0-9.]+)", log)[-1])


def pick_target(rows: list[dict]) -> dict:
    """Closest to 1/3 of the total and 1/2 of the active parameters of the largest."""
    big = max(rows, key=lambda r: (int(r["total_params"]), int(r["active_params"])))
    T, A = int(big["total_params"]), int(big["active_params"])
    return min(rows, key=lambda r: abs(int(r["total_params"]) / T - 1 / 3) + abs(int(r["active_params"]) / A - 1 / 2))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iters", type=int, default=300)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--out", default="runs/elastic_cost")
    args = p.parse_args()
    out = (ROOT / args.out).resolve()
    tokens_per_iter = 16 * 64
    n_tokens = args.iters * tokens_per_iter
    cont_iters = max(1, round(0.06 * args.iters))
    print(f"N = {n_tokens:,} tokens ({args.iters} iterations); continuation {cont_iters} iterations")

    sup = out / "supernet"
    log_sup = pretrain(args.nproc, sup, MODEL + ELASTIC + [f"train.iters={args.iters}",
                                                           f"train.eval_interval={args.iters}",
                                                           f"checkpoint.save_interval={args.iters}"])
    sh([sys.executable, "-m", "megatron_ernie.cli", "search", "--run-dir", sup], env={"MASTER_PORT": "29713"})
    rows = list(csv.DictReader(open(sup / "elastic" / "search.csv")))
    target = pick_target(rows)
    ext = out / "extracted"
    sh([sys.executable, "-m", "megatron_ernie.cli", "extract", "--run-dir", sup, "--subnet", target["subnet"],
        "--out", ext], env={"MASTER_PORT": "29714"})
    ckpt = ext / "checkpoints" / "iter_0000000"
    cont = out / "continued"
    log_cont = sh([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
                   "-m", "megatron_ernie.cli", "pretrain", "--config", ext / "config.toml",
                   "--set", f"run.dir=\"{cont}\"", "--set", f"checkpoint.load=\"{ckpt}\"",
                   "--set", f"train.iters={cont_iters}", "--set", f"train.eval_interval={cont_iters}",
                   "--set", "schedule.warmup_iters=1", "--set", "optimizer.lr=1e-3"])
    scratch = out / "scratch"
    log_scratch = sh([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
                      "-m", "megatron_ernie.cli", "pretrain", "--config", ext / "config.toml",
                      "--set", f"run.dir=\"{scratch}\"", "--set", f"train.iters={args.iters}",
                      "--set", f"train.eval_interval={args.iters}", "--set", "checkpoint.load=\"\""])
    report(args, n_tokens, cont_iters * tokens_per_iter, rows, target, last_eval(log_sup),
           last_eval(log_cont), last_eval(log_scratch), sup)


def report(args, n_tokens, cont_tokens, rows, target, sup_loss, cont_loss, scratch_loss, sup):
    from megatron_ernie.elastic.search import plot_pareto

    big = max(rows, key=lambda r: (int(r["total_params"]), int(r["active_params"])))
    act_t = int(target["active_params"])
    sandwich_active = 3 * int(big["active_params"])  # upper bound: largest + smallest + random per token
    fl_sup = 6 * n_tokens * sandwich_active
    fl_cont = 6 * cont_tokens * act_t
    fl_scratch = 6 * n_tokens * act_t
    print("\nelastic supernet vs from scratch (validation loss on the same held-out batches)")
    print(f"{'model':<44}{'tokens':>12}{'train FLOPs':>14}{'valid loss':>12}")
    print(f"{'supernet (largest) ' + big['subnet']:<44}{n_tokens:>12,}{fl_sup:>14.3e}{sup_loss:>12.4f}")
    print(f"{'target ' + target['subnet'] + ' in supernet':<44}{'':>12}{'':>14}{float(target['valid_loss']):>12.4f}")
    print(f"{'  extracted + 6% continued':<44}{n_tokens + cont_tokens:>12,}{fl_sup + fl_cont:>14.3e}{cont_loss:>12.4f}")
    print(f"{'  same size from scratch':<44}{n_tokens:>12,}{fl_scratch:>14.3e}{scratch_loss:>12.4f}")
    print(f"target size: total {int(target['total_params']):,} / {int(big['total_params']):,} "
          f"({int(target['total_params']) / int(big['total_params']):.2f}), active {act_t:,} / "
          f"{int(big['active_params']):,} ({act_t / int(big['active_params']):.2f})")
    each = sum(6 * n_tokens * int(r["active_params"]) for r in rows)
    print(f"training all {len(rows)} sizes from scratch for N tokens each: {each:.3e} FLOPs "
          f"({each / fl_sup:.1f}x the supernet)")
    family = sorted(rows, key=lambda r: int(r["active_params"]))
    print(f"\nfamily from the one supernet ({len(family)} sub-networks; Pareto front marked *):")
    for r in family:
        print(f"  {r['subnet']:<36}{int(r['active_params']):>10,} active  loss {float(r['valid_loss']):.4f} "
              f"{'*' if r['pareto'] == 'True' else ''}")
    reference = [{"label": "from scratch", "active_params": act_t, "valid_loss": scratch_loss},
                 {"label": "extracted+6%", "active_params": act_t, "valid_loss": cont_loss}]
    typed = [{**r, "active_params": int(r["active_params"]), "valid_loss": float(r["valid_loss"]),
              "pareto": r["pareto"] == "True"} for r in rows]
    plot_pareto(typed, sup / "elastic" / "cost_pareto.png", reference)
    (sup / "elastic" / "cost.json").write_text(json.dumps({
        "n_tokens": n_tokens, "target": target["subnet"], "supernet_loss": sup_loss, "continued_loss": cont_loss,
        "scratch_loss": scratch_loss, "flops": {"supernet": fl_sup, "continued": fl_cont, "scratch": fl_scratch}},
        indent=2))
    print(f"plot: {sup / 'elastic' / 'cost_pareto.png'}")


if __name__ == "__main__":
    main()
