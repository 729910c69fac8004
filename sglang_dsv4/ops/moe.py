"""MoE op (``Ops.moe``): the routed + shared experts of a layer.

:class:`MoeTorch` is the twin, ``ref.RefDSV4.ffn`` (routing in torch, the layer's routed-experts
callable, the shared expert). The grouped-kernel path belongs to the ``moe`` family's GPU class.
"""

import torch

from sglang_dsv4.config import DSV4Config, LayerSpec
from sglang_dsv4.ref.model import RefDSV4

__all__ = ["MoeTorch", "moe_ops"]


class MoeTorch:
    def ffn(
        self, ref: RefDSV4, spec: LayerSpec, x: torch.Tensor, ids: torch.Tensor, graph_safe: bool
    ) -> torch.Tensor:
        """``x`` [T, d] (the normed block input), token ``ids`` [T] -> [T, d]. ``graph_safe``:
        no data-dependent shapes (inside a CUDA-graph capture)."""
        return ref.ffn(spec, x, ids, graph_safe=graph_safe)


def moe_ops(cfg: DSV4Config, device: torch.device, kernels: bool) -> MoeTorch:
    return MoeTorch()
