"""Test-only probes for the planner's checks: what a training step hands to
torch.distributed, and what autograd saves per model-chunk forward.

CommCounter wraps torch.distributed's collectives and point-to-point calls
(module attributes, which megatron-core looks up at call time) and adds each
call's payload to (group, kind): an all-gather's output, a reduce-scatter's
input, an all-reduce's tensor, an all-to-all's input, a send's tensor (receives
are the other side of a send and are not counted).  Groups are named by their
ranks against megatron-core's parallel_state groups.

SavedActivations enters torch.autograd.graph.saved_tensors_hooks around every
forward of a model chunk and records the bytes of the distinct storages saved
for backward that are not parameters (weights saved by GEMMs are not
activations).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps


def _ranks(group) -> tuple:
    return tuple(dist.get_process_group_ranks(group)) if group is not None else tuple(range(dist.get_world_size()))


def group_names() -> dict:
    """{ranks: "name+name..."}: every megatron-core group with those ranks (dp and ep may coincide)."""
    getters = [("tp", ps.get_tensor_model_parallel_group), ("pp", ps.get_pipeline_model_parallel_group),
               ("dp", lambda: ps.get_data_parallel_group()), ("ep", ps.get_expert_model_parallel_group),
               ("etp", ps.get_expert_tensor_parallel_group), ("expert_dp", ps.get_expert_data_parallel_group),
               ("tp_ep", ps.get_expert_tensor_and_model_parallel_group),
               ("mp", ps.get_model_parallel_group), ("embd", ps.get_embedding_group), ("world", lambda: None)]
    names = {}
    for name, get in getters:
        try:
            ranks = _ranks(get())
        except (AssertionError, RuntimeError, AttributeError):
            continue
        names[ranks] = f"{names[ranks]}+{name}" if ranks in names else name
    return names


def _nbytes(t) -> int:
    return t.numel() * t.element_size()


# name: (index of the payload tensor among the positional args, its keyword, kind)
WRAPPED = {
    "all_reduce": (0, "tensor", "all_reduce"),
    "all_gather_into_tensor": (0, "output_tensor", "all_gather"),
    "_all_gather_base": (0, "output_tensor", "all_gather"),
    "reduce_scatter_tensor": (1, "input", "reduce_scatter"),
    "_reduce_scatter_base": (1, "input", "reduce_scatter"),
    "all_to_all_single": (1, "input", "all_to_all"),
    "all_gather": (0, "tensor_list", "all_gather"),
    "reduce_scatter": (1, "input_list", "reduce_scatter"),
    "broadcast": (0, "tensor", "broadcast"),
    "isend": (0, "tensor", "p2p"),
    "send": (0, "tensor", "p2p"),
}


# megatron-core modules that bind all-gather / reduce-scatter to module globals at import
ALIASED = ("megatron.core.tensor_parallel.mappings", "megatron.core.tensor_parallel.layers",
           "megatron.core.distributed.param_and_grad_buffer")
CONTROL_BYTES = 1024  # scalars and routing metadata (losses, token counts, norms): reported, not predicted


class CommCounter:
    """bytes: {group: {kind: payload bytes}} of the tensors above CONTROL_BYTES; control: the rest."""

    def __init__(self):
        self.names = group_names()
        self.bytes: dict = {}
        self.control: dict = {}
        self._saved = {}
        self._aliases = []

    def _add(self, group, kind: str, payload) -> None:
        if isinstance(payload, (list, tuple)):
            n = sum(_nbytes(t) for t in payload)
        else:
            n = _nbytes(payload)
        # training sends only between pipeline neighbours; at PP = 2 megatron-core posts half of them
        # on the world group (p2p_communication._p2p_ops), so they are named by what they are
        name = "pp" if kind == "p2p" else self.names.get(_ranks(group), "other")
        table = self.bytes if n > CONTROL_BYTES else self.control
        g = table.setdefault(name, {})
        g[kind] = g.get(kind, 0) + n

    def _wrap(self, fname: str, index: int, keyword: str, kind: str):
        original = getattr(dist, fname)
        return original, self._wrap_callable(original, index, keyword, kind)

    def _batch(self, original):
        def wrapped(ops):
            for op in ops:
                if op.op in (dist.isend, self._saved.get("isend")):
                    self._add(op.group, "p2p", op.tensor)
            return original(ops)

        return wrapped

    def __enter__(self):
        for fname, (index, keyword, kind) in WRAPPED.items():
            self._saved[fname], wrapped = self._wrap(fname, index, keyword, kind)
            setattr(dist, fname, wrapped)
        self._saved["batch_isend_irecv"] = dist.batch_isend_irecv
        dist.batch_isend_irecv = self._batch(dist.batch_isend_irecv)
        self._wrap_aliases()
        return self

    def _wrap_aliases(self):
        import importlib

        for modname in ALIASED:
            mod = importlib.import_module(modname)
            for attr, (index, keyword, kind) in (("dist_all_gather_func", (0, "output_tensor", "all_gather")),
                                                  ("dist_reduce_scatter_func", (1, "input", "reduce_scatter"))):
                original = getattr(mod, attr)
                wrapped = self._wrap_callable(original, index, keyword, kind)
                self._aliases.append((mod, attr, original))
                setattr(mod, attr, wrapped)

    def _wrap_callable(self, original, index, keyword, kind):
        def wrapped(*args, **kwargs):
            self._add(kwargs.get("group"), kind, kwargs[keyword] if keyword in kwargs else args[index])
            return original(*args, **kwargs)

        return wrapped

    def __exit__(self, *exc):
        for fname, original in self._saved.items():
            setattr(dist, fname, original)
        for mod, attr, original in self._aliases:
            setattr(mod, attr, original)


class SavedActivations:
    """Bytes saved for backward per forward call of each model chunk, in call order."""

    def __init__(self, chunks):
        self.per_forward: list[tuple[int, int]] = []  # (chunk index, bytes)
        self._params = {p.untyped_storage().data_ptr() for c in chunks for p in c.parameters()}
        self._handles = []
        for i, chunk in enumerate(chunks):
            module = chunk.module
            self._handles.append(module.register_forward_pre_hook(self._start(i)))
            self._handles.append(module.register_forward_hook(self._stop))
        self._ctx = None

    def _start(self, index):
        def hook(module, args):
            self._seen, self._index = {}, index
            self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
            self._ctx.__enter__()

        return hook

    def _pack(self, t):
        s = t.untyped_storage()
        if s.data_ptr() not in self._params:
            self._seen[s.data_ptr()] = s.nbytes()
        return t

    def _stop(self, module, args, output):
        self._ctx.__exit__(None, None, None)
        self.per_forward.append((self._index, sum(self._seen.values())))

    def remove(self):
        for h in self._handles:
            h.remove()
