"""FP4 routed experts, W4A16: a grouped GEMM and a dequantizing kernel for MXFP4 and NVFP4.

Weights are one bank per projection: ``packed`` uint8 [E, N, K/2] (e2m1 codes, element 2j in the
low nibble), ``scale`` uint8 [E, N, K/G] and ``global_scale`` fp32 [E]:

* MXFP4 (G = 32): scale bytes are e8m0, ``2^(b - 127)``; global scale 1;
* NVFP4 (G = 16): scale bytes are e4m3 (decoded by hand: sign, 4-bit exponent bias 7, 3-bit
  mantissa, subnormals), times the expert's fp32 global scale.

:func:`fp4_grouped_linear`: rows of ``x`` grouped by expert (``offsets`` [E+1]) times each
expert's dequantized weight, transposed; the codes are decoded to the activation dtype inside the
kernel, tile by tile, never to memory. :func:`fp4_moe` runs a routed MoE layer with it (group the
(token, slot) pairs by expert with :mod:`~sglang_dsv4.kernels.moe_group`, w1 and w3, clamped
SwiGLU, w2, weighted scatter-add), with no host sync and no data-dependent shape, so it can be
captured in a CUDA graph (the launch grid covers every expert with the largest possible group;
empty programs return at once).
:func:`fp4_dequant` writes one expert's dense weight (NVFP4's "dequantizing kernel", also
:class:`ExpertBank`'s per-expert view, kept for tests and benchmarks). Twins:
:mod:`sglang_dsv4.ref.weight_quant` (``mxfp4_dequant`` / ``nvfp4_dequant`` then matmul) and
:func:`sglang_dsv4.ref.moe.moe`.
"""

from typing import NamedTuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from sglang_dsv4.kernels.moe_group import group_pairs

__all__ = ["ExpertBank", "FP4Bank", "fp4_dequant", "fp4_grouped_linear", "fp4_moe"]


@triton.jit
def _e2m1(code):
    """fp32 value of 4-bit e2m1 codes: bit 3 sign, bits 1-2 exponent (bias 1), bit 0 mantissa."""
    e = (code >> 1) & 3
    m = (code & 1).to(tl.float32)
    mag = tl.where(e == 0, 0.5 * m, tl.exp2(e.to(tl.float32) - 1.0) * (1.0 + 0.5 * m))
    return tl.where((code & 8) != 0, -mag, mag)


@triton.jit
def _scale_value(b, NV: tl.constexpr):
    """fp32 value of scale bytes: e4m3 (NVFP4) or e8m0 (MXFP4)."""
    if NV:
        e = (b >> 3) & 15
        m = (b & 7).to(tl.float32)
        mag = tl.where(
            e == 0, m * 0.001953125, tl.exp2(e.to(tl.float32) - 7.0) * (1.0 + 0.125 * m)
        )  # subnormals: m / 8 * 2^-6
        return tl.where((b & 128) != 0, -mag, mag)
    return tl.exp2(b.to(tl.float32) - 127.0)


@triton.jit
def _fp4_tile(
    w_ptr,
    s_ptr,
    offs_n,
    n_ok,
    k0,
    K,
    stride_wn,
    stride_sn,
    gs,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    G: tl.constexpr,
    NV: tl.constexpr,
):
    """Dequantized weight tile [BLOCK_N, BLOCK_K] in fp32: code * (block scale * global scale),
    multiplied in the reference's order so that the values are bit-identical."""
    offs_b = k0 // 2 + tl.arange(0, BLOCK_K // 2)
    p = tl.load(
        w_ptr + offs_n[:, None] * stride_wn + offs_b[None, :],
        mask=n_ok[:, None] & (offs_b < K // 2)[None, :],
        other=0,
    ).to(tl.int32)
    codes = tl.reshape(tl.join(p & 15, p >> 4), (BLOCK_N, BLOCK_K))  # low nibble first
    offs_g = k0 // G + tl.arange(0, BLOCK_K // G)
    sb = tl.load(
        s_ptr + offs_n[:, None] * stride_sn + offs_g[None, :],
        mask=n_ok[:, None] & (offs_g < K // G)[None, :],
        other=0,
    ).to(tl.int32)
    w = (
        tl.reshape(_e2m1(codes), (BLOCK_N, BLOCK_K // G, G))
        * (_scale_value(sb, NV) * gs)[:, :, None]
    )
    return tl.reshape(w, (BLOCK_N, BLOCK_K))


@triton.jit
def _fp4_grouped_kernel(
    x_ptr,
    off_ptr,
    w_ptr,
    s_ptr,
    gs_ptr,
    y_ptr,
    N,
    K,
    stride_xm,
    stride_we,
    stride_wn,
    stride_se,
    stride_sn,
    stride_ym,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    G: tl.constexpr,
    NV: tl.constexpr,
    IEEE: tl.constexpr,
):
    e = tl.program_id(0)
    start = tl.load(off_ptr + e)
    end = tl.load(off_ptr + e + 1)
    row0 = start + tl.program_id(1) * BLOCK_M
    if row0 >= end:
        return  # the grid covers the largest possible group; most programs have no rows
    offs_m = row0 + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < end
    n_ok = offs_n < N
    w_e = w_ptr + e * stride_we
    s_e = s_ptr + e * stride_se
    gs = tl.load(gs_ptr + e)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + (k0 + offs_k)[None, :],
            mask=m_ok[:, None] & ((k0 + offs_k) < K)[None, :],
            other=0.0,
        )
        w = _fp4_tile(
            w_e, s_e, offs_n, n_ok, k0, K, stride_wn, stride_sn, gs, BLOCK_N, BLOCK_K, G, NV
        )
        if IEEE:
            acc += tl.dot(x, tl.trans(w.to(x.dtype)), input_precision="ieee")
        else:
            acc += tl.dot(x, tl.trans(w.to(x.dtype)))
    tl.store(
        y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :],
        acc.to(y_ptr.dtype.element_ty),
        mask=m_ok[:, None] & n_ok[None, :],
    )


@triton.jit
def _fp4_dequant_kernel(
    w_ptr,
    s_ptr,
    gs,
    y_ptr,
    N,
    K,
    stride_wn,
    stride_sn,
    stride_yn,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    G: tl.constexpr,
    NV: tl.constexpr,
):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    n_ok = offs_n < N
    w = _fp4_tile(
        w_ptr, s_ptr, offs_n, n_ok, k0, K, stride_wn, stride_sn, gs, BLOCK_N, BLOCK_K, G, NV
    )
    offs_k = k0 + tl.arange(0, BLOCK_K)
    tl.store(
        y_ptr + offs_n[:, None] * stride_yn + offs_k[None, :],
        w.to(y_ptr.dtype.element_ty),
        mask=n_ok[:, None] & (offs_k < K)[None, :],
    )


def _group(fmt: str) -> tuple[int, bool]:
    if fmt not in ("mxfp4", "nvfp4"):
        raise ValueError(f"fp4 format {fmt!r}: expected 'mxfp4' or 'nvfp4'")
    return (16, True) if fmt == "nvfp4" else (32, False)


def fp4_grouped_linear(
    x: torch.Tensor,
    offsets: torch.Tensor,
    packed: torch.Tensor,
    scale: torch.Tensor,
    global_scale: torch.Tensor,
    fmt: str,
) -> torch.Tensor:
    """``x`` [R, K] (rows of expert e at ``offsets[e]:offsets[e+1]``), bank ``packed`` [E, N, K/2]
    -> [R, N]: row r of expert e times dequant(expert e).T."""
    g, nv = _group(fmt)
    n_exp, n, half = packed.shape
    k = 2 * half
    if x.shape[-1] != k or k % 64:
        raise ValueError(f"x has {x.shape[-1]} inputs; the bank has {k} (a multiple of 64)")
    x = x.contiguous()
    y = torch.empty(x.shape[0], n, dtype=x.dtype, device=x.device)
    if x.shape[0] == 0:
        return y
    block_m = 16 if x.shape[0] <= 16 else 32 if x.shape[0] <= 256 else 64
    grid = (n_exp, triton.cdiv(x.shape[0], block_m), triton.cdiv(n, 64))
    _fp4_grouped_kernel[grid](
        x,
        offsets,
        packed,
        scale,
        global_scale,
        y,
        n,
        k,
        x.stride(0),
        packed.stride(0),
        packed.stride(1),
        scale.stride(0),
        scale.stride(1),
        y.stride(0),
        BLOCK_M=block_m,
        BLOCK_N=64,
        BLOCK_K=64,
        G=g,
        NV=nv,
        IEEE=x.dtype == torch.float32,
        num_warps=4,
        num_stages=3,
    )
    return y


def fp4_dequant(
    packed: torch.Tensor,
    scale: torch.Tensor,
    global_scale: torch.Tensor | float,
    fmt: str,
    dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """One expert's packed [N, K/2] + scales -> dense ``dtype`` [N, K]."""
    g, nv = _group(fmt)
    n, half = packed.shape
    k = 2 * half
    y = torch.empty(n, k, dtype=dtype, device=packed.device)
    grid = (triton.cdiv(n, 64), triton.cdiv(k, 64))
    gs = float(global_scale)
    _fp4_dequant_kernel[grid](
        packed, scale, gs, y, n, k, packed.stride(0), scale.stride(0), y.stride(0),
        BLOCK_N=64, BLOCK_K=64, G=g, NV=nv,
    )  # fmt: skip
    return y


class FP4Bank(NamedTuple):
    """One projection (w1, w2 or w3) of a layer's routed experts as FP4, the operand of the
    grouped kernels: ``packed`` uint8 [E, N, K/2], ``scale`` uint8 [E, N, K/G], ``global_scale``
    fp32 [E], ``fmt`` ``"mxfp4"`` / ``"nvfp4"``."""

    packed: torch.Tensor
    scale: torch.Tensor
    global_scale: torch.Tensor
    fmt: str


class ExpertBank:
    """One projection (w1, w2 or w3) of a layer's routed experts, kept as FP4: ``packed`` uint8
    [E, N, K/2], ``scale`` uint8 [E, N, K/G], ``global_scale`` fp32 [E]. Indexing by expert id
    returns that expert's dense weight (dequantized on use), the contract of
    :func:`sglang_dsv4.ref.moe.moe`."""

    def __init__(self, packed, scale, global_scale, fmt: str, dtype: torch.dtype):
        _group(fmt)
        self.packed, self.scale, self.global_scale = packed, scale, global_scale
        self.fmt, self.dtype = fmt, dtype

    def __len__(self) -> int:
        return self.packed.shape[0]

    def __getitem__(self, e: int) -> torch.Tensor:
        return fp4_dequant(
            self.packed[e], self.scale[e], self.global_scale[e], self.fmt, self.dtype
        )


def fp4_moe(
    x: torch.Tensor,
    experts: torch.Tensor,
    weights: torch.Tensor,
    w1: FP4Bank | ExpertBank,
    w2: FP4Bank | ExpertBank,
    w3: FP4Bank | ExpertBank,
    limit: float,
) -> torch.Tensor:
    """Routed experts of one layer, grouped: ``x`` [T, d], chosen ``experts`` / ``weights``
    [T, k] -> sum over slots of weight * w2(silu(min(w1 x, L)) * clamp(w3 x, -L, L)) [T, d].
    CUDA-graph safe (see the module docstring)."""
    t, k = experts.shape
    n_exp = w1.packed.shape[0]
    # (token, slot) pairs grouped by expert (kernels.moe_group: one or two launches, the bits
    # of torch's stable sort); order [T*k] int32, offsets [E+1], pair weights fp32 [T*k]
    order, offsets, pair_weights = group_pairs(experts, weights, n_exp)
    tokens = order // k
    xs = x[tokens]  # [T*k, d]

    def run(bank: FP4Bank | ExpertBank, inp: torch.Tensor) -> torch.Tensor:
        return fp4_grouped_linear(
            inp, offsets, bank.packed, bank.scale, bank.global_scale, bank.fmt
        )

    gate = run(w1, xs).float().clamp(max=limit)
    up = run(w3, xs).float().clamp(min=-limit, max=limit)
    h = (F.silu(gate) * up).to(x.dtype)
    y = run(w2, h).float() * pair_weights[order, None]
    out = torch.zeros(t, x.shape[1], dtype=torch.float32, device=x.device)
    out.index_add_(0, tokens, y)
    return out.to(x.dtype)
