"""Routed experts kept in FP4 on the GPU (instead of dequantized to the model dtype at load).

On CUDA, a layer whose experts arrive as MXFP4 (released ``expert_dtype: fp4``) or are re-stored
as NVFP4 (``nvfp4_on_load``) holds them as three banks, one per projection ``w1 / w2 / w3``:

* ``{k}_packed`` uint8 [E, N, K/2]: e2m1 codes, two per byte, low nibble first;
* ``{k}_scale`` uint8 [E, N, K/G]: the scale bytes (e8m0 per 32 for MXFP4, e4m3 per 16 NVFP4);
* ``{k}_global_scale`` fp32 [E] (1 for MXFP4).

That is 4.25 (MXFP4) or 4.5 (NVFP4) bits per weight instead of 16 (BF16). The reference MoE
(:func:`sglang_dsv4.ref.moe.moe`) takes expert weights "indexable by expert id":
:meth:`FP4Experts.banks` gives it :class:`~sglang_dsv4.kernels.mxfp4_moe.ExpertBank` objects
that dequantize one expert at a time with the Triton kernel, so the MoE never holds more than the
experts in use in dense form. (:func:`~sglang_dsv4.kernels.mxfp4_moe.fp4_moe` is the grouped
GEMM path over the same banks.) On CPU experts stay dense (dequantized once at load).
"""

from collections.abc import Callable

import torch
from torch import nn

from sglang_dsv4.config import DSV4Config
from sglang_dsv4.weights.layout import Fmt, StoredWeight

__all__ = ["FP4Experts", "fp4_expert_format"]

PROJECTIONS = ("w1", "w2", "w3")


def fp4_expert_format(
    cfg: DSV4Config, nvfp4: Callable[[str], bool] | None, device: torch.device
) -> str | None:
    """``"mxfp4"`` / ``"nvfp4"`` when the routed experts stay FP4 on ``device``, else None."""
    if device.type != "cuda":
        return None
    if nvfp4 is not None and nvfp4("layers.0.ffn.experts.0.w1.weight"):
        return "nvfp4"
    if cfg.quant is not None and cfg.quant.expert_dtype == "fp4":
        return "mxfp4"
    return None


class FP4Experts(nn.Module):
    """The routed experts of one layer as FP4 banks (see the module docstring)."""

    def __init__(self, n_experts: int, hidden: int, inter: int, fmt: str):
        super().__init__()
        self.fmt = fmt
        group = 16 if fmt == "nvfp4" else 32
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
        want = Fmt.NVFP4 if self.fmt == "nvfp4" else Fmt.MXFP4
        if stored.fmt is not want:
            raise ValueError(f"expert weight in {stored.fmt.value}, the bank holds {self.fmt}")
        getattr(self, f"{proj}_packed")[expert].copy_(stored.data.view(torch.uint8))
        getattr(self, f"{proj}_scale")[expert].copy_(stored.scale.view(torch.uint8))
        if stored.global_scale is not None:
            getattr(self, f"{proj}_global_scale")[expert].copy_(stored.global_scale)

    def banks(self, dtype: torch.dtype) -> tuple:
        """(w1, w2, w3) banks that dequantize an expert to ``dtype`` when indexed."""
        from sglang_dsv4.kernels.mxfp4_moe import ExpertBank

        return tuple(
            ExpertBank(
                getattr(self, f"{k}_packed"),
                getattr(self, f"{k}_scale"),
                getattr(self, f"{k}_global_scale"),
                self.fmt,
                dtype,
            )
            for k in PROJECTIONS
        )

    def named_expert_views(self, prefix: str) -> dict[str, torch.Tensor]:
        """``{prefix}{e}.{k}.weight`` -> expert e's packed bytes: the released names under which
        the reference looks the experts up before :meth:`banks` replaces them."""
        n_experts = self.w1_packed.shape[0]
        return {
            f"{prefix}{e}.{k}.weight": getattr(self, f"{k}_packed")[e]
            for k in PROJECTIONS
            for e in range(n_experts)
        }
