"""Device presets for the planner: memory, dense peak FLOP/s, link bandwidths.

Numbers are the vendors' datasheet peaks (dense, no sparsity): H100 SXM 80 GB
(989 TFLOP/s bf16, 1979 fp8, NVLink 4 at 450 GB/s per direction), H200 SXM
141 GB (same compute and NVLink), A100 SXM 80 GB (312 TFLOP/s bf16, no fp8,
NVLink 3 at 300 GB/s per direction); inter-node: one 400 Gb/s (50 GB/s)
NDR InfiniBand port per GPU (A100: 200 Gb/s HDR).  ``custom:`` takes
mem_gib,tflops_bf16,tflops_fp8,nvlink_gbps,ib_gbps (GB/s per direction).
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_ernie.config.errors import ConfigError


@dataclass(frozen=True)
class Device:
    name: str
    mem_gib: float
    tflops_bf16: float
    tflops_fp8: float
    nvlink_gbps: float
    ib_gbps: float
    gpus_per_node: int = 8

    @property
    def mem_bytes(self) -> int:
        return int(self.mem_gib * 2**30)


PRESETS = {
    "h100": Device("h100", 80, 989, 1979, 450, 50),
    "h200": Device("h200", 141, 989, 1979, 450, 50),
    "a100": Device("a100", 80, 312, 0, 300, 25),
}


def parse_device(text: str, gpus_per_node: int = 8) -> Device:
    """``h100`` | ``h200`` | ``a100`` | ``custom:mem_gib,tflops_bf16,tflops_fp8,nvlink_gbps,ib_gbps``."""
    if text in PRESETS:
        d = PRESETS[text]
        return Device(d.name, d.mem_gib, d.tflops_bf16, d.tflops_fp8, d.nvlink_gbps, d.ib_gbps, gpus_per_node)
    if text.startswith("custom:"):
        parts = text[len("custom:"):].split(",")
        try:
            values = [float(x) for x in parts]
        except ValueError:
            values = []
        if len(values) == 5 and all(v >= 0 for v in values) and values[0] > 0 and values[1] > 0:
            return Device("custom", *values, gpus_per_node=gpus_per_node)
    raise ConfigError("--gpu", text, "use h100, h200, a100 or custom:mem_gib,tflops_bf16,tflops_fp8,"
                                     "nvlink_gbps,ib_gbps (five non-negative numbers, e.g. custom:80,989,1979,450,50)")
