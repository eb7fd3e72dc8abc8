"""The ``[elastic]`` section: which sub-networks the supernet must serve.

Each axis is a set of allowed values; the empty set means "always the full
model" on that axis.  Values name the *kept* size: ``depth`` layers kept,
``ffn`` fraction of every expert's FFN width kept (a prefix of its channels),
``experts`` experts kept (a prefix: the router only sees the first ones) and
``topk`` experts per token.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_ernie.config.errors import require

AXES = ("depth", "ffn", "experts", "topk")


@dataclass(frozen=True)
class ElasticConfig:
    enabled: bool = False
    depth: tuple[int, ...] = ()
    ffn: tuple[float, ...] = ()
    experts: tuple[int, ...] = ()
    topk: tuple[int, ...] = ()
    layer_order: tuple[int, ...] = ()  # most important first; empty = spread evenly (see subnet.py)
    sandwich_random: int = 1  # random sub-networks per step besides the largest and the smallest
    distill_weight: float = 0.5  # in-place distillation: weight of KL(largest || sub) for the others
    progressive: tuple[str, ...] = ()  # open these axes one after another (progressive shrinking)
    progressive_interval: int = 0  # iterations per progressive phase
    eval_subnets: int = 8  # sub-networks evaluated in the family table at the end of a run

    def validate(self, path: str) -> None:
        if not self.enabled:
            return
        require(all(d >= 1 for d in self.depth), f"{path}.depth", self.depth, "every depth must be >= 1")
        require(all(0 < f <= 1 for f in self.ffn), f"{path}.ffn", self.ffn, "fractions must be in (0, 1]")
        require(all(e >= 1 for e in self.experts), f"{path}.experts", self.experts, "keep at least 1 expert")
        require(all(k >= 1 for k in self.topk), f"{path}.topk", self.topk, "top-k must be >= 1")
        require(self.sandwich_random >= 0, f"{path}.sandwich_random", self.sandwich_random, "must be >= 0")
        require(0 <= self.distill_weight <= 1, f"{path}.distill_weight", self.distill_weight, "must be in [0, 1]")
        bad = [a for a in self.progressive if a not in AXES]
        require(not bad, f"{path}.progressive", self.progressive, f"axes are {AXES}")
        require(not self.progressive or self.progressive_interval > 0, f"{path}.progressive_interval",
               self.progressive_interval, "set the iterations per phase when progressive is used")

