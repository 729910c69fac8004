"""NaN-poisoned allocations for kernels whose wrappers allocate their outputs themselves."""

import contextlib

import pytest
import torch

__all__ = ["PoisonedTorch", "poisoned_allocations"]


@contextlib.contextmanager
def poisoned_allocations():
    """Inside: ``torch.empty`` / ``torch.empty_like`` return NaN-filled float tensors (ints: -1),
    so an output element (or workspace entry) a kernel forgets to write shows up as NaN."""
    empty, empty_like = torch.empty, torch.empty_like

    def poison(t: torch.Tensor) -> torch.Tensor:
        return t.fill_(float("nan") if t.is_floating_point() else -1)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch, "empty", lambda *a, **k: poison(empty(*a, **k)))
        mp.setattr(torch, "empty_like", lambda *a, **k: poison(empty_like(*a, **k)))
        yield


class PoisonedTorch:
    """``torch`` for a kernel module whose outputs hold -1 as a value (index tables): set as
    the module's ``torch``, its ``empty`` fills -7 (True for bool, NaN for floats), so a store
    the kernel misses shows."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def empty(*shape, dtype, device):
        fill = True if dtype is torch.bool else float("nan") if dtype.is_floating_point else -7
        return torch.full(shape, fill, dtype=dtype, device=device)
