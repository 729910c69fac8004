"""What a DSV4 checkpoint holds: every tensor's logical shape and, per format, how it is stored.

Logical tensors are the dense weights the math uses, under released names
(:func:`logical_shapes`; MTP layers as ``mtp.{j}.*``), as listed once by the parameter-spec table
(:mod:`sglang_dsv4.params`). A checkpoint stores each one as

* ``Fmt.DENSE``: one floating tensor of the logical shape (HF-transformers checkpoints, our fp32
  tiny models; any floating dtype);
* in the released format (config.json has a ``quantization_config``), per :func:`released_fmt`:

  ========================  =============================================================
  ``Fmt.FP8``               ``X.weight`` F8_E4M3 [N, K] + ``X.scale`` F8_E8M0
                            [ceil(N/128), ceil(K/128)]: attention ``wq_a wq_b wkv wo_a wo_b``,
                            ``indexer.wq_b``, shared experts, MTP ``e_proj h_proj``, and the
                            routed experts when ``expert_dtype`` is ``fp8``
  ``Fmt.MXFP4``             ``X.weight`` I8 [N, K/2] + ``X.scale`` F8_E8M0 [N, K/32]: routed
                            experts (``expert_dtype: fp4``)
  ``Fmt.BF16``              embed, head, every norm weight, compressor ``wkv``/``wgate``,
                            ``indexer.weights_proj``, router ``gate.weight``
  ``Fmt.FP32``              ``attn_sink``, compressor ``ape``, all ``hc_*``, router ``gate.bias``
  ``Fmt.I64``               ``gate.tid2eid`` [vocab, k]
  ========================  =============================================================

The packing of FP8 / MXFP4 is defined in :mod:`sglang_dsv4.ref.weight_quant`.
"""

import enum
from dataclasses import dataclass

import torch

from sglang_dsv4.config import DSV4Config
from sglang_dsv4.params import Store, param_specs, store_of
from sglang_dsv4.ref.weight_quant import (
    FP8_BLOCK,
    MXFP4_BLOCK,
    NVFP4_BLOCK,
    fp8_block_dequant,
    fp8_block_quant,
    mxfp4_dequant,
    mxfp4_quant,
    nvfp4_dequant,
)

__all__ = [
    "Fmt",
    "StoredWeight",
    "TensorSpec",
    "logical_shapes",
    "pack",
    "released_fmt",
    "stored_bytes",
    "stored_specs",
]


class Fmt(enum.Enum):
    DENSE = "dense"
    FP8 = "fp8"
    MXFP4 = "mxfp4"
    NVFP4 = "nvfp4"  # not in released files: made at load (sglang_dsv4.weights.nvfp4)
    BF16 = "bf16"
    FP32 = "fp32"
    I64 = "i64"

    @property
    def quantized(self) -> bool:
        return self in (Fmt.FP8, Fmt.MXFP4, Fmt.NVFP4)


@dataclass(frozen=True)
class TensorSpec:
    """A stored tensor's shape and dtype; ``dtype`` None = any floating dtype."""

    shape: tuple[int, ...]
    dtype: torch.dtype | None

    def describe(self) -> str:
        return f"{self.shape} {self.dtype if self.dtype is not None else 'floating'}"

    def matches(self, t: torch.Tensor) -> bool:
        if tuple(t.shape) != self.shape:
            return False
        if self.dtype is None:
            return t.dtype.is_floating_point and t.dtype.itemsize >= 2
        return t.dtype == self.dtype


def describe(t: torch.Tensor) -> str:
    return f"{tuple(t.shape)} {t.dtype}"


@dataclass(frozen=True)
class StoredWeight:
    """One logical tensor as stored: ``scale`` for FP8 / MXFP4 / NVFP4, ``global_scale`` for
    NVFP4 (layouts in :mod:`sglang_dsv4.ref.weight_quant`)."""

    fmt: Fmt
    data: torch.Tensor
    scale: torch.Tensor | None = None
    global_scale: torch.Tensor | None = None

    def dequant(self, dtype: torch.dtype) -> torch.Tensor:
        if self.fmt is Fmt.FP8:
            return fp8_block_dequant(self.data, self.scale, dtype)
        if self.fmt is Fmt.MXFP4:
            return mxfp4_dequant(self.data, self.scale, dtype)
        if self.fmt is Fmt.NVFP4:
            return nvfp4_dequant(self.data, self.scale, self.global_scale, dtype)
        return self.data

    @property
    def nbytes(self) -> int:
        parts = (self.data, self.scale, self.global_scale)
        return sum(t.numel() * t.element_size() for t in parts if t is not None)


_STORE_FMT = {Store.FP8: Fmt.FP8, Store.BF16: Fmt.BF16, Store.FP32: Fmt.FP32, Store.I64: Fmt.I64}


def released_fmt(name: str, expert_dtype: str) -> Fmt:
    """Storage format of logical tensor ``name`` in the released checkpoint (the row's
    :class:`~sglang_dsv4.params.Store`; routed experts by ``expert_dtype``)."""
    store = store_of(name)
    if store is Store.EXPERT:
        return Fmt.MXFP4 if expert_dtype == "fp4" else Fmt.FP8
    return _STORE_FMT[store]


def stored_specs(name: str, shape: tuple[int, ...], fmt: Fmt) -> dict[str, TensorSpec]:
    """The checkpoint tensors (name -> spec) holding logical ``name`` of ``shape`` in ``fmt``."""
    if not fmt.quantized:
        dtype = {
            Fmt.DENSE: None,
            Fmt.BF16: torch.bfloat16,
            Fmt.FP32: torch.float32,
            Fmt.I64: torch.int64,
        }[fmt]
        if fmt is Fmt.DENSE and name.endswith("tid2eid"):
            dtype = torch.int64
        return {name: TensorSpec(shape, dtype)}
    if fmt is Fmt.NVFP4:
        raise ValueError("NVFP4 is made at load time; released checkpoints do not store it")
    n, k = shape
    scale_name = name.removesuffix(".weight") + ".scale"
    if fmt is Fmt.FP8:
        blocks = (-(-n // FP8_BLOCK), -(-k // FP8_BLOCK))
        return {
            name: TensorSpec((n, k), torch.float8_e4m3fn),
            scale_name: TensorSpec(blocks, torch.float8_e8m0fnu),
        }
    return {
        name: TensorSpec((n, k // 2), torch.int8),
        scale_name: TensorSpec((n, k // MXFP4_BLOCK), torch.float8_e8m0fnu),
    }


def stored_bytes(shape: tuple[int, ...], fmt: Fmt) -> int:
    """Bytes that a logical tensor of ``shape`` takes in ``fmt`` (data + scales)."""
    n = 1
    for d in shape:
        n *= d
    if fmt is Fmt.FP8:
        return n + -(-shape[0] // FP8_BLOCK) * -(-shape[1] // FP8_BLOCK)
    if fmt is Fmt.MXFP4:
        return n // 2 + n // MXFP4_BLOCK
    if fmt is Fmt.NVFP4:
        return n // 2 + n // NVFP4_BLOCK + 4
    return n * {Fmt.BF16: 2, Fmt.FP32: 4, Fmt.I64: 8, Fmt.DENSE: 4}[fmt]


def pack(t: torch.Tensor, fmt: Fmt) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Logical tensor ``t`` -> (data, scale) as stored in ``fmt`` (scale None if unquantized)."""
    if fmt is Fmt.FP8:
        return fp8_block_quant(t)
    if fmt is Fmt.MXFP4:
        return mxfp4_quant(t)
    dtype = {Fmt.BF16: torch.bfloat16, Fmt.FP32: torch.float32, Fmt.I64: torch.int64}.get(fmt)
    return (t.to(dtype) if dtype is not None else t).contiguous(), None


def logical_shapes(cfg: DSV4Config, mtp: bool = True) -> dict[str, tuple[int, ...]]:
    """Every logical tensor of the model (and of its MTP layers) with its dense shape: the
    shapes of :func:`sglang_dsv4.params.param_specs`."""
    return {n: s.shape for n, s in param_specs(cfg, mtp).items()}
