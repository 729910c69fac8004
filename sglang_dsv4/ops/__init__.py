"""The served model's ops: one interface per op family, implementation chosen once.

Minimal version from the ``moe`` branch (only the ``moe`` family); the ``fuse`` branch owns this
module and its full version (``hc``, ``norm``, ``moe``) has the same API: take that one on merge.
"""

from dataclasses import dataclass

import torch

from sglang_dsv4.config import DSV4Config
from sglang_dsv4.ops.moe import MoeTorch, moe_ops

__all__ = ["Ops", "build_ops"]


@dataclass(frozen=True)
class Ops:
    moe: MoeTorch


def build_ops(cfg: DSV4Config, device: torch.device | str, *, kernels: bool | None = None) -> Ops:
    """The ops for ``device``: Triton kernels on CUDA, the torch twins elsewhere; ``kernels``
    forces the choice (tests run the kernels on CPU under ``TRITON_INTERPRET=1``)."""
    device = torch.device(device)
    use = device.type == "cuda" if kernels is None else kernels
    return Ops(moe=moe_ops(cfg, device, use))
