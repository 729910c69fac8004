"""Triton kernels behind ``kernels.attention.SparseMQA`` (layouts and math: see that module).

``sparse_mqa_fwd``: grid (query rows x head blocks, splits). A program loads its ``[BH, D]``
query tile once, walks its part of the main list then of the extra list ``BN`` rows at a time
(``_attend_list``: ``_kv_load`` gathers, ``_kv_dequant`` turns e4m3 + UE8M0 into bf16 in
registers, ``_softmax_step`` does ``S = Q K^T``, the online softmax in the exp2 domain and
``O += P K``), and writes either the bf16 output (sink applied) or an fp32 partial
``(o / l, m + log2 l)`` (``_store_output``).
``sparse_mqa_combine`` merges the partials of the splits of each query row and applies the sink.
"""

import triton
import triton.language as tl

__all__ = ["KSHIFT", "LOG2E", "ROPE_DIM", "sparse_mqa_combine", "sparse_mqa_fwd"]

LOG2E = 1.4426950408889634
ROPE_DIM = 64  # the RoPE channels are exactly the last 64-channel block of a row
# Integer dequant modes produce k * 2^-KSHIFT (keeps the per-row factor 2^(s-127+120-KSHIFT) a
# normal float for every scale byte s <= 194); the kernel multiplies it back into the logit
# scale and the output.
KSHIFT = 60
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
def _store_output(m, l, acc, t, split, heads, hmask, dims, sink_ptr, out_scale, out_ptr,
                  stride_ot, stride_oh, lse_ptr, part_o_ptr, part_lse_ptr, H, num_splits,
                  D: tl.constexpr, SPLIT: tl.constexpr, WRITE_LSE: tl.constexpr):  # fmt: skip
    """Query row ``t``'s heads ``heads`` [BH] from the softmax state: with one split the bf16
    output (sink applied) and optionally the natural-log LSE, else split ``split``'s fp32
    partial ``(o / l, m + log2 l)`` for ``sparse_mqa_combine``."""
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
def sparse_mqa_fwd(
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
    q_at = q_ptr + t.to(tl.int64) * stride_qt + heads[:, None] * stride_qh + dims[None, :]
    q = tl.load(q_at, mask=hmask[:, None], other=0.0).to(DOT_T)  # [BH, D]
    # A finite floor keeps exp2(m - m_new) defined while every logit so far is -inf.
    m = tl.full([BH], -1.0e30, tl.float32)
    l = tl.zeros([BH], tl.float32)
    acc = tl.zeros([BH, D], tl.float32)
    lo = split * chunk  # this split's positions of the concatenated list (main, then extra)
    hi = lo + chunk
    n_main = tl.minimum(K, tl.load(len_ptr + t)) if HAS_LEN else K
    m, l, acc = _attend_list(
        q, m, l, acc, kv, idx_ptr + t.to(tl.int64) * stride_it, lo, tl.minimum(hi, n_main),
        page_size, page_stride, row_stride, qk_scale, D, NOPE_BLOCKS, FP8, DEQUANT, BN, PREFETCH,
        DOT_T,
    )  # fmt: skip
    if HAS_EXTRA:  # extra position p is position K + p
        n_extra = tl.minimum(K2, tl.load(xlen_ptr + t)) if HAS_XLEN else K2
        m, l, acc = _attend_list(
            q, m, l, acc, xkv, xidx_ptr + t.to(tl.int64) * stride_xt, tl.maximum(lo - K, 0),
            tl.minimum(hi - K, n_extra), xpage_size, xpage_stride, xrow_stride, qk_scale, D,
            NOPE_BLOCKS, FP8, DEQUANT, BN, PREFETCH, DOT_T,
        )  # fmt: skip
    _store_output(
        m, l, acc, t, split, heads, hmask, dims, sink_ptr, out_scale, out_ptr, stride_ot,
        stride_oh, lse_ptr, part_o_ptr, part_lse_ptr, H, num_splits, D, SPLIT, WRITE_LSE,
    )  # fmt: skip


@triton.jit
def sparse_mqa_combine(
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
