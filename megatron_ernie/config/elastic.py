"""The ``[elastic]`` section: which sub-networks the supernet must serve.

Each axis is a set of allowed values; the empty set means "always the full
model" on that axis.  Values name the *kept* size: ``depth`` layers kept,
``ffn`` fraction of every expert's FFN width kept (a prefix of its channels),
``experts`` experts kept (a prefix: the router only sees the first ones) and
``topk`` experts per token.

The recipe knobs (issue 13): ``targets`` are deployment sub-networks trained
every step as themselves; ``distill_ramp_iters`` / ``distill_gate`` schedule
the in-place distillation; ``open_after`` trains only the largest sub-network
first (Once-for-All: train the full network, reorder by importance with
``ernie reorder``, then open the axes).
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
    targets: tuple[str, ...] = ()  # deployment sub-networks ("depth=4,ffn=0.5,experts=2,topk=1") trained every step
    sandwich_smallest: bool = True  # train the smallest sub-network every step (false: largest, targets, random)
    distill_ramp_iters: int = 0  # KL weight rises linearly 0 -> distill_weight over these iterations (0: constant)
    distill_gate: bool = False  # per token: distil only where the largest's CE is lower than the sub-network's
    open_after: int = 0  # before this iteration only the largest is trained (axes closed); phases count from it

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
        require(self.distill_ramp_iters >= 0, f"{path}.distill_ramp_iters", self.distill_ramp_iters,
                "must be >= 0 (0 = the constant distill_weight from the first step)")
        require(self.open_after >= 0, f"{path}.open_after", self.open_after,
                "must be >= 0 (0 = the axes are open from the first step)")
        for entry in self.targets:
            check_target_syntax(entry, f"{path}.targets")
        require(self.sandwich_smallest or self.sandwich_random or self.targets, f"{path}.sandwich_smallest",
                self.sandwich_smallest, "with no smallest, no random members and no targets only the largest "
                "would ever train; keep sandwich_smallest = true, or set sandwich_random >= 1 or targets")


TARGET_EXAMPLE = "depth=4,ffn=0.5,experts=2,topk=1"


def check_target_syntax(entry: str, field: str) -> None:
    """One target: comma-separated axis=number pairs (elastic/subnet.py parse_subnet); the model
    checks (sizes within the supernet) run in config/checks.py, which knows the model."""
    pairs = [p.strip() for p in str(entry).split(",") if p.strip()]
    for pair in pairs:
        key, _, raw = pair.partition("=")
        require(key.strip() in AXES and raw.strip() != "", field, entry,
                f"write each target like \"{TARGET_EXAMPLE}\" (axes {AXES}; missing axes = full size)")
        try:
            float(raw)
        except ValueError:
            require(False, field, entry, f"{key.strip()} needs a number, got {raw.strip()!r}")
    require(bool(pairs), field, entry, f"an empty target is the full model (always trained); write it like "
                                       f"\"{TARGET_EXAMPLE}\" or remove it")

