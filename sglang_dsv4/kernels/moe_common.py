"""What both forms of the grouped MoE (:mod:`~sglang_dsv4.kernels.moe_experts`' slots,
:mod:`~sglang_dsv4.kernels.moe_sorted`'s sorted GEMMs) share: a bank's weight tile decoded in
registers (dense, FP8 block scales, MXFP4 / NVFP4 codes), the limited SwiGLU epilogue, the
bank's strides as launch arguments and the argument checks of a call."""

import torch
import triton
import triton.language as tl

from sglang_dsv4.kernels.mxfp4_moe import _fp4_tile

__all__ = ["bank_strides", "check_add", "routed_slots", "swiglu", "w_tile"]


@triton.jit
def w_tile(w_ptr, s_ptr, gs_ptr, e, offs_n, n_ok, k0, K, stride_wn, stride_sn,
            BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, FMT: tl.constexpr, G: tl.constexpr,
            NV: tl.constexpr):  # fmt: skip
    """Weight tile [BLOCK_N, BLOCK_K] of rows ``offs_n``, columns ``k0 ...`` of one expert
    (``w_ptr`` / ``s_ptr`` at its row ``e``): dense in its dtype, quantized formats decoded to
    fp32 with their scales applied (FP8: ``BLOCK_K`` divides 128, one scale column)."""
    if FMT >= 2:  # FP4: codes * block scale * global scale, as the reference multiplies
        gs = 1.0
        if NV:  # compile-time: one of the two is built
            gs = tl.load(gs_ptr + e)
        w = _fp4_tile(
            w_ptr, s_ptr, offs_n, n_ok, k0, K, stride_wn, stride_sn, gs, BLOCK_N, BLOCK_K, G, NV
        )
    else:
        offs_k = k0 + tl.arange(0, BLOCK_K)
        ok = n_ok[:, None] & (offs_k < K)[None, :]
        w = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :], mask=ok, other=0.0)
        if FMT == 1:  # e4m3 * 2^(b - 127) per 128x128 block: exact in bf16 and fp32
            sb = tl.load(s_ptr + (offs_n // 128) * stride_sn + k0 // 128, mask=n_ok, other=127)
            w = w.to(tl.float32) * tl.exp2(sb.to(tl.float32) - 127.0)[:, None]
    return w


@triton.jit
def swiglu(g, u, limit):
    g = tl.minimum(g, limit)
    u = tl.minimum(tl.maximum(u, -limit), limit)
    return g * tl.sigmoid(g) * u


def bank_strides(w: torch.Tensor, s: torch.Tensor) -> dict:
    return dict(stride_we=w.stride(0), stride_wn=w.stride(1), stride_se=s.stride(0),
                stride_sn=s.stride(1))  # fmt: skip


def check_add(add: torch.Tensor | None, out: torch.Tensor) -> None:
    if add is not None and (add.shape != out.shape or add.dtype != out.dtype):
        raise ValueError(f"add {tuple(add.shape)} {add.dtype}: out's {tuple(out.shape)} "
                         f"{out.dtype} expected")  # fmt: skip
    if add is not None and not add.is_contiguous():
        raise ValueError("add must be contiguous")


def routed_slots(chosen: torch.Tensor | None, shared_row: int | None) -> int:
    """Routed slots per token: ``chosen``'s columns; None: the shared row alone."""
    if chosen is None and shared_row is None:
        raise ValueError("no routed experts (chosen None) and no shared row: nothing to run")
    return 0 if chosen is None else chosen.shape[1]
