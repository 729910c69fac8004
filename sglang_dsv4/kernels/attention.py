"""Sparse MQA attention of DSV4 over per-query row lists, for Hopper (twin:
``ref.attention.sparse_attention``).

One kernel family serves every attention call of the model: CSA decode (top-k entries + the
``swa_window``), HCA decode (all visible entries + the window), MTP rows and prefill / extend
(every query row carries its own lists, so causal visibility is whatever the lists say). Query
``t`` attends to the rows ``indices[t]`` of a main cache and, optionally, ``extra_indices[t]`` of
an extra cache (FlashMLA's ``indices`` / ``extra_indices_in_kvcache``); ``-1`` is an empty slot,
and an optional per-query length cuts each list (FlashMLA's ``topk_length``). With
``l_i = q[t, h] . k_i * scale`` over the valid rows of both lists:

    o[t, h] = sum_i exp(l_i) k_i / (sum_i exp(l_i) + exp(sink[h]))      (K = V, one KV head)
    lse[t, h] = log sum_i exp(l_i)      (natural log, sink excluded, -inf for an empty list)

Caches (``D`` = head dim, the last 64 channels are RoPE):

* FP8, FlashMLA's DSV4 layout: a row is ``D-64`` e4m3 nope channels, 64 bf16 RoPE channels, one
  UE8M0 exponent byte per 64 nope channels and one pad byte (584 bytes at D=512, see
  ``ref.kv_layout``). A 2-D uint8 ``[N, row_bytes]`` tensor holds one such row per index. A 3-D
  ``[pages, P, row_bytes]`` or 4-D ``[pages, P, 1, row_bytes]`` tensor is FlashMLA's paged form:
  index ``i`` is slot ``i % P`` of page ``i // P``; a page stores the ``P`` nope+RoPE parts
  (``D+64`` bytes each) first, then the ``P`` scale parts, and pages are ``stride(0)`` bytes apart
  (``fp8_rows_to_pages`` builds it). The 2-D form is the paged form with ``P = 1``.
* bf16: ``[N, D]``, ``[pages, P, D]`` or ``[pages, P, 1, D]`` (any page and row strides).

Tiling: one program owns one query row, ``block_h`` heads (all heads sharing the key tile, so a
key row is gathered and dequantized once per head group) and one split of the concatenated list.
It walks the list ``block_n`` rows at a time: gather the rows, dequantize FP8 -> bf16 in registers,
``S = Q K^T`` and ``O += P K`` on the tensor cores, online softmax in the exp2 domain. With one
split the program applies the sink and writes bf16 output directly; with several (small batches,
long lists) each split writes an fp32 partial ``(o / l, log2 l + m)`` and a combine kernel merges
them.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

__all__ = [
    "SparseMQA",
    "TileConfig",
    "flops_and_bytes",
    "fp8_page_bytes",
    "fp8_rows_to_pages",
]

LOG2E = 1.4426950408889634
ROPE_DIM = 64  # the RoPE channels are exactly the last 64-channel block of a row
# Integer dequant modes produce k * 2^-KSHIFT (keeps the per-row factor 2^(s-127+120-KSHIFT) a
# normal float for every scale byte s <= 194); the kernel multiplies it back into the logit
# scale and the output.
KSHIFT = 60
_TILE_TO_SPLIT_COST = 25.0  # see SparseMQA.plan
# Kernels may only read globals that are constexpr.
_LOG2E = tl.constexpr(LOG2E)
_LN2 = tl.constexpr(0.6931471805599453)
_KSHIFT = tl.constexpr(KSHIFT)
_UNSHIFT = tl.constexpr(2.0**-KSHIFT)
# Dequant mode 3, 4 e4m3 bytes ($2) -> 4 bf16 ($0, $1) times the bf16x2 scales ($3, $4): spread
# bytes into 16-bit lanes, shift the 7 magnitude bits under the bf16 exponent/mantissa (the value
# becomes |x| * 2^-120, denormals included), move the sign from bit 11 to bit 15 with one
# multiply-add (0x800 * 15 + 0x800 = 0x8000, no carry out of the lane), then one bf16x2 multiply.
_DEQUANT_PTX = tl.constexpr(
    "{ .reg .b32 lo, hi, sg;\n"
    "prmt.b32 lo, $2, 0, 0x4140;\n"
    "prmt.b32 hi, $2, 0, 0x4342;\n"
    "shl.b32 lo, lo, 4;\n"
    "shl.b32 hi, hi, 4;\n"
    "and.b32 sg, lo, 0x08000800;\n"
    "mad.lo.u32 lo, sg, 15, lo;\n"
    "and.b32 sg, hi, 0x08000800;\n"
    "mad.lo.u32 hi, sg, 15, hi;\n"
    "mul.rn.bf16x2 $0, lo, $3;\n"
    "mul.rn.bf16x2 $1, hi, $4; }"
)


def fp8_page_bytes(page_size: int, head_dim: int = 512) -> int:
    """Bytes of one FlashMLA page of ``page_size`` rows, padded to a multiple of 576 as FlashMLA's
    own packer does."""
    nope = head_dim - ROPE_DIM
    raw = page_size * (nope + 2 * ROPE_DIM + nope // 64 + 1)
    return -(-raw // 576) * 576


def fp8_rows_to_pages(rows: torch.Tensor, page_size: int, head_dim: int = 512) -> torch.Tensor:
    """uint8 ``[N, row_bytes]`` rows (``ref.kv_layout.pack_fp8_rows``) -> FlashMLA pages, viewed
    ``[pages, page_size, 1, row_bytes]`` as FlashMLA takes them (N is padded with zero rows)."""
    data = head_dim - ROPE_DIM + 2 * ROPE_DIM
    row_bytes = rows.shape[1]
    n_pages = -(-rows.shape[0] // page_size)
    padded = rows.new_zeros(n_pages * page_size, row_bytes)
    padded[: rows.shape[0]] = rows
    padded = padded.view(n_pages, page_size, row_bytes)
    buf = rows.new_zeros(n_pages, fp8_page_bytes(page_size, head_dim))
    buf[:, : page_size * data] = padded[:, :, :data].reshape(n_pages, -1)
    buf[:, page_size * data : page_size * row_bytes] = padded[:, :, data:].reshape(n_pages, -1)
    return buf[:, : page_size * row_bytes].view(n_pages, page_size, 1, row_bytes)


@dataclass(frozen=True)
class TileConfig:
    """Launch shape. ``dequant``: 0 = the compiler's e4m3 -> fp32 conversion, 1 = integer bit
    placement into fp32, 2 = the same into bf16, 3 = the same as packed PTX (GPU only). 1-3
    support scale bytes <= 194, i.e. 64-channel blocks with amax < 448 * 2^67. ``prefetch``:
    0 = none, 1 = each tile's index list one tile ahead, 2 = also its rows (registers)."""

    block_h: int = 64
    block_n: int = 64
    num_warps: int = 8
    num_stages: int = 1
    dequant: int = 3
    prefetch: int = 0


@triton.jit
def _kv_load(
    cache,
    idx,
    page_size,
    page_stride,
    row_stride,
    D: tl.constexpr,
    NOPE_BLOCKS: tl.constexpr,
    FP8: tl.constexpr,
    BN: tl.constexpr,
):
    """Gather rows ``idx`` [BN] (-1 = none, read as zeros) of a cache. FP8 -> (e4m3 bytes
    [BN, D/64, 64] with the RoPE block left 0, scale bytes [BN, D/64], RoPE [BN, 64] bf16);
    bf16 -> the keys [BN, D] three times (no dequant)."""
    valid = idx >= 0
    i = tl.where(valid, idx, 0)
    page = i // page_size  # int32: a 64-bit division is a subroutine call per row
    slot = i - page * page_size
    base = page.to(tl.int64) * page_stride
    if FP8:
        NBLK: tl.constexpr = D // 64
        DATA: tl.constexpr = NOPE_BLOCKS * 64 + 2 * 64
        blk = tl.arange(0, NBLK)
        off = blk[:, None] * 64 + tl.arange(0, 64)[None, :]  # [NBLK, 64]
        row = base + slot * DATA  # [BN] byte offset of the nope+RoPE part
        is_nope = (blk < NOPE_BLOCKS)[None, :, None]  # [1, NBLK, 1]
        nope_at = cache + row[:, None, None] + off[None, :, :]
        raw = tl.load(nope_at, mask=valid[:, None, None] & is_nope, other=0)
        scale_at = cache + base + page_size * DATA + slot * (NOPE_BLOCKS + 1)
        sbyte = tl.load(
            scale_at[:, None] + blk[None, :],
            mask=valid[:, None] & (blk < NOPE_BLOCKS)[None, :],
            other=127,
        )
        rope_at = (cache + row + NOPE_BLOCKS * 64).to(tl.pointer_type(tl.bfloat16))
        rope = tl.load(rope_at[:, None] + tl.arange(0, 64)[None, :], mask=valid[:, None], other=0.0)
        return raw, sbyte, rope
    else:
        at = cache + base + slot * row_stride
        k = tl.load(at[:, None] + tl.arange(0, D)[None, :], mask=valid[:, None], other=0.0)
        return k, k, k


@triton.jit
def _kv_dequant(
    raw,
    sbyte,
    rope,
    D: tl.constexpr,
    NOPE_BLOCKS: tl.constexpr,
    FP8: tl.constexpr,
    DEQUANT: tl.constexpr,
    BN: tl.constexpr,
):
    """``_kv_load``'s tile -> keys [BN, D] bf16 (times 2^-KSHIFT for dequant modes 1-3)."""
    if not FP8:
        return raw  # bf16 rows: nothing to dequantize
    else:
        is_nope = (tl.arange(0, D // 64) < NOPE_BLOCKS)[None, :, None]  # [1, NBLK, 1]
        sbyte = sbyte.to(tl.uint32)
        if DEQUANT == 0:
            scale = (sbyte << 23).to(tl.float32, bitcast=True)  # 2^(s-127)
            x = raw.to(tl.float8e4nv, bitcast=True).to(tl.float32)
            nope = (x * scale[:, :, None]).to(tl.bfloat16)
        elif DEQUANT == 1:
            # e4m3 bits placed into an fp32 = |x| * 2^-120 (denormals too), sign on top.
            scale = ((sbyte + 120 - _KSHIFT) << 23).to(tl.float32, bitcast=True)
            r = raw.to(tl.uint32)
            x = (((r & 0x7F) << 20) | ((r & 0x80) << 24)).to(tl.float32, bitcast=True)
            nope = (x * scale[:, :, None]).to(tl.bfloat16)
        elif DEQUANT == 2:
            scale = ((sbyte + 120 - _KSHIFT) << 7).to(tl.uint16).to(tl.bfloat16, bitcast=True)
            r = raw.to(tl.uint16)
            x = (((r & 0x7F) << 4) | ((r & 0x80) << 8)).to(tl.bfloat16, bitcast=True)
            nope = x * scale[:, :, None]
        else:
            scale = ((sbyte + 120 - _KSHIFT) << 7).to(tl.uint16).to(tl.bfloat16, bitcast=True)
            nope = tl.inline_asm_elementwise(
                _DEQUANT_PTX,
                "=r,=r,r,r,r",
                [raw, tl.broadcast_to(scale[:, :, None], raw.shape)],
                dtype=tl.bfloat16,
                is_pure=True,
                pack=4,
            )
        if DEQUANT != 0:
            rope = (rope.to(tl.float32) * _UNSHIFT).to(tl.bfloat16)
        k = tl.where(is_nope, nope, rope[:, None, :])  # [BN, NBLK, 64]: RoPE is the last block
        return tl.reshape(k, (BN, D))


@triton.jit
def _softmax_step(q, m, l, acc, k, valid, qk_scale, DOT_T: tl.constexpr):
    """One key tile ``k`` [BN, D] (``valid`` [BN]) of the online softmax, exp2 domain."""
    k = k.to(DOT_T)
    logits = tl.dot(q, tl.trans(k)) * qk_scale  # [BH, BN]
    logits = tl.where(valid[None, :], logits, float("-inf"))
    m_new = tl.maximum(m, tl.max(logits, 1))
    alpha = tl.exp2(m - m_new)
    p = tl.exp2(logits - m_new[:, None])
    l = l * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(DOT_T), k)
    return m_new, l, acc


@triton.jit
def _attend_list(
    q,
    m,
    l,
    acc,
    cache,
    idx_row,
    start,
    end,
    page_size,
    page_stride,
    row_stride,
    qk_scale,
    D: tl.constexpr,
    NOPE_BLOCKS: tl.constexpr,
    FP8: tl.constexpr,
    DEQUANT: tl.constexpr,
    BN: tl.constexpr,
    PREFETCH: tl.constexpr,
    DOT_T: tl.constexpr,
):
    """Online softmax of ``q`` [BH, D] over list positions ``start .. end`` of one list.
    ``PREFETCH`` 1 loads each tile's indices one tile ahead, 2 also gathers its rows one tile
    ahead (indices two ahead), so the loads overlap the previous tile's math."""
    pos = start + tl.arange(0, BN)
    idx = tl.load(idx_row + pos, mask=pos < end, other=-1)  # [BN]
    if PREFETCH == 0:
        for s in range(start, end, BN):
            pos = s + tl.arange(0, BN)
            idx = tl.load(idx_row + pos, mask=pos < end, other=-1)
            raw, sb, rope = _kv_load(
                cache, idx, page_size, page_stride, row_stride, D, NOPE_BLOCKS, FP8, BN
            )
            k = _kv_dequant(raw, sb, rope, D, NOPE_BLOCKS, FP8, DEQUANT, BN)
            m, l, acc = _softmax_step(q, m, l, acc, k, idx >= 0, qk_scale, DOT_T)
    elif PREFETCH == 1:
        for s in range(start, end, BN):
            pos = s + BN + tl.arange(0, BN)
            idx_next = tl.load(idx_row + pos, mask=pos < end, other=-1)
            raw, sb, rope = _kv_load(
                cache, idx, page_size, page_stride, row_stride, D, NOPE_BLOCKS, FP8, BN
            )
            k = _kv_dequant(raw, sb, rope, D, NOPE_BLOCKS, FP8, DEQUANT, BN)
            m, l, acc = _softmax_step(q, m, l, acc, k, idx >= 0, qk_scale, DOT_T)
            idx = idx_next
    else:
        raw, sb, rope = _kv_load(
            cache, idx, page_size, page_stride, row_stride, D, NOPE_BLOCKS, FP8, BN
        )
        pos = start + BN + tl.arange(0, BN)
        idx_next = tl.load(idx_row + pos, mask=pos < end, other=-1)
        for s in range(start, end, BN):
            pos = s + 2 * BN + tl.arange(0, BN)
            idx_after = tl.load(idx_row + pos, mask=pos < end, other=-1)
            next_raw, next_sb, next_rope = _kv_load(
                cache, idx_next, page_size, page_stride, row_stride, D, NOPE_BLOCKS, FP8, BN
            )
            k = _kv_dequant(raw, sb, rope, D, NOPE_BLOCKS, FP8, DEQUANT, BN)
            m, l, acc = _softmax_step(q, m, l, acc, k, idx >= 0, qk_scale, DOT_T)
            idx, idx_next = idx_next, idx_after
            raw, sb, rope = next_raw, next_sb, next_rope
    return m, l, acc


@triton.jit
def _sparse_mqa_kernel(
    q_ptr,
    stride_qt,
    stride_qh,
    kv,
    idx_ptr,
    stride_it,
    len_ptr,
    page_size,
    page_stride,
    row_stride,
    K,
    xkv,
    xidx_ptr,
    stride_xt,
    xlen_ptr,
    xpage_size,
    xpage_stride,
    xrow_stride,
    K2,
    sink_ptr,
    qk_scale,
    out_scale,
    out_ptr,
    stride_ot,
    stride_oh,
    lse_ptr,
    part_o_ptr,
    part_lse_ptr,
    H,
    chunk,
    num_splits,
    D: tl.constexpr,
    NOPE_BLOCKS: tl.constexpr,
    BH: tl.constexpr,
    BN: tl.constexpr,
    FP8: tl.constexpr,
    DEQUANT: tl.constexpr,
    HAS_EXTRA: tl.constexpr,
    HAS_LEN: tl.constexpr,
    HAS_XLEN: tl.constexpr,
    SPLIT: tl.constexpr,
    WRITE_LSE: tl.constexpr,
    PREFETCH: tl.constexpr,
    DOT_T: tl.constexpr,
):
    pid = tl.program_id(0)
    split = tl.program_id(1)
    head_blocks = tl.cdiv(H, BH)
    t = pid // head_blocks  # adjacent programs share a query row (and so its key rows in L2)
    heads = (pid % head_blocks) * BH + tl.arange(0, BH)
    hmask = heads < H
    dims = tl.arange(0, D)
    q = tl.load(
        q_ptr + t.to(tl.int64) * stride_qt + heads[:, None] * stride_qh + dims[None, :],
        mask=hmask[:, None],
        other=0.0,
    ).to(DOT_T)  # [BH, D]
    # A finite floor keeps exp2(m - m_new) defined while every logit so far is -inf.
    m = tl.full([BH], -1.0e30, tl.float32)
    l = tl.zeros([BH], tl.float32)
    acc = tl.zeros([BH, D], tl.float32)
    lo = split * chunk
    hi = lo + chunk
    n_main = K
    if HAS_LEN:
        n_main = tl.minimum(n_main, tl.load(len_ptr + t))
    m, l, acc = _attend_list(
        q,
        m,
        l,
        acc,
        kv,
        idx_ptr + t.to(tl.int64) * stride_it,
        lo,
        tl.minimum(hi, n_main),
        page_size,
        page_stride,
        row_stride,
        qk_scale,
        D,
        NOPE_BLOCKS,
        FP8,
        DEQUANT,
        BN,
        PREFETCH,
        DOT_T,
    )
    if HAS_EXTRA:
        n_extra = K2
        if HAS_XLEN:
            n_extra = tl.minimum(n_extra, tl.load(xlen_ptr + t))
        m, l, acc = _attend_list(
            q,
            m,
            l,
            acc,
            xkv,
            xidx_ptr + t.to(tl.int64) * stride_xt,
            tl.maximum(lo - K, 0),
            tl.minimum(hi - K, n_extra),
            xpage_size,
            xpage_stride,
            xrow_stride,
            qk_scale,
            D,
            NOPE_BLOCKS,
            FP8,
            DEQUANT,
            BN,
            PREFETCH,
            DOT_T,
        )
    if SPLIT:
        # l is 0 (no valid row, acc = 0) or >= 1 (the max logit contributes exp2(0)).
        o = acc * (out_scale / tl.maximum(l, 1.0))[:, None]
        at = (t * num_splits + split) * H + heads  # [BH] rows of [T, S, H]
        tl.store(part_o_ptr + at.to(tl.int64)[:, None] * D + dims[None, :], o, mask=hmask[:, None])
        tl.store(part_lse_ptr + at, m + tl.log2(l), mask=hmask)
    else:
        sink = tl.load(sink_ptr + heads, mask=hmask, other=0.0) * _LOG2E
        o = acc * (out_scale / (l + tl.exp2(sink - m)))[:, None]
        tl.store(
            out_ptr + t.to(tl.int64) * stride_ot + heads[:, None] * stride_oh + dims[None, :],
            o.to(tl.bfloat16),
            mask=hmask[:, None],
        )
        if WRITE_LSE:
            tl.store(lse_ptr + t * H + heads, (m + tl.log2(l)) * _LN2, mask=hmask)


@triton.jit
def _combine_kernel(
    part_o_ptr,
    part_lse_ptr,
    sink_ptr,
    out_ptr,
    stride_ot,
    stride_oh,
    lse_ptr,
    H,
    num_splits,
    D: tl.constexpr,
    CH: tl.constexpr,
    CD: tl.constexpr,
    BS: tl.constexpr,
    WRITE_LSE: tl.constexpr,
):
    t = tl.program_id(0)
    heads = tl.program_id(1) * CH + tl.arange(0, CH)
    hmask = heads < H
    dims = tl.program_id(2) * CD + tl.arange(0, CD)
    splits = tl.arange(0, BS)
    first = t * num_splits * H
    lse = tl.load(
        part_lse_ptr + first + splits[:, None] * H + heads[None, :],
        mask=(splits < num_splits)[:, None] & hmask[None, :],
        other=float("-inf"),
    )  # [BS, CH], log2 domain
    top = tl.max(lse, 0)
    top = tl.where(top == float("-inf"), 0.0, top)  # all splits empty: weights 0, output 0
    total = tl.sum(tl.exp2(lse - top[None, :]), 0)  # [CH]
    acc = tl.zeros([CH, CD], tl.float32)
    for s in range(num_splits):
        at = first + s * H + heads
        w = tl.exp2(tl.load(part_lse_ptr + at, mask=hmask, other=float("-inf")) - top)
        o = tl.load(part_o_ptr + at.to(tl.int64)[:, None] * D + dims[None, :], mask=hmask[:, None])
        acc += w[:, None] * o
    sink = tl.load(sink_ptr + heads, mask=hmask, other=0.0) * _LOG2E
    o = acc / (total + tl.exp2(sink - top))[:, None]
    tl.store(
        out_ptr + t.to(tl.int64) * stride_ot + heads[:, None] * stride_oh + dims[None, :],
        o.to(tl.bfloat16),
        mask=hmask[:, None],
    )
    if WRITE_LSE:  # noqa: SIM102 - WRITE_LSE is a compile-time switch
        if tl.program_id(2) == 0:
            tl.store(lse_ptr + t * H + heads, (top + tl.log2(total)) * _LN2, mask=hmask)


def _cache_geometry(cache: torch.Tensor) -> tuple[torch.Tensor, int, int, int]:
    """-> (cache with a 1-byte or bf16 element type, page size, page stride, row stride), strides
    in elements. 2-D caches are one row per index (page size 1)."""
    if cache.dtype != torch.bfloat16 and cache.dtype != torch.uint8:
        cache = cache.view(torch.uint8)  # float8 views of the same bytes
    if cache.dim() == 2:
        return cache, 1, cache.stride(0), cache.stride(0)
    return cache, cache.shape[1], cache.stride(0), cache.stride(1)


def _flat_indices(indices: torch.Tensor) -> torch.Tensor:
    """[T, K] or FlashMLA's [B, S_q, K] -> [T, K] (a view)."""
    return indices.flatten(0, -2) if indices.dim() == 3 else indices


class SparseMQA:
    """Plan/run wrapper (FlashInfer style) of the sparse MQA kernels.

    ``plan()`` does the host work of a batch once (split count, grids, workspace); ``run()`` only
    launches, so it can be captured in a CUDA graph and replayed with new values in the same
    tensors. One plan serves every layer of a kind in a step.

    Example::

        attn = SparseMQA(num_heads=64, head_dim=512, kv_fp8=True, device="cuda")
        attn.plan(num_tokens=T, topk=128, extra_topk=512)
        for layer in layers:
            o = attn.run(q, swa, swa_idx, sink, scale, extra_kv=c4, extra_indices=c4_idx)
    """

    def __init__(
        self,
        num_heads: int,
        head_dim: int = 512,
        *,
        kv_fp8: bool = True,
        device: torch.device | str = "cuda",
        config: TileConfig | None = None,
        num_sms: int | None = None,
    ):
        if head_dim % 64 or (head_dim // 64) & (head_dim // 64 - 1):
            raise ValueError(f"head_dim {head_dim} must be 64 times a power of 2")
        if kv_fp8 and head_dim < 2 * ROPE_DIM:
            raise ValueError(f"FP8 rows need nope channels: head_dim {head_dim} <= {ROPE_DIM}")
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.kv_fp8 = kv_fp8
        self.device = torch.device(device)
        cfg = config or TileConfig()
        block_h = max(16, min(cfg.block_h, triton.next_power_of_2(num_heads)))
        dequant = cfg.dequant if kv_fp8 else 0
        if self.device.type != "cuda":
            dequant = min(dequant, 1)  # the interpreter has no PTX and no bf16 arithmetic
        self.config = dataclasses.replace(cfg, block_h=block_h, dequant=dequant)
        if num_sms is None:
            num_sms = (
                torch.cuda.get_device_properties(self.device).multi_processor_count
                if self.device.type == "cuda"
                else 132
            )
        self.num_sms = num_sms

    def plan(
        self,
        num_tokens: int,
        topk: int,
        extra_topk: int = 0,
        *,
        num_splits: int | None = None,
        return_lse: bool = False,
    ) -> None:
        """Host work for a batch of ``num_tokens`` query rows with lists of ``topk`` (main) and
        ``extra_topk`` (extra cache, 0 = none) slots. ``num_splits`` overrides the heuristic:
        split the lists until the grid covers the SMs once."""
        cfg = self.config
        self.num_tokens, self.topk, self.extra_topk = num_tokens, topk, extra_topk
        head_blocks = -(-self.num_heads // cfg.block_h)
        tiles = max(1, -(-(topk + extra_topk) // cfg.block_n))
        if num_splits is None:
            # One program per SM (255 registers a thread), one wave: units * splits <= SMs.
            # Each split adds a fp32 [H, D] partial to write and combine:
            # time ~ tile_cost * tiles / splits + split_cost * splits, minimal at
            # sqrt(tiles * tile_cost / split_cost); the ratio is ~25 on an H100 (1M-context HCA
            # at batch 1: 130 splits 53 us, 65 splits 40 us, 33 splits 47 us).
            num_splits = min(
                self.num_sms // max(1, num_tokens * head_blocks),
                max(1, round(math.sqrt(_TILE_TO_SPLIT_COST * tiles))),
            )
        num_splits = max(1, min(num_splits, tiles))
        self.chunk = -(-tiles // num_splits) * cfg.block_n
        self.num_splits = -(-max(1, topk + extra_topk) // self.chunk)
        self.grid = (max(1, num_tokens) * head_blocks, self.num_splits)
        dev = self.device
        h, d = self.num_heads, self.head_dim
        self.out = torch.empty(num_tokens, h, d, dtype=torch.bfloat16, device=dev)
        self.lse = torch.empty(num_tokens, h, device=dev) if return_lse else None
        if self.num_splits > 1:
            self.part_o = torch.empty(num_tokens, self.num_splits, h, d, device=dev)
            self.part_lse = torch.empty(num_tokens, self.num_splits, h, device=dev)
            # Enough combine programs to spread the partial reads over the SMs.
            self.comb_h = 16 if num_tokens * -(-h // 16) * (d // 64) >= self.num_sms else 4
            self.comb_d = 64
            self.comb_grid = (max(1, num_tokens), -(-h // self.comb_h), d // self.comb_d)
        else:
            self.part_o = self.part_lse = None

    def run(
        self,
        q: torch.Tensor,
        kv: torch.Tensor,
        indices: torch.Tensor,
        sink: torch.Tensor,
        scale: float,
        *,
        extra_kv: torch.Tensor | None = None,
        extra_indices: torch.Tensor | None = None,
        lengths: torch.Tensor | None = None,
        extra_lengths: torch.Tensor | None = None,
        out: torch.Tensor | None = None,
        lse: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``q`` [T, H, D] bf16 (last dim contiguous); ``kv`` / ``extra_kv`` caches (module
        docstring); ``indices`` [T, topk] / ``extra_indices`` [T, extra_topk] int32 rows (-1 =
        none; FlashMLA's [B, S_q, K] also accepted); ``lengths`` / ``extra_lengths`` [T] int32
        valid prefix of each list (optional); ``sink`` [H] fp32; ``scale`` the logit scale.
        Writes and returns ``out`` [T, H, D] bf16 (default: the planned buffer, overwritten by
        the next run); the natural-log LSE goes to ``lse`` [T, H] (default: the planned one,
        when planned with ``return_lse``)."""
        cfg = self.config
        out = self.out if out is None else out
        lse = self.lse if lse is None else lse
        indices = _flat_indices(indices)
        kv, page, page_stride, row_stride = _cache_geometry(kv)
        has_extra = extra_kv is not None
        if has_extra:
            extra_indices = _flat_indices(extra_indices)
            xkv, xpage, xpage_stride, xrow_stride = _cache_geometry(extra_kv)
        else:
            xkv, extra_indices, xpage, xpage_stride, xrow_stride = kv, indices, 1, 0, 0
        shift = 2.0**KSHIFT if cfg.dequant else 1.0
        split = self.num_splits > 1
        d = self.head_dim
        _sparse_mqa_kernel[self.grid](
            q,
            q.stride(0),
            q.stride(1),
            kv,
            indices,
            indices.stride(0),
            lengths if lengths is not None else indices,
            page,
            page_stride,
            row_stride,
            self.topk,
            xkv,
            extra_indices,
            extra_indices.stride(0),
            extra_lengths if extra_lengths is not None else indices,
            xpage,
            xpage_stride,
            xrow_stride,
            self.extra_topk,
            sink,
            scale * LOG2E * shift,
            shift,
            out,
            out.stride(0),
            out.stride(1),
            lse if lse is not None else sink,
            self.part_o if split else out,
            self.part_lse if split else sink,
            self.num_heads,
            self.chunk,
            self.num_splits,
            D=d,
            NOPE_BLOCKS=(d - ROPE_DIM) // 64,
            BH=cfg.block_h,
            BN=cfg.block_n,
            FP8=self.kv_fp8,
            DEQUANT=cfg.dequant,
            HAS_EXTRA=has_extra,
            HAS_LEN=lengths is not None,
            HAS_XLEN=has_extra and extra_lengths is not None,
            SPLIT=split,
            WRITE_LSE=lse is not None,
            PREFETCH=cfg.prefetch,
            # The interpreter multiplies bf16 as raw uint16: give it fp32 operands.
            DOT_T=tl.bfloat16 if q.is_cuda else tl.float32,
            num_warps=cfg.num_warps,
            num_stages=cfg.num_stages,
        )
        if split:
            _combine_kernel[self.comb_grid](
                self.part_o,
                self.part_lse,
                sink,
                out,
                out.stride(0),
                out.stride(1),
                lse if lse is not None else sink,
                self.num_heads,
                self.num_splits,
                D=d,
                CH=self.comb_h,
                CD=self.comb_d,
                BS=triton.next_power_of_2(self.num_splits),
                WRITE_LSE=lse is not None,
                num_warps=4,
            )
        return out


def flops_and_bytes(
    num_tokens: int, num_heads: int, keys: int, head_dim: int = 512, row_bytes: int = 584
) -> tuple[float, float]:
    """FlashMLA's cost model of one call: 2 MACs per (head, key, channel) for QK and PV; bytes =
    key rows + int32 indices + bf16 q and o."""
    flops = 2.0 * num_tokens * num_heads * keys * (head_dim + head_dim)
    q_o = 2 * num_tokens * num_heads * head_dim * 2
    return flops, float(num_tokens * keys * (row_bytes + 4) + q_o)
