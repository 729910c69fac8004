"""Exact top-k of score rows held in registers: ``kernels.indexer``'s one-program select (same
picks, same order) for rows of at most ``topk_shapes.MAX_ROW`` (16384) entries.

Contract (``IndexerTopK``'s select): for query ``t`` with ``vis = (pos + 1) // RATIO`` visible
entries of its fp32 score row, the ``k = min(K, vis)`` largest by the signed order of their int32
image (``indexer._order_key``: NaNs included, -0.0 below +0.0), ties taken by entry index,
written in entry order to ``ids[t, :k]`` (and their key rows through the block table), -1 past
them, ``k`` to ``lengths[t]``.

Why: the radix select re-reads a row per pass and pays ``tl.histogram``'s ballots for every entry
of every pass (sm_90 SASS: ~2.9 warp instructions per entry per pass, four passes and a write
pass of ~3.5; 148 registers, one program per SM: ~110K warp instructions per 8K-entry row).
Here a program loads its row once into registers (``ROW / (32 * warps)`` per thread) and finds
the k-th largest order key by bisection on its 32 bits: per bit a compare and an add per entry
and one sum over the row (~0.13 warp instructions per entry and bit), stopping at the first
candidate with exactly ``k`` keys at or above it (Gaussian scores, k 512 of 4K-16K entries: ~19
of the 32 bits; ties at the k-th key run all 32). Rows with ``k == vis`` skip the search (every
visible entry is a pick), as the radix select does.

The picks are then written from the row reloaded (from L2), ``WCHUNK`` entries a step, so the
row's registers are free again (80 registers at 8K entries x 8 warps: three programs per SM).
With ``gt`` the keys above the threshold and ``eq`` those equal to it, of which the first
``need`` in entry order are picks, an entry's slot is ``cumsum(gt) + min(cumsum(eq), need)``:
one scan of ``gt + (eq << 16)`` (``gt`` counts stay below k, ``eq`` ones below 2^15).
"""

import triton
import triton.language as tl

from sglang_dsv4.kernels.indexer import _order_key, _pad_picks, _pick_base

__all__ = []

_INT_MIN = tl.constexpr(-2147483648)  # the order key at or below every score's


@triton.jit
def _bisect(key, k):
    """``(prefix, need)`` of :func:`_write_packed` for order keys ``key`` [ROW] (non-entries at
    INT_MIN): the k-th largest key and how many keys equal to it are picks. Bits ``v`` in the
    unsigned order (``v ^ INT_MIN`` is the signed key) are set from the top: a bit stays when at
    least ``k`` keys lie at or above the candidate. ``n_gt``, the keys above the final ``v``, is
    the count of the last candidate that failed (it was ``v + 1``: every bit below it stayed).
    A candidate ``c`` with exactly ``k`` keys at or above it ends the search: the picks are the
    keys above ``c - 1``, none equal to it."""
    v = tl.zeros([], tl.int32)
    n_gt = tl.zeros([], tl.int32)
    bit = tl.full([], _INT_MIN, tl.int32)
    go = True
    while go:
        c = v | bit
        n = tl.sum((key >= (c ^ _INT_MIN)).to(tl.int32))
        v = tl.where(n >= k, c, v)
        n_gt = tl.where(n >= k, n_gt, n)
        v = tl.where(n == k, c - 1, v)
        n_gt = tl.where(n == k, k, n_gt)
        bit = (bit >> 1) & 0x7FFFFFFF
        go = (bit != 0) & (n != k)
    return v ^ _INT_MIN, k - n_gt


@triton.jit
def _write_packed(src, vis, prefix, need, ids, rows, bt_row, id_base, EPB: tl.constexpr,
                  WCHUNK: tl.constexpr, WRITE_ROWS: tl.constexpr):  # fmt: skip
    """Entries ``0 .. vis-1`` above ``prefix`` and the first ``need`` equal to it, in entry order
    from slot 0 of ``ids`` as ``id_base + entry`` (and their rows through ``bt_row``),
    ``WCHUNK`` entries a step."""
    packed_before = tl.zeros([], tl.int32)  # gt + (eq << 16) of the entries before the step
    vis16 = tl.cdiv(vis, 16) * 16  # the load's mask in whole vectors (ld is a multiple of 16)
    for c0 in range(0, vis, WCHUNK):
        idx = c0 + tl.arange(0, WCHUNK)
        key = _order_key(tl.load(src + idx, idx < vis16, 0.0))
        m = idx < vis
        gt = (m & (key > prefix)).to(tl.int32)
        eq = (m & (key == prefix)).to(tl.int32)
        scan = packed_before + tl.cumsum(gt + (eq << 16), 0)
        rank = scan >> 16
        take = (gt != 0) | ((eq != 0) & (rank <= need))
        # -1: not a pick (one int32 the stores' layout converts, not pointers and masks)
        slot = tl.where(take, (scan & 0xFFFF) + tl.minimum(rank, need) - 1, -1)
        tl.store(ids + slot, idx + id_base, slot >= 0)
        if WRITE_ROWS:
            blk = tl.load(bt_row + idx // EPB, mask=slot >= 0, other=0)
            tl.store(rows + slot, blk * EPB + idx % EPB, slot >= 0)
        packed_before = tl.max(scan)  # the scan is non-decreasing: its last entry


@triton.jit(do_not_specialize=["bt_stride"])
def _rows_topk_kernel(
    logits_ptr, ld, qreq_ptr, pos_ptr, bt_ptr, bt_stride, ids_ptr, ids_ld, rows_ptr, len_ptr,
    base_ptr, K: tl.constexpr, RATIO: tl.constexpr, EPB: tl.constexpr, ROW: tl.constexpr,
    WCHUNK: tl.constexpr, KCHUNK: tl.constexpr, WRITE_ROWS: tl.constexpr, REBASE: tl.constexpr,
):  # fmt: skip
    """``ids`` / ``base_ptr`` / ``REBASE`` as ``indexer._topk_kernel``'s."""
    t = tl.program_id(0)
    vis = (tl.load(pos_ptr + t).to(tl.int32) + 1) // RATIO
    k = tl.minimum(vis, K)
    src = logits_ptr + t.to(tl.int64) * ld
    prefix = tl.full([], _INT_MIN, tl.int32)  # k == vis: every visible entry, no search
    need = vis
    if k < vis:
        e = tl.arange(0, ROW)
        x = tl.load(src + e, e < tl.cdiv(vis, 16) * 16, 0.0)
        prefix, need = _bisect(tl.where(e < vis, _order_key(x), _INT_MIN), k)
    req = tl.load(qreq_ptr + t)
    bt_row = bt_ptr + req.to(tl.int64) * bt_stride
    ids = ids_ptr + t.to(tl.int64) * ids_ld
    rows = rows_ptr + t.to(tl.int64) * K
    base = _pick_base(base_ptr, req, REBASE)
    _write_packed(src, vis, prefix, need, ids, rows, bt_row, base, EPB, WCHUNK, WRITE_ROWS)
    _pad_picks(ids, rows, k, K, KCHUNK, WRITE_ROWS)
    tl.store(len_ptr + t, k)
