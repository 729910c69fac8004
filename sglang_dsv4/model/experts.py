"""Routed experts kept in FP4 on the GPU (instead of dequantized to the model dtype at load).

On CUDA, a layer whose experts arrive as MXFP4 (released ``expert_dtype: fp4``) or are re-stored
as NVFP4 (``nvfp4_on_load``) holds them as three banks, one per projection ``w1 / w2 / w3``
(which layers: :class:`~sglang_dsv4.model.linears.KeptFormats`):

* ``{k}_packed`` uint8 [E, N, K/2]: e2m1 codes, two per byte, low nibble first;
* ``{k}_scale`` uint8 [E, N, K/G]: the scale bytes (e8m0 per 32 for MXFP4, e4m3 per 16 NVFP4);
* ``{k}_global_scale`` fp32 [E] (1 for MXFP4).

That is 4.25 (MXFP4) or 4.5 (NVFP4) bits per weight instead of 16 (BF16). The reference MoE takes
a layer's routed experts as one callable (:data:`sglang_dsv4.ref.model.RoutedExperts`);
:meth:`FP4Experts.routed` gives it :class:`GroupedFP4Experts`, which runs the grouped W4A16
kernel :func:`~sglang_dsv4.kernels.mxfp4_moe.fp4_moe` over the banks: no expert ever exists in
dense form, and no host sync or data-dependent shape (CUDA-graph safe). Off the GPU experts
stay dense (dequantized once at load) and run :class:`~sglang_dsv4.ref.moe.DenseExperts`.
"""

import torch
from torch import nn

from sglang_dsv4.kernels.mxfp4_moe import FP4Bank, fp4_moe
from sglang_dsv4.weights.layout import Fmt, StoredWeight

__all__ = ["FP4Experts", "GroupedFP4Experts"]

PROJECTIONS = ("w1", "w2", "w3")


class GroupedFP4Experts:
    """A layer's routed experts through the grouped FP4 kernel: ``(x [T, d], chosen [T, k],
    weights [T, k], limit, dense) -> [T, d]``. ``dense`` (the graph-safe request) changes
    nothing: the grouped path is already free of data-dependent shapes."""

    def __init__(self, w1: FP4Bank, w2: FP4Bank, w3: FP4Bank):
        self.w1, self.w2, self.w3 = w1, w2, w3

    def __call__(
        self,
        x: torch.Tensor,
        experts: torch.Tensor,
        weights: torch.Tensor,
        limit: float,
        dense: bool = False,
    ) -> torch.Tensor:
        return fp4_moe(x, experts, weights, self.w1, self.w2, self.w3, limit)


class FP4Experts(nn.Module):
    """The routed experts of one layer as FP4 banks (see the module docstring)."""

    def __init__(self, n_experts: int, hidden: int, inter: int, fmt: Fmt):
        super().__init__()
        if fmt not in (Fmt.MXFP4, Fmt.NVFP4):
            raise ValueError(f"FP4 expert banks hold mxfp4 or nvfp4, not {fmt.value}")
        self.fmt = fmt
        group = 16 if fmt is Fmt.NVFP4 else 32
        shapes = ((inter, hidden), (hidden, inter), (inter, hidden))  # [N, K] of w1, w2, w3
        for k, (n, kin) in zip(PROJECTIONS, shapes, strict=True):
            self.register_buffer(
                f"{k}_packed", torch.zeros(n_experts, n, kin // 2, dtype=torch.uint8)
            )
            self.register_buffer(
                f"{k}_scale", torch.zeros(n_experts, n, kin // group, dtype=torch.uint8)
            )
            self.register_buffer(f"{k}_global_scale", torch.ones(n_experts, dtype=torch.float32))

    def store(self, expert: int, proj: str, stored: StoredWeight) -> None:
        """Copy one expert's checkpoint weight (already MXFP4 or NVFP4) into the bank."""
        if stored.fmt is not self.fmt:
            got, want = stored.fmt.value, self.fmt.value
            raise ValueError(f"expert weight in {got}, the bank holds {want}")
        getattr(self, f"{proj}_packed")[expert].copy_(stored.data.view(torch.uint8))
        getattr(self, f"{proj}_scale")[expert].copy_(stored.scale.view(torch.uint8))
        if stored.global_scale is not None:
            getattr(self, f"{proj}_global_scale")[expert].copy_(stored.global_scale)

    def bank(self, proj: str) -> FP4Bank:
        """Projection ``proj`` (``w1`` / ``w2`` / ``w3``) of every expert, for the kernels."""
        return FP4Bank(
            getattr(self, f"{proj}_packed"),
            getattr(self, f"{proj}_scale"),
            getattr(self, f"{proj}_global_scale"),
            self.fmt.value,
        )

    def routed(self) -> GroupedFP4Experts:
        """This layer's routed experts as the reference MoE's callable (grouped kernel)."""
        return GroupedFP4Experts(*(self.bank(k) for k in PROJECTIONS))
