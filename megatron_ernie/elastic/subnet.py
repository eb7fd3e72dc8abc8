"""Sub-network specifications and how a step samples them.

A ``Subnet`` names the kept size on each elastic axis.  Nesting makes one set
of weights serve all of them (Once-for-All, Cai et al. 2020; MatFormer):

* depth: layers are ranked once (``layer_ranking``) and depth d keeps the d
  best-ranked layers.  The default ranking spreads kept layers evenly over
  the network (0, L-1, then farthest-point order), so pipeline stages keep
  layers and a smaller depth is a subset of a larger one.  The rule is
  a property of the model, not of the parallel layout.
* ffn: expert FFN channels [0, round(f*F)) are kept (a prefix).
* experts: experts [0, E') are kept; the router only scores those.
* topk: each token goes to its k best kept experts.

Each training step uses the sandwich rule (Yu & Huang, "Universally
Slimmable Networks"): the largest and smallest sub-network and n random ones,
plus every declared deployment target (``elastic.targets``), trained as itself
every step as Nemotron Elastic trains its budgets and OFA its few discrete
values, instead of being met by a random draw now and then.  The smallest can
be dropped (``sandwich_smallest = false``).  Before ``open_after`` only the
largest is trained (OFA: train the full network first, reorder by importance,
then open the axes); progressive phases count from ``open_after``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from megatron_ernie.config.elastic import AXES
from megatron_ernie.config.errors import ConfigError


@dataclass(frozen=True)
class Subnet:
    depth: int
    ffn: float
    experts: int
    topk: int

    def __str__(self) -> str:
        return f"depth={self.depth},ffn={self.ffn:g},experts={self.experts},topk={self.topk}"


def full_subnet(model, moe) -> Subnet:
    return Subnet(model.num_layers, 1.0, max(moe.num_experts, 1), max(moe.router_topk, 1))


def choices(elastic, model, moe) -> dict[str, tuple]:
    """The allowed values per axis, the full size always included."""
    full = full_subnet(model, moe)
    out = {}
    for axis in AXES:
        values = set(getattr(elastic, axis)) | {getattr(full, axis)}
        out[axis] = tuple(sorted(values))
    return out


def parse_subnet(text: str, model, moe, field: str = "--subnet") -> Subnet:
    """'depth=3,ffn=0.5,experts=2,topk=1' (missing axes = full size)."""
    values = full_subnet(model, moe).__dict__.copy()
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, _, raw = part.partition("=")
        key, raw = key.strip(), raw.strip()
        if key not in values or not raw:
            raise ConfigError(field, text, "write it like depth=3,ffn=0.5,experts=2,topk=1")
        try:
            values[key] = float(raw) if key == "ffn" else int(raw)
        except ValueError:
            raise ConfigError(field, text, f"{key} needs a number, got {raw!r}") from None
    subnet = Subnet(**values)
    check_subnet(subnet, model, moe)
    return subnet


def target_subnets(elastic, model, moe) -> tuple[Subnet, ...]:
    """The declared deployment targets (``elastic.targets``), each checked to be a sub-network of
    this model; an error names ``elastic.targets``, the entry and the rule it breaks."""
    out = []
    for text in elastic.targets:
        try:
            out.append(parse_subnet(text, model, moe, field="elastic.targets"))
        except ConfigError as err:
            if err.field == "elastic.targets":
                raise
            raise ConfigError("elastic.targets", text, f"{err.field.removeprefix('elastic.')}={err.value}: "
                              f"{err.fix}; every target must be a sub-network of this model") from None
    return tuple(out)


def elastic_axes(elastic, model, moe) -> set[str]:
    """Axes on which some trained sub-network differs from the full model (an axis whose only value is
    the full one, e.g. ``experts = []`` with no target below the full count, is not elastic)."""
    full = full_subnet(model, moe)
    axis_choices = choices(elastic, model, moe)
    targets = target_subnets(elastic, model, moe)
    return {a for a in AXES if len(axis_choices[a]) > 1 or any(getattr(t, a) != getattr(full, a) for t in targets)}


def check_subnet(s: Subnet, model, moe, expert_tensor: int = 1) -> None:
    """Rules every sub-network must satisfy; errors name the axis and the fix."""
    L, E = model.num_layers, max(moe.num_experts, 1)
    if not 1 <= s.depth <= L:
        raise ConfigError("elastic.depth", s.depth, f"keep between 1 and model.num_layers={L} layers")
    if not 0 < s.ffn <= 1:
        raise ConfigError("elastic.ffn", s.ffn, "use a fraction in (0, 1]")
    channels = kept_channels(s.ffn, moe.expert_ffn_hidden_size)
    if channels < 1 or abs(channels - s.ffn * moe.expert_ffn_hidden_size) > 1e-6:
        raise ConfigError("elastic.ffn", s.ffn, f"must keep a whole number of the {moe.expert_ffn_hidden_size} "
                                                f"expert FFN channels")
    if not 1 <= s.experts <= E:
        raise ConfigError("elastic.experts", s.experts, f"keep between 1 and moe.num_experts={E} experts")
    if not 1 <= s.topk <= s.experts:
        raise ConfigError("elastic.topk", s.topk, f"top-k must be between 1 and the experts kept ({s.experts})")


def kept_channels(ffn: float, width: int) -> int:
    return int(round(ffn * width))


def layer_ranking(num_layers: int, order: tuple[int, ...] = ()) -> list[int]:
    """Layers, most important first.

    Default: the first and last layer, then farthest-point order (each next
    layer is the one farthest from all layers already kept; ties go to the
    lower index), so every prefix is spread evenly over the network and over
    pipeline stages.
    """
    if order:
        if sorted(order) != list(range(num_layers)):
            raise ConfigError("elastic.layer_order", order, f"must be a permutation of 0..{num_layers - 1}")
        return list(order)
    ranking = [0, num_layers - 1][:num_layers]
    while len(ranking) < num_layers:
        rest = [i for i in range(num_layers) if i not in ranking]
        ranking.append(max(rest, key=lambda i: (min(abs(i - k) for k in ranking), -i)))
    return ranking


def kept_layers(depth: int, ranking: list[int]) -> frozenset[int]:
    return frozenset(ranking[:depth])


def smallest(axis_choices: dict) -> Subnet:
    return Subnet(*(axis_choices[a][0] for a in ("depth", "ffn", "experts", "topk")))


def largest(axis_choices: dict) -> Subnet:
    return Subnet(*(axis_choices[a][-1] for a in ("depth", "ffn", "experts", "topk")))


def open_axes(elastic, iteration: int) -> set[str]:
    """Axes a step may shrink: none before ``open_after`` (only the largest is trained); then all of
    them, or with ``progressive`` one more per phase, the phases counted from ``open_after``."""
    if iteration < elastic.open_after:
        return set()
    if not elastic.progressive:
        return set(AXES)
    phase = (iteration - elastic.open_after) // elastic.progressive_interval
    return set(elastic.progressive[: phase + 1])


def axes_trained_open(elastic, iterations_done: int) -> set[str]:
    """Axes that were open in at least one of the steps 0 .. iterations_done-1 (a checkpoint at
    iteration N has run those); axes only ever open further, so the last step decides."""
    return open_axes(elastic, iterations_done - 1) if iterations_done > 0 else set()


def restrict(subnet: Subnet, big: Subnet, open_now: set[str]) -> Subnet:
    """``subnet`` with every closed axis at the largest's value; a closed top-k is the largest's,
    capped at the experts kept (as the sandwich's own members are built)."""
    depth, ffn, experts = (getattr(subnet if a in open_now else big, a) for a in ("depth", "ffn", "experts"))
    topk = subnet.topk if "topk" in open_now else min(big.topk, experts)
    return Subnet(depth, ffn, experts, topk)


def sample_step(elastic, axis_choices: dict, iteration: int, seed: int,
                targets: tuple[Subnet, ...] = ()) -> list[tuple[str, Subnet]]:
    """The sandwich for one step, in this order: ('largest', ..), ('smallest', ..) unless
    ``sandwich_smallest`` is off, ('target', ..) per declared target not already a member, and
    ``sandwich_random`` ('random', ..).  Before ``open_after``: the largest alone."""
    big = largest(axis_choices)
    open_now = open_axes(elastic, iteration)
    if not open_now:
        return [("largest", big)]
    rng = random.Random(f"{seed}:{iteration}")

    def pick(axis, chooser):
        values = axis_choices[axis]
        return chooser(values) if axis in open_now else getattr(big, axis)

    def make(chooser) -> Subnet:
        topk_values = axis_choices["topk"]
        s = Subnet(pick("depth", chooser), pick("ffn", chooser), pick("experts", chooser), 0)
        k_allowed = [k for k in topk_values if k <= s.experts] or [min(topk_values)]
        k = chooser(tuple(k_allowed)) if "topk" in open_now else min(big.topk, s.experts)
        return Subnet(s.depth, s.ffn, s.experts, k)

    out = [("largest", big)]
    if elastic.sandwich_smallest:
        out.append(("smallest", make(lambda v: v[0])))
    for target in targets:
        t = restrict(target, big, open_now)
        if all(t != s for _, s in out):  # a target that collapses onto a member is trained once
            out.append(("target", t))
    out += [("random", make(lambda v: rng.choice(v))) for _ in range(elastic.sandwich_random)]
    return out
