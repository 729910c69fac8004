"""Linears of the served model kept in their checkpoint format on the GPU, and which ones.

On CUDA the released format's quantized linears are not dequantized at load: their bytes are
copied into these modules, which run the Triton kernels directly (the reference math calls them
through :func:`~sglang_dsv4.ref.linear.linear`). Stored layouts, as buffers of the linear ``X``:

* :class:`FP8Linear`: ``X.weight`` float8_e4m3fn [N, K] and ``X.scale`` float8_e8m0fnu
  [ceil(N/128), ceil(K/128)], the released tensors under their released names, copied as they
  are; ``forward(x) = fp8_block_linear(x, weight, scale)`` (W8A16,
  :mod:`sglang_dsv4.kernels.fp8_linear`). 1 byte per weight (+ 1 per 128x128 tile).
* :class:`NVFP4Linear` (``nvfp4_on_load: "linears"``, :mod:`sglang_dsv4.weights.nvfp4`):
  ``X.weight`` uint8 [N, K/2] e2m1 codes (two per byte, low nibble first), ``X.scale`` uint8
  [N, K/16] e4m3 bytes, ``X.global_scale`` fp32 [1]; ``forward`` runs
  :func:`~sglang_dsv4.kernels.mxfp4_moe.fp4_grouped_linear` with one group (offsets built on
  the device). 4.5 bits per weight.

:class:`KeptFormats` decides per released name (``policy.kept(name) -> Fmt | None``):

* off the GPU nothing is kept: every quantized weight is dequantized once at load;
* names in the ``nvfp4_on_load`` scope: NVFP4 (routed experts as banks,
  :mod:`sglang_dsv4.model.experts`; other linears as :class:`NVFP4Linear` when K is a multiple
  of the kernel's 64-wide K tile, else dequantized);
* otherwise, for a released-format checkpoint (``cfg.quant``), the linears it stores FP8
  (:func:`~sglang_dsv4.weights.layout.released_fmt`): attention ``wq_a wq_b wkv wo_b``,
  ``indexer.wq_b``, shared experts, and routed experts when ``expert_dtype`` is ``fp8``; routed
  MXFP4 experts stay MXFP4 (banks). ``wo_a`` is dequantized to the model dtype, as the
  reference runs it (one einsum over the output groups).
"""

import re
from collections.abc import Callable

import torch
from torch import nn

from sglang_dsv4.config import DSV4Config
from sglang_dsv4.kernels.fp8_linear import fp8_block_linear
from sglang_dsv4.kernels.mxfp4_moe import fp4_grouped_linear
from sglang_dsv4.ref.weight_quant import FP8_BLOCK, NVFP4_BLOCK
from sglang_dsv4.weights.layout import Fmt, StoredWeight, logical_shapes, released_fmt

__all__ = ["FP8Linear", "KeptFormats", "NVFP4Linear", "QuantLinear", "keeps_quantized"]

_ROUTED = re.compile(r".*\.ffn\.experts\.\d+\.w[123]\.weight\Z")
_FP4_K_TILE = 64  # fp4_grouped_linear walks K in 64-wide tiles


def keeps_quantized(device: torch.device) -> bool:
    """Whether quantized weights stay quantized on ``device`` (the kernels are CUDA Triton)."""
    return device.type == "cuda"


class QuantLinear(nn.Module):
    """A linear ``[N, K]`` held quantized: ``forward(x [..., K]) -> [..., N]`` in x's dtype."""

    fmt: Fmt

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.in_features, self.out_features = n_in, n_out

    def load(self, stored: StoredWeight) -> None:
        """Copy a checkpoint weight in this module's format into the buffers; ValueError
        (without the tensor name, which the caller adds) when format or shapes differ."""
        if stored.fmt is not self.fmt:
            raise ValueError(f"stored as {stored.fmt.value}, the module holds {self.fmt.value}")
        parts = {"weight": stored.data, "scale": stored.scale}
        if stored.global_scale is not None:
            parts["global_scale"] = stored.global_scale.reshape(1)
        for key, src in parts.items():
            dst = getattr(self, key)
            if src.shape != dst.shape or src.element_size() != dst.element_size():
                raise ValueError(
                    f"{key}: expected {tuple(dst.shape)} {dst.dtype}, found "
                    f"{tuple(src.shape)} {src.dtype}"
                )
            dst.copy_(src.view(dst.dtype) if src.dtype != dst.dtype else src)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


class FP8Linear(QuantLinear):
    """Released FP8 linear (see the module docstring)."""

    fmt = Fmt.FP8

    def __init__(self, n_in: int, n_out: int):
        super().__init__(n_in, n_out)
        tiles = (-(-n_out // FP8_BLOCK), -(-n_in // FP8_BLOCK))
        # empty: the loader fills every tensor or stops (fill kernels for fp8 dtypes vary by build)
        self.register_buffer("weight", torch.empty(n_out, n_in, dtype=torch.float8_e4m3fn))
        self.register_buffer("scale", torch.empty(tiles, dtype=torch.float8_e8m0fnu))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_block_linear(x, self.weight, self._scale_bytes())

    def _scale_bytes(self) -> torch.Tensor:
        """``scale`` as bytes, the kernel's operand (Triton has no e8m0 pointer): one view per
        scale tensor, not one per call. ``load`` copies into ``scale`` in place (the view
        stays valid); ``ops.proj`` re-points a part's ``scale`` at the fused rows and ``.to()``
        replaces it: then a new view is made."""
        made = self.__dict__.get("_scale_view")
        if made is None or made[0] is not self.scale:
            made = self.__dict__["_scale_view"] = (self.scale, self.scale.view(torch.uint8))
        return made[1]


class NVFP4Linear(QuantLinear):
    """NVFP4 linear made at load (see the module docstring)."""

    fmt = Fmt.NVFP4

    def __init__(self, n_in: int, n_out: int):
        super().__init__(n_in, n_out)
        if n_in % _FP4_K_TILE:
            raise ValueError(f"NVFP4Linear needs K % {_FP4_K_TILE} == 0, got K = {n_in}")
        self.register_buffer("weight", torch.zeros(n_out, n_in // 2, dtype=torch.uint8))
        self.register_buffer(
            "scale", torch.zeros(n_out, n_in // NVFP4_BLOCK, dtype=torch.uint8)
        )  # e4m3 bytes
        self.register_buffer("global_scale", torch.ones(1, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)  # [M, K]
        # one group [0, M): offsets made on the device, so a captured graph holds no host copy
        offsets = torch.arange(2, device=x.device, dtype=torch.int32) * x2.shape[0]
        y = fp4_grouped_linear(
            x2, offsets, self.weight[None], self.scale[None], self.global_scale, "nvfp4"
        )
        return y.view(*lead, self.out_features)


class KeptFormats:
    """Which weights of the served model stay quantized, by released name (module docstring).

    ``nvfp4``: the ``nvfp4_on_load`` scope (:func:`~sglang_dsv4.weights.nvfp4.nvfp4_scope`);
    ``on_gpu``: :func:`keeps_quantized` of the model's device."""

    def __init__(self, cfg: DSV4Config, nvfp4: Callable[[str], bool] | None, on_gpu: bool):
        self.cfg, self.nvfp4, self.on_gpu = cfg, nvfp4, on_gpu
        self._shapes = logical_shapes(cfg)

    def kept(self, name: str) -> Fmt | None:
        """Format the logical tensor ``name`` (``layers.0.attn.wq_a.weight``) is held in on the
        device; None: dense in the model dtype."""
        if not self.on_gpu:
            return None
        if self.nvfp4 is not None and self.nvfp4(name):
            if _ROUTED.match(name) or self._shapes[name][1] % _FP4_K_TILE == 0:
                return Fmt.NVFP4
            return None
        quant = self.cfg.quant
        if quant is None or name.endswith(".attn.wo_a.weight"):
            return None
        fmt = released_fmt(name, quant.expert_dtype)
        return fmt if fmt in (Fmt.FP8, Fmt.MXFP4) else None

    def linear(self, prefix: str, n_in: int, n_out: int) -> nn.Module:
        """The module for linear ``prefix`` (``layers.0.attn.wq_a``), weight [n_out, n_in]."""
        fmt = self.kept(prefix + ".weight")
        if fmt is Fmt.FP8:
            return FP8Linear(n_in, n_out)
        if fmt is Fmt.NVFP4:
            return NVFP4Linear(n_in, n_out)
        if fmt is not None:
            raise ValueError(f"`{prefix}` is kept {fmt.value}: only routed-expert banks hold it")
        return nn.Linear(n_in, n_out, bias=False)
