"""Move optimizer state between megatron-core's one-optimizer and two-optimizer forms.

With expert parallelism (EP > 1) megatron-core marks expert weights
``allreduce=False`` and gives them their own optimizer (their data-parallel
group differs), chained after the dense one: ``common.pt`` then holds
``{0: dense, 1: expert}`` hyper-parameters (param groups, step), and older
checkpoints also prefix the tensor keys with ``chained_0.``/``chained_1.``.
At EP = 1 there is one optimizer: one hyper-parameter dict, with the expert
weights in the dense parameter groups.  The *values* (Adam moments, fp32
master weights) are keyed by parameter either way, so changing between EP=1
and EP>1 only needs the group lists rewritten (and old prefixes dropped: the
store now saves and loads optimizer keys without them); loading directly
fails in megatron-core, which cannot regroup.
"""

from __future__ import annotations

import copy
import re

from megatron_ernie.convert.errors import ConvertError

_CHAIN = re.compile(r"^chained_(\d+)\.")
_GROUP_KEY = ("wd_mult", "lr_mult", "is_decoupled_lr")


def chained_for(ep: int, num_experts: int) -> bool:
    """Whether megatron-core builds the two-optimizer form at this layout."""
    return num_experts > 0 and ep > 1


def rename(key: str) -> str:
    """An optimizer key in the layout-independent form the store uses (no chain index)."""
    return _CHAIN.sub("", key)


def _group_id(group: dict) -> tuple:
    return tuple(group.get(k) for k in _GROUP_KEY)


def merge_common(optimizer: dict) -> dict:
    """{0: dense, 1: expert} -> the one-optimizer dict (expert weights join the dense groups)."""
    dense, expert = optimizer[0], optimizer.get(1)
    groups = _groups(dense)
    known = {_group_id(g) for g in groups}
    for g in _groups(expert) if expert else []:
        if _group_id(g) not in known:
            raise ConvertError(f"expert parameter group {dict(zip(_GROUP_KEY, _group_id(g)))} has no dense "
                               f"counterpart; this optimizer state cannot be merged for EP=1")
    return copy.deepcopy(dense)


def split_common(optimizer: dict) -> dict:
    """The one-optimizer dict -> {0: dense, 1: expert}; expert weights use the decayed, unscaled group."""
    dense = copy.deepcopy(optimizer)
    groups = _groups(dense)
    weight = next((g for g in groups if g.get("wd_mult") == 1.0 and g.get("lr_mult") == 1.0), None)
    if weight is None:
        raise ConvertError("no parameter group with wd_mult=1 and lr_mult=1 for the expert weights; "
                           "this optimizer state cannot be split for EP>1")
    expert = copy.deepcopy(optimizer)
    _set_groups(expert, [dict(copy.deepcopy(weight), is_expert_parallel=True)])
    return {0: dense, 1: expert}


def _holder(optimizer: dict) -> dict:
    """Plain optimizers keep param_groups at the top; the distributed one under 'optimizer'."""
    return optimizer["optimizer"] if "param_groups" not in optimizer else optimizer


def _groups(optimizer: dict) -> list:
    return _holder(optimizer)["param_groups"]


def _set_groups(optimizer: dict, groups: list) -> None:
    _holder(optimizer)["param_groups"] = groups


def convert_common(common: dict, to_chained: bool) -> dict:
    """common.pt with its optimizer entry in the target form (unchanged if already in it)."""
    optimizer = common.get("optimizer")
    if optimizer is None:
        return common
    chained = 0 in optimizer
    if chained == to_chained:
        return common
    return {**common, "optimizer": split_common(optimizer) if to_chained else merge_common(optimizer)}
