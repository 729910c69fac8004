"""The served model's ops: one interface per op family, implementation chosen once.

``build_ops(cfg, device)`` returns :class:`Ops`, a frozen bundle with one field per family; the
served model builds it once in ``__init__`` and calls ``self.ops.<family>.<op>(...)``. Each
family lives in ``ops/<family>.py`` as

* ``<Family>Torch`` -- the twin, which calls ``sglang_dsv4.ref`` (the CPU path: the reference's
  numbers exactly; the oracle of the kernel tests);
* ``<Family>Triton(<Family>Torch)`` -- the same methods and signatures over the Triton kernels
  of ``sglang_dsv4.kernels`` (kernel modules are called through their module attribute, so tests
  can re-import them under ``TRITON_INTERPRET=1``);
* ``<family>_ops(cfg, device, kernels: bool) -> <Family>Torch`` -- the choice, made here once
  (as FlashInfer picks its backend at init): no ``if kernel is None`` / device branches inside
  the ops or the forward.

Adding a family: write its module, add one field to :class:`Ops` and one argument to the
constructor call in :func:`build_ops`.

Families: ``hc`` (mHC pre / post / head with the following RMSNorm, :mod:`.mhc`), ``norm``
(RMSNorm and RoPE of the attention block, :mod:`.norm`), ``moe`` (routed + shared experts,
:mod:`.moe`), ``proj`` (the linears that read one input as one GEMM, :mod:`.proj`).
"""

from dataclasses import dataclass

import torch

from sglang_dsv4.config import DSV4Config
from sglang_dsv4.ops.mhc import HcTorch, HcWeights, hc_ops
from sglang_dsv4.ops.moe import MoeTorch, moe_ops
from sglang_dsv4.ops.norm import NormTorch, norm_ops
from sglang_dsv4.ops.proj import ProjTorch, proj_ops

__all__ = ["HcWeights", "Ops", "build_ops"]


@dataclass(frozen=True)
class Ops:
    hc: HcTorch
    norm: NormTorch
    moe: MoeTorch
    proj: ProjTorch


def build_ops(cfg: DSV4Config, device: torch.device | str, *, kernels: bool | None = None) -> Ops:
    """The ops for ``device``: Triton kernels on CUDA, the torch twins elsewhere; ``kernels``
    forces the choice (tests run the kernels on CPU under ``TRITON_INTERPRET=1``)."""
    device = torch.device(device)
    use = device.type == "cuda" if kernels is None else kernels
    return Ops(
        hc=hc_ops(cfg, device, use),
        norm=norm_ops(cfg, device, use),
        moe=moe_ops(cfg, device, use),
        proj=proj_ops(use),
    )
