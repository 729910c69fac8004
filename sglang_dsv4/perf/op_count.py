"""Torch ops and Triton launches of one call, counted on any device (issues 13/14: fewer kernels
and torch ops per forward step).

:func:`count_ops` runs a call under a ``TorchDispatchMode`` (every aten op that reaches the
dispatcher, after composite ops decompose: what a CUDA run dispatches too) and with the Triton
launchers patched (``JITFunction.run``, and ``InterpretedFunction.run`` under
``TRITON_INTERPRET=1``). Aten ops are sorted into

* ``views``: ops whose output aliases an input (``slice``, ``view``, ``as_strided`` ...), and
  allocations (``empty``, ``empty_strided``): host work only, no kernel on CUDA;
* ``device``: every other op, one kernel (or more) on CUDA (``add``, ``copy_``, ``zero_``,
  ``arange``, ``sort`` ...).

``dry=True`` skips the Triton kernels' bodies (the launch is counted, nothing runs): the GPU
path's code is free of host syncs and data-dependent shapes, so its launches do not depend on
what the kernels write, and a Flash-dims layer can be counted on CPU in seconds (interpreting its
GEMMs would take hours). CUDA kernels of torch ops are counted as their aten ops (on CPU there is
no kernel to see); :func:`~sglang_dsv4.perf.timing.kernel_count` counts real CUDA kernels.
"""

import contextlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["OpCount", "count_ops"]

_ALLOC = {"empty", "empty_strided", "new_empty", "new_empty_strided"}


@dataclass
class OpCount:
    """What one call dispatched and launched (module docstring)."""

    device: Counter = field(default_factory=Counter)  # aten op -> calls (a kernel each on CUDA)
    views: Counter = field(default_factory=Counter)  # aten view / allocation -> calls
    triton: Counter = field(default_factory=Counter)  # Triton kernel name -> launches
    inside: bool = False  # in a Triton launch: the interpreter's own torch ops are not counted

    @property
    def kernels(self) -> int:
        """Kernel launches on CUDA: Triton launches + device aten ops."""
        return sum(self.triton.values()) + sum(self.device.values())

    @property
    def torch_ops(self) -> int:
        return sum(self.device.values()) + sum(self.views.values())

    def summary(self) -> dict:
        return {
            "kernels": self.kernels,
            "triton": sum(self.triton.values()),
            "torch_device_ops": sum(self.device.values()),
            "torch_ops": self.torch_ops,
            "triton_names": dict(self.triton),
            "device_ops": dict(self.device),
            "view_ops": dict(self.views),
        }


class _Mode(TorchDispatchMode):
    def __init__(self, count: OpCount):
        super().__init__()
        self.count = count

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.count.inside:
            return func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        host_only = func.is_view or name in _ALLOC
        (self.count.views if host_only else self.count.device)[name] += 1
        return func(*args, **(kwargs or {}))


def _launchers() -> list[type]:
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    return [JITFunction, InterpretedFunction]


@contextlib.contextmanager
def _patched(count: OpCount, dry: bool):
    saved = {cls: cls.__dict__["run"] for cls in _launchers()}

    def wrap(run):
        def counted(self, *args, **kwargs):
            if kwargs.get("warmup"):
                return run(self, *args, **kwargs)
            count.triton[self.fn.__name__] += 1
            if dry:
                return None
            count.inside = True
            try:
                return run(self, *args, **kwargs)
            finally:
                count.inside = False

        return counted

    try:
        for cls, run in saved.items():
            cls.run = wrap(run)
        yield
    finally:
        for cls, run in saved.items():
            cls.run = run


def count_ops(fn: Callable, dry: bool = False) -> tuple[OpCount, object]:
    """(counts, result) of one call of ``fn`` (module docstring); ``dry``: Triton kernels are
    counted but not run (their outputs stay as allocated)."""
    count = OpCount()
    with _patched(count, dry), _Mode(count):
        result = fn()
    return count, result
