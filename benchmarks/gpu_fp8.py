"""FP8 vs bf16 on one GPU: a small MoE-like stack trained for a fixed number of steps.

    python benchmarks/gpu_fp8.py [--steps 30] [--json out.json] [--recipes delayed,current,...]

Model (Transformer Engine layers directly, no megatron-core): token embedding ->
`layers` x [LayerNorm -> expert-choice MoE (router in fp32 torch, experts as
te.GroupedLinear or te.Linear pairs, GELU) + residual] -> LayerNorm -> output
projection (bf16 torch, as megatron-core keeps it) -> cross-entropy against
fixed random targets. Expert-choice routing gives every expert exactly
`capacity` tokens, a multiple of 16 as FP8 GEMMs require.

Every run starts from the same seed, weights and data; the bf16 run is the
baseline. Per recipe we print step time, tokens/s, MFU (model GEMM FLOPs per
second / the GPU's dense bf16 peak, so FP8 MFU above bf16 MFU means FP8 speed-up)
and the final loss and its difference from bf16. "emu vs TE" is the largest
relative difference (y, dx, dW) between te.Linear and our CPU emulation of the
same recipe on the same data (see emulation_vs_te). A recipe that this TE or GPU
cannot run is reported as skipped with the reason; an error in one recipe does
not stop the others. Results also go to a JSON file.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import List, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # megatron_ernie from this checkout

RECIPES = ("delayed", "current", "blockwise", "mxfp8")
# Dense bf16 tensor-core peaks (TFLOP/s) of SXM parts, from NVIDIA's data sheets.
BF16_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "H800": 989.0, "B200": 2250.0,
                    "GB200": 2500.0, "L40S": 362.0, "A100": 312.0}


@dataclass
class RunResult:
    """One row of the table: a recipe's timing and loss, or why it did not run."""

    recipe: str
    status: str = "ok"
    step_ms: Optional[float] = None
    tokens_per_s: Optional[float] = None
    mfu: Optional[float] = None
    final_loss: Optional[float] = None
    loss_diff_vs_bf16: Optional[float] = None
    emulation_vs_te: Optional[float] = None
    losses: List[float] = field(default_factory=list)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="timed steps per recipe")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps before timing")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--expert-ffn", type=int, default=1024)
    parser.add_argument("--topk", type=int, default=2, help="average experts per token")
    parser.add_argument("--tokens", type=int, default=8192, help="tokens per step (batch x seq)")
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--format", default="hybrid", choices=("hybrid", "e4m3"))
    parser.add_argument("--recipes", default=",".join(RECIPES),
                        help=f"comma-separated subset of {','.join(RECIPES)}")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="dense bf16 peak for MFU; default: looked up from the GPU name")
    parser.add_argument("--json", default=None, help="output path; default $OUT/gpu_fp8.json")
    args = parser.parse_args(argv)
    _check_args(parser, args)
    return args


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    unknown = [r for r in args.recipes.split(",") if r and r not in RECIPES]
    if unknown:
        parser.error(f"--recipes: unknown {unknown}; choose from {list(RECIPES)}")
    if args.tokens * args.topk % (args.experts * 16):
        parser.error("--tokens x --topk must be a multiple of 16 x --experts "
                     "(every expert gets an FP8-aligned capacity)")
    for name in ("steps", "layers", "hidden", "experts", "expert_ffn", "topk", "tokens", "vocab"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be > 0")


def capacity(args) -> int:
    return args.tokens * args.topk // args.experts


def train_flops_per_step(args) -> float:
    """GEMM FLOPs of one forward + backward (3x forward) of the model."""
    experts = 2 * 2 * args.experts * capacity(args) * args.hidden * args.expert_ffn
    router = 2 * args.tokens * args.hidden * args.experts
    output = 2 * args.tokens * args.hidden * args.vocab
    return 3.0 * (args.layers * (experts + router) + output)


def peak_tflops_for(device_name: str) -> Optional[float]:
    """bf16 dense peak of a known GPU by name, None if unknown."""
    for key in sorted(BF16_PEAK_TFLOPS, key=len, reverse=True):
        if key in device_name.upper():
            return BF16_PEAK_TFLOPS[key]
    return None


def default_json_path(explicit: Optional[str]) -> Path:
    if explicit:
        return Path(explicit)
    return Path(os.environ.get("OUT", ".")) / "gpu_fp8.json"


def _fmt(value: Optional[float], spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_table(results: List[RunResult]) -> str:
    """Fixed-width table of the results, one line per recipe."""
    header = (f"{'recipe':<10} {'step ms':>9} {'tokens/s':>11} {'MFU %':>7} "
              f"{'loss':>9} {'dloss vs bf16':>14} {'emu vs TE':>10}  status")
    lines = [header, "-" * len(header)]
    for r in results:
        mfu = None if r.mfu is None else 100.0 * r.mfu
        lines.append(
            f"{r.recipe:<10} {_fmt(r.step_ms, '9.2f')} {_fmt(r.tokens_per_s, '11.0f')} "
            f"{_fmt(mfu, '7.1f')} {_fmt(r.final_loss, '9.4f')} "
            f"{_fmt(r.loss_diff_vs_bf16, '+14.2e')} {_fmt(r.emulation_vs_te, '10.1e')}  {r.status}"
        )
    return "\n".join(lines)


def fill_derived(results: List[RunResult], args, peak_tflops: Optional[float]) -> None:
    """tokens/s, MFU and the loss difference from the bf16 row."""
    baseline = next((r for r in results if r.recipe == "bf16" and r.status == "ok"), None)
    for r in results:
        if r.status != "ok" or not r.step_ms:
            continue
        seconds = r.step_ms / 1e3
        r.tokens_per_s = args.tokens / seconds
        if peak_tflops:
            r.mfu = train_flops_per_step(args) / seconds / (peak_tflops * 1e12)
        if baseline is not None and baseline.final_loss is not None:
            r.loss_diff_vs_bf16 = r.final_loss - baseline.final_loss


# ----------------------------------------------------------------- GPU part


def _te_autocast(te, recipe):
    """te.autocast (TE >= 2.8) or te.fp8_autocast, with the recipe keyword each takes."""
    import contextlib
    import inspect

    if recipe is None:
        return contextlib.nullcontext()
    fn = getattr(te, "autocast", None) or te.fp8_autocast
    params = inspect.signature(fn).parameters
    key = "recipe" if "recipe" in params else "fp8_recipe"
    return fn(enabled=True, **{key: recipe})


class Experts(torch.nn.Module):
    """`experts` FFNs of TE layers, as one grouped GEMM (te.GroupedLinear) when TE has it."""

    def __init__(self, args, te):
        super().__init__()
        self.splits = [capacity(args)] * args.experts
        self.fc1, self.fc2 = (self._linears(args, te, *dims) for dims in
                              ((args.hidden, args.expert_ffn), (args.expert_ffn, args.hidden)))

    @staticmethod
    def _linears(args, te, d_in, d_out):
        if hasattr(te, "GroupedLinear"):
            return te.GroupedLinear(args.experts, d_in, d_out, bias=False, params_dtype=torch.bfloat16)
        return torch.nn.ModuleList(te.Linear(d_in, d_out, bias=False, params_dtype=torch.bfloat16)
                                   for _ in range(args.experts))

    def _run(self, layer, x):
        if isinstance(layer, torch.nn.ModuleList):
            return torch.cat([f(part) for f, part in zip(layer, x.split(self.splits))])
        return layer(x, self.splits)

    def forward(self, x):  # x: [experts * capacity, hidden], grouped by expert
        return self._run(self.fc2, torch.nn.functional.gelu(self._run(self.fc1, x)))


class MoEBlock(torch.nn.Module):
    """Pre-norm expert-choice MoE with a residual; the router stays fp32 torch."""

    def __init__(self, args, te):
        super().__init__()
        self.capacity = capacity(args)
        self.norm = torch.nn.LayerNorm(args.hidden, dtype=torch.bfloat16)
        self.router = torch.nn.Linear(args.hidden, args.experts, bias=False, dtype=torch.float32)
        self.experts = Experts(args, te)

    def forward(self, x):
        h = self.norm(x)
        scores = torch.softmax(self.router(h.float()), dim=-1)        # [tokens, experts]
        weight, index = scores.t().topk(self.capacity, dim=-1)        # [experts, capacity]
        routed = self.experts(h[index.reshape(-1)]) * weight.reshape(-1, 1).to(h.dtype)
        return x + torch.zeros_like(x).index_add(0, index.reshape(-1), routed)


class Model(torch.nn.Module):
    """Embedding -> MoE blocks under the FP8 autocast -> norm -> bf16 output head."""

    def __init__(self, args, te):
        super().__init__()
        self.te = te
        self.embed = torch.nn.Embedding(args.vocab, args.hidden, dtype=torch.bfloat16)
        self.blocks = torch.nn.ModuleList(MoEBlock(args, te) for _ in range(args.layers))
        self.norm = torch.nn.LayerNorm(args.hidden, dtype=torch.bfloat16)
        self.head = torch.nn.Linear(args.hidden, args.vocab, bias=False, dtype=torch.bfloat16)

    def forward(self, tokens, recipe):
        x = self.embed(tokens)
        with _te_autocast(self.te, recipe):
            for block in self.blocks:
                x = block(x)
        return self.head(self.norm(x)).float()


def build_model(args, te) -> Model:
    """The same weights for every run: the seed is reset before building."""
    torch.manual_seed(args.seed)
    return Model(args, te).cuda()


def run_one(name: str, recipe, args, te) -> RunResult:
    """Train `steps + warmup` steps under one recipe (None = bf16) and time the last `steps`."""
    model = build_model(args, te)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    gen = torch.Generator(device="cuda").manual_seed(args.seed)
    tokens = torch.randint(0, args.vocab, (args.tokens,), device="cuda", generator=gen)
    targets = torch.randint(0, args.vocab, (args.tokens,), device="cuda", generator=gen)
    result, start = RunResult(recipe=name), None
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            torch.cuda.synchronize()
            start = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(model(tokens, recipe), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        result.losses.append(loss.detach())
    torch.cuda.synchronize()
    result.step_ms = (time.perf_counter() - start) * 1e3 / args.steps
    result.losses = [float(v) for v in result.losses]
    result.final_loss = sum(result.losses[-5:]) / len(result.losses[-5:])
    return result


def emulation_vs_te(name: str, recipe, args, te) -> dict:
    """Relative difference of our emulation from te.Linear on the same bf16 data.

    One step from fresh state (delayed scaling then runs with scale 1 on both
    sides). A faithful emulation differs only by fp32 summation order and bf16
    output rounding (~1e-3); a wrong scale or layout shows up as ~3e-2.
    """
    from megatron_ernie.config.fp8 import FP8Config
    from megatron_ernie.precision.linear import emulated_fp8_linear
    from megatron_ernie.precision.recipes import build_emulated_recipe

    torch.manual_seed(args.seed)
    x = torch.randn(256, 512, device="cuda", dtype=torch.bfloat16)
    dy = torch.randn(256, 256, device="cuda", dtype=torch.bfloat16)
    layer = te.Linear(512, 256, bias=False, params_dtype=torch.bfloat16)
    x_te = x.clone().requires_grad_()
    with _te_autocast(te, recipe):
        y_te = layer(x_te)
    y_te.backward(dy)
    emulated = build_emulated_recipe(FP8Config(recipe=name, format=args.format, backend="emulate"))
    x_em, w_em = x.clone().requires_grad_(), layer.weight.detach().clone().requires_grad_()
    y_em = emulated_fp8_linear(x_em, w_em, None, emulated, emulated.new_state())
    y_em.backward(dy)
    rel = lambda a, b: ((a.float() - b.float()).norm() / b.float().norm()).item()  # noqa: E731
    return {"y": rel(y_em, y_te), "dx": rel(x_em.grad, x_te.grad), "dw": rel(w_em.grad, layer.weight.grad)}


def _recipe_or_reason(name: str, args):
    """(TE recipe object, None) or (None, why it cannot run here)."""
    from megatron_ernie.config.errors import ConfigError
    from megatron_ernie.config.fp8 import FP8Config
    from megatron_ernie.precision.te import te_recipe

    try:
        return te_recipe(FP8Config(recipe=name, format=args.format, backend="te")), None
    except ConfigError as error:
        return None, f"skipped: {error.fix}"
    except Exception as error:  # a TE that rejects its own recipe arguments
        return None, f"skipped: {type(error).__name__}: {error}"


def _environment() -> dict:
    env = {"torch": torch.__version__, "cuda": torch.version.cuda,
           "device": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    try:
        import transformer_engine

        env["transformer_engine"] = str(transformer_engine.__version__)
    except Exception as error:
        env["transformer_engine"] = f"not importable: {type(error).__name__}: {error}"
    return env


def run_all(args) -> dict:
    env = _environment()
    print(json.dumps(env))
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU visible: this benchmark only runs on a GPU")
    import transformer_engine.pytorch as te

    results = [_guarded("bf16", None, args, te)]
    for name in [r for r in args.recipes.split(",") if r]:
        recipe, reason = _recipe_or_reason(name, args)
        results.append(RunResult(name, status=reason) if reason else
                       _guarded(name, recipe, args, te))
        if not reason:
            _attach_emulation_check(results[-1], name, recipe, args, te)
    peak = args.peak_tflops or peak_tflops_for(env["device"] or "")
    fill_derived(results, args, peak)
    return {"environment": env, "args": vars(args), "peak_bf16_tflops": peak,
            "flops_per_step": train_flops_per_step(args),
            "results": [asdict(r) for r in results]}


def _attach_emulation_check(result: RunResult, name, recipe, args, te) -> None:
    try:
        result.emulation_vs_te = max(emulation_vs_te(name, recipe, args, te).values())
    except Exception as error:
        result.status += f"; emulation check failed: {type(error).__name__}: {str(error)[:120]}"


def _guarded(name, recipe, args, te) -> RunResult:
    try:
        return run_one(name, recipe, args, te)
    except Exception as error:
        return RunResult(name, status=f"failed: {type(error).__name__}: {str(error)[:200]}")
    finally:
        torch.cuda.empty_cache()


def main(argv=None) -> None:
    args = parse_args(argv)
    report = run_all(args)
    results = [RunResult(**r) for r in report["results"]]
    print(format_table(results))
    path = default_json_path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
