"""The planner where users decide: `ernie show-config --world-size N` and `ernie submit`.

Both print the predicted peak memory per rank of the configured layout and
refuse (a ConfigError naming ``parallel``, with the fastest layout that fits
as ``--set`` overrides) when it exceeds the device memory, unless ``--force``.
"""

from __future__ import annotations

from megatron_ernie.config.errors import ConfigError
from megatron_ernie.plan.hardware import parse_device
from megatron_ernie.plan.layouts import Options, plan_all, plan_layout

GIB = 2**30
DEFAULT_HEADROOM_GIB = 4.0


def layout_overrides(par) -> str:
    keys = ("tensor", "pipeline", "virtual_pipeline", "expert", "expert_tensor", "sequence_parallel",
            "distributed_optimizer")
    return " ".join(f"--set parallel.{k}={str(getattr(par, k)).lower()}" for k in keys)


def peak_memory_line(cfg, world: int, gpu: str = "h100", force: bool = False,
                     headroom_gib: float = DEFAULT_HEADROOM_GIB) -> str:
    """One line with the configured layout's predicted peak; raises when it does not fit (unless force)."""
    device = parse_device(gpu)
    opts = Options(headroom_gib=headroom_gib)
    plan = plan_layout(cfg, cfg.parallel, world, cfg.data.vocab_size, device, opts)
    line = (f"predicted peak memory per rank: {plan.peak / GIB:.1f} GiB (pipeline rank {plan.pp_rank}) of "
            f"{device.mem_gib:g} GiB per {device.name}, {headroom_gib:g} GiB kept free"
            + ("" if plan.fits else " -- DOES NOT FIT"))
    if plan.fits or force:
        return line
    plans, _ = plan_all(cfg, world, cfg.data.vocab_size, device, opts)
    best = next((p for p in plans if p.fits), None)
    fix = (f"a layout that fits: {layout_overrides(best.parallel)} ({best.peak / GIB:.1f} GiB)"
           if best else "no layout of this model fits these devices; use more or larger devices")
    raise ConfigError("parallel", f"{plan.binding}", f"{fix}; or --force to go ahead (ernie plan shows all layouts)")
