"""Run in a fresh interpreter: for each CPU patch, is it still needed (megatron-core
fails without it) and does it work (the same call succeeds after apply())?"""

import json
import sys

import torch

PROBES = {}


def probe(name):
    def register(fn):
        PROBES[name] = fn
        return fn
    return register


@probe("rng_tracker")
def _rng():
    from megatron.core.tensor_parallel import random as r

    tracker = r.CudaRNGStatesTracker()
    tracker.add("x", 123)
    with tracker.fork("x"):
        a = torch.rand(3)
    with tracker.fork("x"):
        b = torch.rand(3)
    assert not torch.equal(a, b)  # the fork's stream advances


@probe("cuda_device_api")
def _device_api():
    assert torch.cuda.current_device() == 0
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()


@probe("device_mode")
def _device_mode():
    t = torch.zeros(2, device="cuda") + torch.ones(2, device=torch.cuda.current_device())
    assert t.device.type == "cpu" and t.cuda().device.type == "cpu"


@probe("moe_te_gemm_name")
def _te_gemm():
    from megatron.core.transformer.moe import moe_utils

    moe_utils.te_general_gemm  # noqa: B018 - must exist


@probe("moe_host_splits")
def _host_splits():
    from megatron.core.transformer.moe import moe_utils

    out = moe_utils.maybe_move_tensor_to_cpu(torch.tensor([1, 2]), as_numpy=True)
    assert not torch.is_tensor(out) and list(out) == [1, 2]


@probe("tensor_type_check")
def _type_check():
    assert torch.zeros(1).type() == "torch.cuda.FloatTensor"


@probe("backward_in_mode")
def _backward():
    class F(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * 2

        @staticmethod
        def backward(ctx, g):
            return g + torch.zeros(g.shape, device="cuda")

    x = torch.ones(2, requires_grad=True)
    F.apply(x).sum().backward()
    assert x.grad.tolist() == [1.0, 1.0]  # the custom backward passes the incoming grad through


def run_all() -> dict:
    out = {}
    for name, fn in PROBES.items():
        try:
            fn()
            out[name] = "ok"
        except Exception as err:  # a probe reports, it does not stop the others
            out[name] = f"{type(err).__name__}: {err}"[:200]
    return out


def native_torch_check(cpu_compat) -> dict:
    """Inside native_torch() a CUDA device is not rewritten (the mode is bypassed); after it, it is again."""
    with cpu_compat.native_torch():
        try:
            inside = torch.zeros(1, device="cuda").device.type
        except Exception as err:  # a CPU-only torch cannot make a CUDA tensor
            inside = type(err).__name__
    return {"inside": inside, "after": torch.zeros(1, device="cuda").device.type}


if __name__ == "__main__":
    before = run_all()
    from megatron_ernie.runtime import cpu_compat

    applied = cpu_compat.apply()
    after = run_all()
    print(json.dumps({"applied": applied, "before": before, "after": after, "native": native_torch_check(cpu_compat),
                      "patches": [p.name for p in cpu_compat.PATCHES]}))
    sys.exit(0)
