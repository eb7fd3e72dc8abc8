"""GPU readiness in one run: megatron-core on CUDA, bf16 MFU, real FP8 GEMMs, rollout K3.

    python benchmarks/gpu_check.py [--out DIR] [--cpu-dry-run] [--budget-s 420]
    (benchmarks/gpu_check.sh installs megatron-core from carried wheels first)

Sections, in priority order, each isolated (an error or a timeout is recorded
in the report and the next section runs) and all under one deadline:

1. environment: torch/CUDA/GPU, the megatron-core version in use, whether the
   CPU compatibility layer stays off (it must on CUDA: `cpu_compat.apply()`
   returns False and torch.cuda is left untouched), and whether this torch runs
   FP8 GEMMs (fp8.backend = "torch");
2. GEMM rates: an n^3 bf16 matmul (n = 8192 on the GPU), the denominator of MFU,
   and the same FP8 GEMM through torch._scaled_mm;
3. GPU-marked tests of the torch FP8 backend (cuBLAS FP8 vs the emulation);
4. `ernie pretrain` (torchrun, one process) of a ~1B dense model in bf16 and in
   FP8 (backend "torch", each recipe of --recipes) from the same seed and data:
   tokens/s, MFU = model FLOPs/s / measured bf16 GEMM rate, FP8 step-time ratio
   and loss gap to bf16;
5. an MoE of about the dense model's active size in bf16 (SequentialMLP experts:
   without TE there is no grouped GEMM);
6. RL: benchmarks/fp8_rollout_kl.py (bf16 KV-cache decoding in the rollout
   engine vs the trainer's full-sequence forward): K3 and route mismatch with
   and without routing replay.

Model FLOPs per token (Megatron's accounting): 6 x the matmul weights a token
meets (attention projections, the dense FFN or its top-k experts and router,
the LM head) plus 6 x 2 x seq x hidden per layer for QK^T and AV (full square).

Writes gpu_check.json and gpu_check.md (and gpu_check.log, the tails of every
subprocess) to --out. `--cpu-dry-run` runs every section on CPU with tiny
sizes (about a minute): CI runs it (tests/test_gpu_check.py), so the device
minutes go to measurements, not start-up errors.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # megatron_ernie from this checkout

# Model sizes. GPU: dense ~1.0B parameters; MoE: the same attention and about the
# same active FFN (top-2 of 6 experts of half the dense width), ~2.4B in total (with
# bf16 weights, fp32 grads and Adam, ~45 GB before activations: it fits one 80 GB GPU).
GPU_COMMON = {"model.num_layers": 20, "model.hidden_size": 2048, "model.num_attention_heads": 16,
              "model.num_query_groups": 4, "model.ffn_hidden_size": 5632, "model.seq_length": 2048,
              "data.corpus": "stdlib", "data.vocab_size": 32000,
              "train.global_batch_size": 8, "train.micro_batch_size": 2, "optimizer.lr": 3e-4,
              "optimizer.min_lr": 3e-5, "schedule.warmup_iters": 2}
GPU_MOE = {"moe.num_experts": 6, "moe.router_topk": 2, "moe.expert_ffn_hidden_size": 2816,
           "moe.first_dense_layers": 1}
DRY_COMMON = {"model.num_layers": 2, "model.hidden_size": 64, "model.num_attention_heads": 4,
              "model.num_query_groups": 2, "model.ffn_hidden_size": 128, "model.seq_length": 64,
              "data.vocab_size": 2048, "train.global_batch_size": 4, "train.micro_batch_size": 2,
              "schedule.warmup_iters": 1}
DRY_MOE = {"moe.num_experts": 4, "moe.router_topk": 2, "moe.expert_ffn_hidden_size": 64,
           "moe.first_dense_layers": 1}
ALWAYS = {"model.dtype": "bf16", "train.eval_interval": 0, "checkpoint.save_interval": 0,
          "checkpoint.save_on_exit": False, "checkpoint.resume": "none", "log.tensorboard": False,
          "log.interval": 1}
ITERATION = re.compile(r"iteration\s+(\d+)/\s*\d+\s+\|.*?\| loss ([0-9.naif]+) \|.*?\| tokens/s ([0-9,]+) \| "
                       r"ms/iter ([0-9.]+)")
RL_PAIRINGS = "0,4,2"  # bf16/bf16, FP8/FP8 current, FP8/FP8 delayed with shared scales
DATASHEET_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "B200": 2250.0}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu_check_out")))
    p.add_argument("--cpu-dry-run", action="store_true", help="every section on CPU with tiny sizes")
    p.add_argument("--budget-s", type=float, default=None, help="deadline for all sections (GPU 420, dry 800)")
    p.add_argument("--steps", type=int, default=None, help="pretraining steps per run (GPU 14, dry 4)")
    p.add_argument("--warmup", type=int, default=None, help="steps left out of the timing (GPU 4, dry 1)")
    p.add_argument("--recipes", default="delayed,current", help="FP8 recipes (backend torch) for the dense model")
    p.add_argument("--gemm-n", type=int, default=None, help="GEMM size (GPU 8192, dry 256)")
    p.add_argument("--rl-prompts", type=int, default=None, help="rollout prompts (GPU 16, dry 2)")
    p.add_argument("--skip", default="", help="comma-separated sections to skip (tests, moe, rl, fp8)")
    args = p.parse_args(argv)
    dry = args.cpu_dry_run
    for name, gpu, cpu in (("budget_s", 420.0, 800.0), ("steps", 14, 4), ("warmup", 4, 1),
                           ("gemm_n", 8192, 256), ("rl_prompts", 16, 2)):
        if getattr(args, name) is None:
            setattr(args, name, cpu if dry else gpu)
    if args.warmup >= args.steps:
        p.error(f"--warmup ({args.warmup}) must be below --steps ({args.steps})")
    return args


class Deadline:
    """The time left for the sections; a section gets at most what is left."""

    def __init__(self, budget_s: float):
        self.end = time.monotonic() + budget_s

    def left(self) -> float:
        return self.end - time.monotonic()


# ------------------------------------------------------------------ environment and GEMM rates


def megatron_core_version() -> Optional[str]:
    try:
        from megatron.core import package_info
    except Exception as error:  # not installed (the device before the wheels), or broken
        return f"not importable ({type(error).__name__}: {error})"
    return package_info.__version__


def cpu_compat_check() -> dict:
    """The compat layer must patch nothing on CUDA and be active on a CPU-only host."""
    import torch

    from megatron_ernie.runtime import cpu_compat

    before = torch.cuda.current_device
    applied = cpu_compat.apply()
    cuda = torch.cuda.is_available()
    untouched = torch.cuda.current_device is before
    ok = (not applied and untouched) if cuda else applied
    return {"cpu_compat_applied": applied, "torch_cuda_untouched": untouched, "cpu_compat_ok": ok}


def environment() -> dict:
    import torch

    from megatron_ernie.precision.gemm import scaled_mm_unavailable_reason

    cuda = torch.cuda.is_available()
    env = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
           "device": torch.cuda.get_device_name(0) if cuda else "cpu",
           "capability": ".".join(map(str, torch.cuda.get_device_capability(0))) if cuda else None,
           "megatron_core": megatron_core_version()}
    env.update(cpu_compat_check())
    env["fp8_torch_backend"] = scaled_mm_unavailable_reason() or "ok"
    return env


def _time_op(fn, reps: int, sync) -> float:
    """Seconds per call after two warm-ups."""
    for _ in range(2):
        fn()
    sync()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    sync()
    return (time.perf_counter() - start) / reps


def gemm_rates(n: int) -> dict:
    """TFLOP/s of an n^3 bf16 matmul and of the same FP8 GEMM (E4M3, fp32 out) through torch._scaled_mm."""
    import torch

    from megatron_ernie.precision.gemm import scaled_mm_fp32

    device = "cuda" if torch.cuda.is_available() else "cpu"
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    reps = 10 if device == "cuda" else 2
    flops = 2.0 * n ** 3
    result = {"n": n, "bf16_tflops": flops / _time_op(lambda: a @ b, reps, sync) / 1e12}
    a8, b8 = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn)
    one = torch.ones((), device=device)
    result["fp8_tflops"] = flops / _time_op(lambda: scaled_mm_fp32(a8, b8, one, one), reps, sync) / 1e12
    name = torch.cuda.get_device_name(0) if device == "cuda" else ""
    result["datasheet_bf16_tflops"] = next((v for k, v in DATASHEET_BF16_TFLOPS.items() if k in name), None)
    return result


# ------------------------------------------------------------------ model FLOPs


def model_counts(s: dict) -> dict:
    """Matmul weights per token (active) and in total, and training FLOPs per token."""
    h, layers, seq = s["model.hidden_size"], s["model.num_layers"], s["model.seq_length"]
    heads, groups = s["model.num_attention_heads"], s["model.num_query_groups"]
    kv = 2 * groups * (h // heads)
    attention = h * (h + kv) + h * h
    dense_ffn = 3 * h * s["model.ffn_hidden_size"]  # SwiGLU: fc1 is two projections
    experts = s.get("moe.num_experts", 0)
    moe_layers = layers - s.get("moe.first_dense_layers", 0) if experts else 0
    expert = 3 * h * s.get("moe.expert_ffn_hidden_size", 0)
    head = h * s["data.vocab_size"]
    active = layers * attention + (layers - moe_layers) * dense_ffn + moe_layers * (
        s.get("moe.router_topk", 0) * expert + h * experts) + head
    total = active + moe_layers * (experts - s.get("moe.router_topk", 0)) * expert + head  # + embedding
    flops = 6 * active + 6 * 2 * seq * h * layers
    return {"active_matmul_params": active, "total_params": total, "train_flops_per_token": flops}


# ------------------------------------------------------------------ ernie pretrain


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    return repr(value)


def overrides_for(sizes: dict, steps: int, run_dir: Path, fp8_recipe: Optional[str]) -> list:
    values = {**ALWAYS, **sizes, "train.iters": steps, "run.dir": str(run_dir)}
    if fp8_recipe:
        values.update({"fp8.recipe": fp8_recipe, "fp8.backend": "torch"})
    args = []
    for key, value in values.items():
        args += ["--set", f"{key}={_toml_value(value)}"]
    return args


def parse_iterations(stdout: str) -> list:
    """(iteration, loss, tokens/s, ms/iter) of every iteration line."""
    return [(int(i), float(loss), float(tps.replace(",", "")), float(ms))
            for i, loss, tps, ms in ITERATION.findall(stdout)]


def pretrain(name: str, sizes: dict, args, run_root: Path, log, deadline: Deadline,
             fp8_recipe: Optional[str] = None) -> dict:
    """One `ernie pretrain` as a world of one (no torchrun, no port); timings skip `warmup` steps."""
    cmd = [sys.executable, "-m", "megatron_ernie.cli", "pretrain",
           *overrides_for(sizes, args.steps, run_root / name, fp8_recipe)]
    proc = run_logged(name, cmd, log, deadline, env={"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"})
    rows = parse_iterations(proc["stdout"])
    result = {"status": proc["status"], "seconds": proc["seconds"], "losses": [r[1] for r in rows]}
    if proc["status"] != "ok" or len(rows) != args.steps:
        result["status"] = proc["status"] if proc["status"] != "ok" else f"{len(rows)} of {args.steps} steps"
        result["error"] = proc["tail"]
        return result
    timed = rows[args.warmup:]
    result["ms_per_iter"] = statistics.median(r[3] for r in timed)
    result["tokens_per_s"] = statistics.median(r[2] for r in timed)
    result["final_loss"] = rows[-1][1]
    return result


def run_logged(name: str, cmd: list, log, deadline: Deadline, cap_s: Optional[float] = None,
               env: Optional[dict] = None) -> dict:
    """Run a subprocess within the deadline; its output's tail goes to the log."""
    timeout = max(deadline.left(), 1.0) if cap_s is None else max(min(cap_s, deadline.left()), 1.0)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "PYTHONUNBUFFERED": "1", **(env or {})}
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        status, stdout, stderr = ("ok" if proc.returncode == 0 else f"exit {proc.returncode}",
                                  proc.stdout, proc.stderr)
    except subprocess.TimeoutExpired as error:
        status = f"timeout after {timeout:.0f} s"
        stdout, stderr = _text(error.stdout), _text(error.stderr)
    seconds = time.perf_counter() - start
    tail = (stdout[-3000:] + "\n" + stderr[-3000:]).strip()
    log.write(f"\n===== {name}: {status} in {seconds:.1f} s\n$ {' '.join(map(str, cmd))}\n{tail}\n")
    log.flush()
    return {"status": status, "seconds": seconds, "stdout": stdout, "tail": tail[-1500:]}


def _text(value) -> str:
    if value is None:
        return ""
    return value.decode(errors="replace") if isinstance(value, bytes) else value


def add_mfu(result: dict, counts: dict, gemm: dict) -> None:
    """MFU against the measured bf16 GEMM rate (and the data sheet's peak where known)."""
    if "tokens_per_s" not in result:
        return
    achieved = result["tokens_per_s"] * counts["train_flops_per_token"] / 1e12
    result["model_tflops"] = achieved
    if gemm.get("bf16_tflops"):
        result["mfu_vs_measured_gemm"] = achieved / gemm["bf16_tflops"]
    if gemm.get("datasheet_bf16_tflops"):
        result["mfu_vs_datasheet"] = achieved / gemm["datasheet_bf16_tflops"]


def fp8_versus_bf16(bf16: dict, fp8: dict) -> dict:
    """Step-time ratio (FP8 / bf16; below 1 is a speed-up) and the loss gap after the same steps."""
    if "ms_per_iter" not in bf16 or "ms_per_iter" not in fp8:
        return {"status": "missing run"}
    gaps = [abs(a - b) / abs(b) for a, b in zip(fp8["losses"], bf16["losses"])]
    return {"step_time_ratio": fp8["ms_per_iter"] / bf16["ms_per_iter"],
            "speedup": bf16["ms_per_iter"] / fp8["ms_per_iter"],
            "final_loss_gap": fp8["final_loss"] - bf16["final_loss"],
            "max_rel_loss_gap": max(gaps)}


# ------------------------------------------------------------------ sections


def section_tests(args, log, deadline) -> dict:
    """The GPU-marked tests of the torch FP8 backend (cuBLAS FP8 GEMMs vs the emulation)."""
    if args.cpu_dry_run:
        return {"status": "skipped: no GPU in a dry run"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
           "tests/test_fp8_torch.py"]
    proc = run_logged("gpu tests", cmd, log, deadline, cap_s=90)
    summary = re.findall(r"(\d+) (passed|failed|skipped|error)", proc["stdout"])
    return {"status": proc["status"], **{kind: int(n) for n, kind in summary}, "tail": proc["tail"][-800:]}


def section_rl(args, log, deadline) -> dict:
    out = Path("/tmp") / f"gpu_check_rl_{os.getpid()}.json"
    cmd = [sys.executable, "benchmarks/fp8_rollout_kl.py", "--prompts", str(args.rl_prompts),
           "--pairings", RL_PAIRINGS, "--json", str(out), "--set", "fp8.backend=\"torch\""]
    if args.cpu_dry_run:
        cmd += ["--max-new-tokens", "3"]
    proc = run_logged("rl rollout K3", cmd, log, deadline, cap_s=None if args.cpu_dry_run else 150)
    if proc["status"] != "ok" or not out.exists():
        return {"status": proc["status"], "error": proc["tail"]}
    rows = json.loads(out.read_text())["rows"]
    out.unlink()
    keep = ("pairing", "k3_replay", "k3_compare", "route_mismatch", "max_abs_dlogp_replay",
            "max_abs_dlogp_compare", "tokens", "generate_s")
    return {"status": "ok", "rows": [{k: r.get(k) for k in keep} for r in rows]}


def run_sections(args, log, save) -> dict:
    """Every section in order; `save(report)` after each, so a run cut short still leaves a report."""
    deadline = Deadline(args.budget_s)
    report = {"mode": "cpu-dry-run" if args.cpu_dry_run else "gpu", "sections": {},
              "pretrain": {"runs": {}, "fp8_vs_bf16": {}}, "rl": {"status": "not run"}}
    skip = set(filter(None, args.skip.split(",")))
    report["environment"] = guarded(report, "environment", environment)
    report["gemm"] = guarded(report, "gemm", lambda: gemm_rates(args.gemm_n))
    save(report)
    report["gpu_tests"] = {"status": "skipped"} if "tests" in skip else guarded(
        report, "gpu_tests", lambda: section_tests(args, log, deadline))
    pretrain_runs(args, log, deadline, report, skip, save)
    report["rl"] = {"status": "skipped"} if "rl" in skip else guarded(
        report, "rl", lambda: section_rl(args, log, deadline))
    return report


def pretrain_runs(args, log, deadline, report, skip, save) -> None:
    """The dense bf16 baseline, the FP8 recipes and the MoE, into report["pretrain"]."""
    common, moe = (DRY_COMMON, DRY_MOE) if args.cpu_dry_run else (GPU_COMMON, GPU_MOE)
    dense_sizes, moe_sizes = {**common, "moe.num_experts": 0}, {**common, **moe}
    run_root = Path("/tmp") / f"gpu_check_runs_{os.getpid()}"
    gemm = report.get("gemm") or {}
    runs, fp8 = report["pretrain"]["runs"], report["pretrain"]["fp8_vs_bf16"]
    plan = [("dense_bf16", dense_sizes, None)]
    if "fp8" not in skip:
        plan += [(f"dense_fp8_{r}", dense_sizes, r) for r in filter(None, args.recipes.split(","))]
    if "moe" not in skip:
        plan.append(("moe_bf16", moe_sizes, None))
    for name, sizes, recipe in plan:
        if deadline.left() < 10:
            runs[name] = {"status": "skipped: out of time"}
            continue
        result = guarded(report, name, lambda: pretrain(name, sizes, args, run_root, log, deadline, recipe))
        result.update(model_counts(sizes))
        add_mfu(result, result, gemm)
        runs[name] = result
        if recipe:
            fp8[recipe] = fp8_versus_bf16(runs["dense_bf16"], result)
        save(report)
    shutil.rmtree(run_root, ignore_errors=True)  # run dirs hold only the tokenizer and logs


def guarded(report: dict, name: str, fn) -> dict:
    """Run a section; an exception becomes its status, and the check goes on."""
    start = time.perf_counter()
    try:
        result = fn()
    except Exception as error:  # one broken section must not cost the others their device minutes
        result = {"status": f"error: {type(error).__name__}: {error}"}
    report["sections"][name] = round(time.perf_counter() - start, 1)
    return result


# ------------------------------------------------------------------ report


def checks(report: dict) -> dict:
    """The pass/fail lines of the report."""
    env, runs = report.get("environment", {}), report["pretrain"]["runs"]
    return {"megatron_core_version": env.get("megatron_core"),
            "cpu_compat_ok": env.get("cpu_compat_ok"),
            "fp8_torch_backend_runs": env.get("fp8_torch_backend") == "ok",
            "pretrain_runs_ok": sorted(k for k, v in runs.items() if v.get("status") == "ok"),
            "pretrain_runs_failed": sorted(k for k, v in runs.items() if v.get("status") != "ok"),
            "rl_ok": report.get("rl", {}).get("status") == "ok"}


def _f(value, spec: str = ".3g") -> str:
    """A number in the table; None as a dash, anything else (e.g. "nan" from JSON) as it is."""
    if value is None:
        return "—"
    return format(value, spec) if isinstance(value, (int, float)) else str(value)


def markdown(report: dict) -> str:
    env, gemm = report.get("environment", {}), report.get("gemm", {})
    lines = [f"# GPU check ({report['mode']})", "",
             f"device {env.get('device')} (sm {env.get('capability')}), torch {env.get('torch')}, "
             f"CUDA {env.get('cuda')}, megatron-core {env.get('megatron_core')}, Python {env.get('python')}",
             f"CPU compat layer ok: {env.get('cpu_compat_ok')} (applied: {env.get('cpu_compat_applied')}); "
             f"FP8 torch backend: {env.get('fp8_torch_backend')}",
             f"GEMM {gemm.get('n')}^3: bf16 {_f(gemm.get('bf16_tflops'))} TFLOP/s, "
             f"FP8 (torch._scaled_mm) {_f(gemm.get('fp8_tflops'))} TFLOP/s", "",
             "| run | status | params (active/total) | tokens/s | ms/iter | MFU (measured GEMM) | final loss |",
             "|---|---|---|---|---|---|---|"]
    for name, r in report["pretrain"]["runs"].items():
        lines.append(f"| {name} | {r.get('status')} | {_f(r.get('active_matmul_params'))}/"
                     f"{_f(r.get('total_params'))} | {_f(r.get('tokens_per_s'), ',.0f')} | "
                     f"{_f(r.get('ms_per_iter'), '.1f')} | {_f(r.get('mfu_vs_measured_gemm'), '.1%')} | "
                     f"{_f(r.get('final_loss'), '.4f')} |")
    lines += ["", "| FP8 recipe (backend torch) | step time FP8/bf16 | speed-up | final loss gap | max rel. gap |",
              "|---|---|---|---|---|"]
    for recipe, r in report["pretrain"]["fp8_vs_bf16"].items():
        lines.append(f"| {recipe} | {_f(r.get('step_time_ratio'))} | {_f(r.get('speedup'))} | "
                     f"{_f(r.get('final_loss_gap'), '.2e')} | {_f(r.get('max_rel_loss_gap'), '.2e')} |")
    lines += markdown_rl(report.get("rl", {}))
    lines += ["", f"GPU tests: {report.get('gpu_tests')}", f"checks: {json.dumps(report['checks'])}",
              f"section seconds: {json.dumps(report['sections'])}"]
    return "\n".join(lines) + "\n"


def markdown_rl(rl: dict) -> list:
    lines = ["", f"RL rollout vs trainer ({rl.get('status')}):", "",
             "| pairing | K3 replay | K3 no replay | route mismatch | tokens |", "|---|---|---|---|---|"]
    for r in rl.get("rows", []):
        lines.append(f"| {r['pairing']} | {_f(r['k3_replay'], '.2e')} | {_f(r['k3_compare'], '.2e')} | "
                     f"{_f(r['route_mismatch'], '.4f')} | {r['tokens']} |")
    return lines


def _finite_or_none(value):
    """JSON has no inf/NaN: write them as strings so a reader sees them, never as invalid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite_or_none(v) for v in value]
    return value


def write_report(report: dict, out: Path, start: float) -> str:
    """gpu_check.json and gpu_check.md from the report as it stands; returns the markdown."""
    final = _finite_or_none({**report, "checks": checks(report), "elapsed_s": time.perf_counter() - start})
    (out / "gpu_check.json").write_text(json.dumps(final, indent=1))
    text = markdown(final)
    (out / "gpu_check.md").write_text(text)
    return text


def main(argv=None) -> dict:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(args.out / "gpu_check.log", "w") as log:
        report = run_sections(args, log, lambda partial: write_report(partial, args.out, start))
    print(write_report(report, args.out, start))
    return report


if __name__ == "__main__":
    main()
