"""Run Triton kernel modules under ``TRITON_INTERPRET=1`` (CPU tensors), whatever was imported.

Triton chooses between the interpreter and the compiler when a ``@triton.jit`` decorator runs,
from ``TRITON_INTERPRET`` at that moment: for our kernel modules at their import, for
``triton.language``'s own jit functions (``tl.max``, ``tl.sum``, ``tl.cumsum`` ...) at Triton's
import. If either happened without the variable (another test imported them first, or a GPU
machine), ``interpreted(m1, m2, ...)`` sets it, swaps ``triton.language``'s jit functions for
interpreted ones, and re-imports the given modules (in dependency order: a module's Triton helpers
before the modules that import them). Everything is restored on exit.
"""

import contextlib
import importlib
import os
from types import ModuleType

import numpy as np
import triton.language as tl
from triton.runtime import interpreter
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

__all__ = ["bf16_dots", "interpreted"]


def _swap_language_jit_functions() -> list[tuple[object, str, object]]:
    """Interpreted twins of the compiled jit functions of ``triton.language``; returns undo."""
    twins: dict[int, InterpretedFunction] = {}
    undo = []
    for owner in (tl, tl.standard, tl.random, tl.tensor):
        for name, value in list(vars(owner).items()):
            if isinstance(value, JITFunction):
                twin = twins.setdefault(id(value.fn), InterpretedFunction(value.fn))
                undo.append((owner, name, value))
                setattr(owner, name, twin)
    return undo


@contextlib.contextmanager
def interpreted(*modules: ModuleType):
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    undo = _swap_language_jit_functions()
    try:
        yield tuple(importlib.reload(m) for m in modules)
    finally:
        for owner, name, value in undo:
            setattr(owner, name, value)
        if old is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = old
        for m in modules:
            importlib.reload(m)


def _as_f32(h) -> np.ndarray:
    if h.dtype.scalar == tl.bfloat16:  # stored as uint16: the high half of an fp32
        return (h.data.astype(np.uint32) << 16).view(np.float32)
    return h.data.astype(np.float32)


@contextlib.contextmanager
def bf16_dots():
    """The interpreter's ``tl.dot`` of bf16 operands as the tensor cores take them (exact
    products, fp32 sums; Triton 3.6's interpreter multiplies their uint16 storage instead), so a
    CPU test can run a kernel's GPU operand choice, not only its fp32 CPU one."""
    builder = interpreter.InterpreterBuilder
    plain = builder.create_dot

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if tl.bfloat16 not in (a.dtype.scalar, b.dtype.scalar):
            return plain(self, a, b, d, input_precision, max_num_imprecise_acc)
        acc = np.matmul(_as_f32(a), _as_f32(b), dtype=np.float32) + d.data
        return interpreter.TensorHandle(acc, d.dtype.scalar)

    builder.create_dot = create_dot
    try:
        yield
    finally:
        builder.create_dot = plain
