"""Id allocator for DSV4 pools (entry blocks, swa_window pages, tail slots).

Like SGLang's token allocator: the free list is an int64 tensor, ``alloc`` returns ``None`` when
there is no room (the scheduler then queues or retracts; it never raises), and id 0 is reserved
as the write target of padded tokens, so a pool of ``size`` usable ids has ``size + 1`` rows.
Frees are checked: freeing an id that is not allocated is a bug that would hand one row to two
requests, so it raises at once.
"""

import torch

__all__ = ["IdAllocator"]


class IdAllocator:
    def __init__(self, size: int, device: torch.device | str = "cpu"):
        if size < 0:
            raise ValueError(f"allocator size must be >= 0, got {size}")
        self.size = size
        self.device = torch.device(device)
        self.clear()

    def clear(self) -> None:
        self._free = torch.arange(1, self.size + 1, dtype=torch.int64, device=self.device)
        self._in_use = torch.zeros(self.size + 1, dtype=torch.bool, device=self.device)

    @property
    def available(self) -> int:
        return self._free.numel()

    def alloc(self, n: int) -> torch.Tensor | None:
        """``n`` distinct ids (int64), or ``None`` if fewer than ``n`` are free."""
        if n > self._free.numel():
            return None
        ids, self._free = self._free[:n], self._free[n:]
        self._in_use[ids] = True
        return ids

    def free(self, ids: torch.Tensor) -> None:
        if ids.numel() == 0:
            return
        ids = ids.to(self.device, torch.int64).flatten()
        if int(ids.min()) < 1 or int(ids.max()) > self.size:
            raise ValueError(f"ids out of range [1, {self.size}]: {ids.tolist()[:8]}")
        if not bool(self._in_use[ids].all()) or ids.unique().numel() != ids.numel():
            raise ValueError(f"double free or free of unallocated ids: {ids.tolist()[:8]}")
        self._in_use[ids] = False
        self._free = torch.cat([self._free, ids])
