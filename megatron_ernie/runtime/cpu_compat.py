"""Run megatron-core on machines without a GPU.

megatron-core assumes CUDA in a handful of places that have nothing to do with
the mathematics: it asks ``torch.cuda`` for the current device to place
buffers, builds CUDA streams and events for overlap, reads and writes the CUDA
RNG state, and checks ``tensor.type() == 'torch.cuda.FloatTensor'``.  On a
CPU-only host every one of those is a device question whose honest answer is
"the CPU", so each patch below maps the CUDA notion onto its CPU equivalent.
None of them changes a computed value: on a CPU all kernels run synchronously
in program order (so streams and events are no-ops), and the CPU default
generator *is* the device generator (so RNG forks swap its state).

Rules for this module (see DESIGN.md):
  * it is the only place that touches megatron-core internals for CPU support;
  * it never edits megatron-core files, only rebinds attributes at run time;
  * ``apply()`` does nothing when CUDA is available;
  * every patch is listed in ``PATCHES`` with the megatron-core behaviour it
    replaces, and ``tests/test_cpu_compat.py`` checks that each one is still
    needed and still works for the pinned version.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import torch
from torch.overrides import TorchFunctionMode

TESTED_MCORE_VERSIONS = ("0.16.1",)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Patch:
    name: str
    assumption: str  # what megatron-core assumes
    stand_in: str  # what we do instead and why it is exact on CPU


PATCHES = (
    Patch("rng_tracker", "RNG forks read/write the CUDA generator state",
          "fork the CPU default generator, which is the device generator on a CPU host"),
    Patch("cuda_device_api", "torch.cuda.current_device()/Stream/Event/synchronize exist",
          "device 0 stands for the CPU; streams/events are no-ops since CPU kernels are synchronous"),
    Patch("device_mode", "tensors are created with device='cuda'/int, moved with .cuda()",
          "a TorchFunctionMode rewrites CUDA device arguments to 'cpu'"),
    Patch("moe_te_gemm_name", "moe_utils.te_general_gemm is defined (it is only bound when TE imports)",
          "bind it to None, the value megatron-core itself uses for 'no TE GEMM', so the router uses torch"),
    Patch("moe_host_splits", "MoE all-to-all split sizes become host numpy arrays only if tensor.is_cuda",
          "treat CPU tensors the same way, so gloo receives host lists exactly as NCCL does on GPU"),
    Patch("backward_in_mode", "(device mode) ops inside autograd backward see the mode",
          "Tensor.backward/autograd.backward run the engine with the mode re-entered"),
    Patch("uneven_all_gather", "all_gather accepts per-rank sizes (NCCL does; gloo refuses)",
          "expert-TP token gathers pad each rank's rows to the largest, gather, then cut the padding off"),
    Patch("torch_adam_state", "the distributed optimizer wraps TE/apex FusedAdam (step in param_groups)",
          "with torch AdamW: create empty Adam state (own step tensor per param) before a load reads "
          "state_dict(), and give every param its own step tensor after a load (megatron-core assigns "
          "one shared tensor, which AdamW then increments once per param per step)"),
    Patch("tensor_type_check", "grads checked with tensor.type() == 'torch.cuda.FloatTensor'",
          "report the CUDA type name for CPU tensors of the same dtype"),
)

_applied = False


def cuda_present() -> bool:
    return torch.cuda.is_available()


# --------------------------------------------------------------------------- rng
def _cpu_get_rng_state(device="cuda", clone=False, graph_safe=False):
    state = torch.get_rng_state()
    return state.clone() if clone else state


def _cpu_set_rng_state(new_state, device=-1, graph_safe=False):
    torch.set_rng_state(new_state)


def _patch_rng_tracker():
    from megatron.core.tensor_parallel import random as mrandom

    class CpuRNGStatesTracker(mrandom.CudaRNGStatesTracker):
        """megatron's tracker with seeding done on the CPU generator."""

        def add(self, name, seed):
            self._is_initialized = True
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            self.seeds_.add(seed)
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            orig = torch.get_rng_state()
            torch.manual_seed(seed)
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(orig)

    mrandom.CudaRNGStatesTracker = CpuRNGStatesTracker
    mrandom._get_cuda_rng_state = _cpu_get_rng_state
    mrandom._set_cuda_rng_state = _cpu_set_rng_state
    # The tracker's fork() compares CPU state before/after and warns; on a CPU
    # host that comparison is always about the same generator, so silence it.
    logging.getLogger(mrandom.__name__).setLevel(logging.ERROR)


# ---------------------------------------------------------------- torch.cuda api
class _NoOpStream:
    """Stands in for torch.cuda.Stream: CPU work is already ordered."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, other):
        pass

    def wait_event(self, event):
        pass

    def synchronize(self):
        pass

    def record_event(self, event=None):
        return event or _NoOpEvent()

    def query(self):
        return True


class _NoOpEvent:
    def __init__(self, *args, **kwargs):
        pass

    def record(self, stream=None):
        pass

    def wait(self, stream=None):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True


@contextlib.contextmanager
def _stream_context(stream=None):
    yield


def _patch_cuda_api():
    cuda = torch.cuda
    cuda.current_device = lambda: 0
    cuda.Stream = _NoOpStream
    cuda.Event = _NoOpEvent
    cuda.current_stream = lambda device=None: _NoOpStream()
    cuda.default_stream = lambda device=None: _NoOpStream()
    cuda.stream = _stream_context
    cuda.synchronize = lambda device=None: None
    cuda.set_device = lambda device: None
    cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    cuda.set_rng_state = lambda state, device="cuda": torch.set_rng_state(state)


def _patch_moe_te_gemm_name():
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def _patch_moe_host_splits():
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    def move_to_host(tensor, as_numpy=False, record_stream=False):
        if torch.is_tensor(tensor) and as_numpy:
            return tensor.numpy()
        return tensor

    moe_utils.maybe_move_tensor_to_cpu = move_to_host
    token_dispatcher.maybe_move_tensor_to_cpu = move_to_host


def _patch_uneven_all_gather():
    import torch.distributed as dist
    from megatron.core.tensor_parallel import mappings

    original = mappings._gather_along_first_dim

    def gather_along_first_dim(input_, group, output_split_sizes=None, use_global_buffer=False):
        if output_split_sizes is None or group.size() == 1:
            return original(input_, group, output_split_sizes, use_global_buffer)
        rows = max(output_split_sizes)
        padded = input_.new_zeros((rows, *input_.shape[1:]))
        padded[: input_.shape[0]] = input_
        parts = [torch.empty_like(padded) for _ in range(group.size())]
        dist.all_gather(parts, padded, group=group)
        return torch.cat([part[:n] for part, n in zip(parts, output_split_sizes)], dim=0)

    mappings._gather_along_first_dim = gather_along_first_dim


def _ensure_adam_state(optimizer) -> None:
    for group in optimizer.param_groups:
        for param in group["params"]:
            state = optimizer.state[param]
            if not state:
                state["step"] = torch.tensor(0.0)
                state["exp_avg"] = torch.zeros_like(param)
                state["exp_avg_sq"] = torch.zeros_like(param)


def _patch_torch_adam_state():
    from megatron.core.optimizer import distrib_optimizer as dopt

    if getattr(dopt, "HAVE_APEX_OR_TE", False):
        return
    cls = dopt.DistributedOptimizer
    original_state_dict, original_load = cls.state_dict, cls.load_state_dict
    original_set = cls._set_main_param_and_optimizer_states

    def state_dict(self):
        _ensure_adam_state(self.optimizer)
        return original_state_dict(self)

    def load_state_dict(self, state_dict):
        original_load(self, state_dict)
        for state in self.optimizer.state.values():
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].clone()

    def set_main_param_and_optimizer_states(self, model_param, tensors):
        # the checkpoint carries no per-param "step" (it lives in param_groups); keep ours
        group_index, group_order = self.model_param_group_index_map[model_param]
        main_param = self.optimizer.param_groups[group_index]["params"][group_order]
        step = self.optimizer.state[main_param].get("step")
        if step is not None and "step" not in tensors:
            tensors = {**tensors, "step": step.clone()}
        return original_set(self, model_param, tensors)

    cls.state_dict, cls.load_state_dict = state_dict, load_state_dict
    cls._set_main_param_and_optimizer_states = set_main_param_and_optimizer_states


# ------------------------------------------------------------------ device mode
def _is_cuda_device(device) -> bool:
    if isinstance(device, int):
        return True
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, torch.device) and device.type == "cuda"


def _run_backward(mode, tensors, grad_tensors=None, retain_graph=None, create_graph=False,
                  inputs=None):
    """torch.autograd.backward, but with ``mode`` active inside the engine.

    A TorchFunctionMode is popped while its own handler runs, so a backward
    routed through the handler would run every hook and custom backward
    (megatron's all-to-all, gather, DDP hooks) without the CUDA->CPU mapping.
    """
    from torch import autograd
    from torch.autograd import graph

    tensors = (tensors,) if torch.is_tensor(tensors) else tuple(tensors)
    grads = autograd._tensor_or_tensors_to_tuple(grad_tensors, len(tensors))
    with mode:
        grads = autograd._make_grads(tensors, grads, is_grads_batched=False)
        graph._engine_run_backward(
            tensors, grads, create_graph if retain_graph is None else retain_graph,
            create_graph, tuple(inputs or ()), allow_unreachable=True, accumulate_grad=True)


def _tensor_backward_args(self, gradient=None, retain_graph=None, create_graph=False, inputs=None):
    return self, gradient, retain_graph, create_graph, inputs


def _autograd_backward_args(tensors, grad_tensors=None, retain_graph=None, create_graph=False,
                            grad_variables=None, inputs=None):
    return tensors, grad_tensors, retain_graph, create_graph, inputs


class CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA device arguments of torch calls to the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.backward:
            return _run_backward(self, *_tensor_backward_args(*args, **kwargs))
        if func is torch.autograd.backward:
            return _run_backward(self, *_autograd_backward_args(*args, **kwargs))
        if func is torch.Tensor.cuda:
            return args[0]
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs = {**kwargs, "device": "cpu"}
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], "cpu", *args[2:])
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            return func(*args).replace("torch.", "torch.cuda.", 1)
        return func(*args, **kwargs)


_mode = None


def _enter_device_mode():
    global _mode
    _mode = CudaToCpuMode()
    _mode.__enter__()


def native_torch():
    """A context whose torch calls bypass the device mode: for this project's own tensor code on
    hot paths, which never names a CUDA device (weight publication, packing and loading).

    Why: the mode is a Python ``__torch_function__`` handler on every torch call
    of the process. Measured here: three cheap tensor methods take 1.7 us bare
    and 12.3 us under the mode, and one weight publication of the tiny RL model
    makes hundreds of calls (1.05 -> 0.52 ms). Without the mode (a GPU host) it
    does nothing.
    """
    return torch._C.DisableTorchFunction() if _mode is not None else contextlib.nullcontext()


def check_version() -> bool:
    """True if the installed megatron-core is one these patches were verified against."""
    from megatron.core import package_info

    if package_info.__version__ in TESTED_MCORE_VERSIONS:
        return True
    log.warning(f"megatron-core {package_info.__version__} is not among the versions the CPU "
                f"compatibility layer was verified with {TESTED_MCORE_VERSIONS}; run "
                f"tests/test_cpu_compat.py to see which patches still apply")
    return False


def apply() -> bool:
    """Apply all CPU patches once; a no-op (returns False) when CUDA is present."""
    global _applied
    if cuda_present():
        return False
    if _applied:
        return True
    check_version()
    _patch_rng_tracker()
    _patch_cuda_api()
    _patch_moe_te_gemm_name()
    _patch_moe_host_splits()
    _patch_uneven_all_gather()
    _patch_torch_adam_state()
    _enter_device_mode()
    _applied = True
    return True
