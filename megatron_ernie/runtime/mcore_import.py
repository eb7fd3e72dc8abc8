"""Import megatron-core without importing torch's compiler stack at start-up.

megatron-core decorates its fused element-wise functions (bias-GeLU, bias-SwiGLU,
...) with ``jit_fuser``, which is ``torch.compile`` on torch >= 2.2
(megatron/core/jit.py). ``torch.compile(fn)`` compiles nothing until the first
call, but it imports ``torch._dynamo`` and ``torch._inductor`` when it wraps:
about a third of megatron-core's import time, paid by every process of every
launch although most never call those functions (CPU runs turn the fusions
off; a GPU run calls a few of them).

``install()`` (called from the package ``__init__``) adds an import hook that
acts once, on the first ``import megatron.core``: while megatron.core's package
import runs, ``torch.compile`` is a stand-in that returns a wrapper calling the
real ``torch.compile`` with the same arguments on its first call; the real one
is put back as soon as that import ends. Compilation thus happens at the same
moment as before (the first call), only the compiler's import is deferred to
it, and code outside megatron-core's import always sees the real
``torch.compile``. ``tests/test_cpu_compat.py`` checks that the stand-in is
gone after the import and that a deferred function still compiles and agrees.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import sys


def deferred_compile(real):
    """A torch.compile look-alike whose wrapper calls `real` (torch.compile) at its first call."""

    def compile_later(model=None, **options):
        if model is None:  # decorator with arguments: @torch.compile(mode=...)
            return lambda fn: compile_later(fn, **options)
        compiled = None

        @functools.wraps(model)
        def call(*args, **kwargs):
            nonlocal compiled
            if compiled is None:
                compiled = real(model, **options)
            return compiled(*args, **kwargs)

        call.deferred_compile = True
        return call

    return compile_later


class _SwapDuringExec(importlib.abc.Loader):
    """Runs the wrapped loader's exec_module with torch.compile deferred, then restores it."""

    def __init__(self, inner):
        self.inner = inner

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module):
        import torch

        real = torch.compile
        torch.compile = deferred_compile(real)
        try:
            self.inner.exec_module(module)
        finally:
            torch.compile = real


class _FirstMegatronImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "megatron.core":
            return None
        uninstall()
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _SwapDuringExec(spec.loader)
        return spec


_HOOK = _FirstMegatronImport()


def install() -> None:
    """Hook the first import of megatron.core (no-op if it is already imported or hooked)."""
    if "megatron.core" not in sys.modules and _HOOK not in sys.meta_path:
        sys.meta_path.insert(0, _HOOK)


def uninstall() -> None:
    if _HOOK in sys.meta_path:
        sys.meta_path.remove(_HOOK)
