"""Every CPU patch for megatron-core is still needed and still works.

A fresh interpreter runs each probe before and after ``cpu_compat.apply()``:
a probe that passes *before* means megatron-core (or torch) no longer needs
that patch; one that fails *after* means the patch broke.  The distributed
patches (uneven all-gather, torch AdamW state) are exercised for real by the
layout-equivalence and resume tests.
"""

import json
import subprocess
import sys

import pytest
import torch

from harness import ROOT

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the compat layer is for CPU-only hosts")


@pytest.fixture(scope="module")
def probe():
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "compat_probe.py")], capture_output=True,
                          text=True, cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_applied_on_cpu(probe):
    assert probe["applied"] is True


@pytest.mark.parametrize("name", ["rng_tracker", "cuda_device_api", "device_mode", "moe_te_gemm_name",
                                  "moe_host_splits", "tensor_type_check", "backward_in_mode"])
def test_patch_is_needed_and_works(probe, name):
    assert name in probe["patches"]
    assert probe["before"][name] != "ok", f"{name} is no longer needed: remove the patch"
    assert probe["after"][name] == "ok", probe["after"][name]


def test_native_torch_bypasses_the_device_mode_only_inside(probe):
    """Hot paths of this project's own tensor code opt out of the mode's per-call cost; a CUDA
    device named inside is then not rewritten (so the opt-out really bypasses it), and after the
    block the mode is back."""
    assert probe["native"]["inside"] != "cpu" and probe["native"]["after"] == "cpu"


def test_every_patch_is_documented():
    from megatron_ernie.runtime import cpu_compat

    for patch in cpu_compat.PATCHES:
        assert patch.assumption and patch.stand_in
    assert cpu_compat.check_version()


def test_apply_is_a_noop_with_cuda(monkeypatch):
    from megatron_ernie.runtime import cpu_compat

    monkeypatch.setattr(cpu_compat, "cuda_present", lambda: True)
    assert cpu_compat.apply() is False
