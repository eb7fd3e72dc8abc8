"""runtime/mcore_import.py: megatron-core imports without torch's compiler stack, and nothing else changes."""

import json
import subprocess
import sys

from harness import ROOT

PROBE = r"""
import json, sys
import torch
real = torch.compile
import megatron_ernie  # installs the hook
import megatron.core
from megatron.core import jit
facts = {"compiler_imported": "torch._dynamo" in sys.modules or "torch._inductor" in sys.modules,
         "compile_restored": torch.compile is real,
         "fuser_deferred": getattr(jit.jit_fuser(lambda x: x), "deferred_compile", False)}
def affine(x):
    return x * 2 + 1
fused = jit.jit_fuser(affine, backend="eager")  # the real torch.compile's arguments, passed on at the first call
facts["value"] = fused(torch.arange(3.0)).tolist()
facts["compiled_at_first_call"] = "torch._dynamo" in sys.modules
facts["wraps"] = fused.__name__
print(json.dumps(facts))
"""


def test_megatron_core_imports_without_the_compiler_and_fused_functions_compile_at_first_call():
    proc = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    facts = json.loads(proc.stdout.strip().splitlines()[-1])
    assert facts == {"compiler_imported": False, "compile_restored": True, "fuser_deferred": True,
                     "value": [1.0, 3.0, 5.0], "compiled_at_first_call": True, "wraps": "affine"}
