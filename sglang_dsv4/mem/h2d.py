"""Host -> device copies that do not wait for the GPU.

``torch.tensor(host_list).to("cuda")`` copies from pageable memory, and torch follows a pageable
copy with a stream synchronize: the host waits until every kernel queued before it has run. In an
extend plan that drains the queue (the previous forward) before the next batch can be planned, so
the GPU idles while the host plans. A copy from pinned memory with ``non_blocking=True`` is only
queued; the caching host allocator keeps the pinned block until the copy has run, so the host
tensor may be dropped at once. On a CPU pool the tensor is returned as is.

The other way, :class:`HostCopy` queues a device-to-host copy into pinned memory and records an
event: the host reads it later (the next batch's plan), when the work queued before the copy
has long run, instead of draining the queue now.
"""

import torch

__all__ = ["HostCopy", "to_device"]


def to_device(host: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``host`` (a CPU tensor) on ``device``, queued behind the device's work without a sync."""
    device = torch.device(device)
    if device.type == "cpu":
        return host
    return host.pin_memory().to(device, non_blocking=True)


class HostCopy:
    """``dev`` copied to the host behind the work queued so far, without waiting for it;
    :meth:`wait` returns the host tensor once the copy has run (on a CPU pool: at once)."""

    def __init__(self, dev: torch.Tensor):
        cuda = dev.device.type == "cuda"
        self._host = torch.empty(dev.shape, dtype=dev.dtype, pin_memory=cuda)
        self._host.copy_(dev, non_blocking=cuda)  # kept: copy_'s return may be a subclass view
        self._event = None
        if cuda:
            self._event = torch.cuda.Event()
            self._event.record()

    def wait(self) -> torch.Tensor:
        if self._event is not None:
            self._event.synchronize()  # the copy only, queued before the batch it checks
        return self._host
