"""Host -> device copies that do not wait for the GPU.

``torch.tensor(host_list).to("cuda")`` copies from pageable memory, and torch follows a pageable
copy with a stream synchronize: the host waits until every kernel queued before it has run. In an
extend plan that drains the queue (the previous forward) before the next batch can be planned, so
the GPU idles while the host plans. A copy from pinned memory with ``non_blocking=True`` is only
queued; the caching host allocator keeps the pinned block until the copy has run, so the host
tensor may be dropped at once. On a CPU pool the tensor is returned as is.
"""

import torch

__all__ = ["to_device"]


def to_device(host: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``host`` (a CPU tensor) on ``device``, queued behind the device's work without a sync."""
    device = torch.device(device)
    if device.type == "cpu":
        return host
    return host.pin_memory().to(device, non_blocking=True)
