"""Lightning indexer of c4 layers: scores over a request's compressed indexer keys, then top-k.

Twin: ``ref.indexer.index_scores`` + ``index_topk`` on the dequantized keys. For query ``t`` of
request ``b`` at position ``pos``, over entries ``s < (pos + 1) // 4`` (the causal bound):

    I[t, s] = scale_s * sum_h (w[t, h] H^-1/2) * ReLU(q[t, h] . k_s) Dh^-1/2

``k_s`` are the stored e4m3 values (FP8 keys: one power-of-2 ``scale_s`` per key, applied after
the sums, which is exact) or the dequantized e2m1 values (FP4 keys: per-32 scales applied before
the dot). Keys are addressed through the request's block table: entry ``s`` is key row
``block_table[b, s // 32] * 32 + s % 32`` (32 c4 entries per 128-token block), laid out by
``kv_store.IndexKeyLayout``. ``q`` is bf16 and must already carry RoPE; against keys stored
Hadamard-rotated, either ``q`` carries the rotation too or ``IndexerTopK(rotate=True)`` applies
it in the score kernel (``q S`` with ``S`` the +-1 Sylvester matrix, generated in registers, one
tensor-core dot per program; its ``Dh^-1/2`` goes into the head weights, since ReLU is positively
homogeneous): no separate rotation GEMM per layer. Over FP8 keys the (rotated, bf16-rounded)
queries are then rounded to e4m3 per head as ``IndexerExtend`` rounds them
(:func:`quantize_queries`), so a token's picks are the same function of its q in a prefill chunk
and in a decode step. The dots run on bf16 tensor cores with fp32 accumulation (e4m3 -> bf16 is
exact; decode is memory-bound: no FP8 MMA here).

Two launches: (1) scores into an fp32 workspace ``[T, max_keys]``, grid (queries, key splits),
each program striding over 64-key tiles of its query (decode spreads one query over the GPU);
(2) exact top-k per query by radix select on the order-preserving int32 image of the scores (four
8-bit histogram passes find the k-th largest value, a fifth pass writes every larger entry and
the first entries equal to it, in entry order): one program per query, or, for few queries over
many entries (decode at small batch; chosen by ``plan()`` from the shape), each query's entries
cut into ranges of one program each, a launch per pass (five), same picks in the same order.
Outputs: entry ids [T, topk] (``-1`` past the
``min(topk, visible)`` picks), optionally their key / entry rows, and the pick counts [T].
"""

import torch
import triton
import triton.language as tl

from sglang_dsv4.kernels.kv_store import IndexKeyLayout, e4m3_codes, pow2, ue8m0_exponent
from sglang_dsv4.kernels.topk_shapes import radix_chunk

__all__ = ["IndexerTopK", "logits_width"]


@triton.jit
def _rotate_q(q, dd, DOT_F32: tl.constexpr):
    """q S with S[i, j] = (-1)^popcount(i & j) (Dh <= 256), the unnormalized Sylvester Hadamard
    the keys were rotated by; the caller folds its Dh^-1/2 into the head weights. ``q`` [H, DH]
    -> fp32 [H, DH] (rounded to bf16 by the caller on the GPU)."""
    par = dd[:, None] & dd[None, :]
    par = par ^ (par >> 4)
    par = par ^ (par >> 2)
    par = par ^ (par >> 1)
    mat_t = tl.float32 if DOT_F32 else tl.bfloat16
    sylv = tl.where((par & 1) == 0, 1.0, -1.0).to(mat_t)  # [DH, DH], exact in bf16
    return tl.dot(q.to(mat_t), sylv)


@triton.jit
def quantize_queries(q, wh):
    """Query rows ``q`` [R, DH] as e4m3 with one power-of-2 scale per row (``2^ceil(log2(amax /
    448))``, round to nearest even: ``ref.quant.fp8_e4m3_fake_quant(q, block=DH)``), the scale
    moved into the row's head weight ``wh`` [R]: exact, ReLU being positively homogeneous and
    the scaling a power of 2. Integer rounding (``kv_store.e4m3_codes``): the same bits on the
    GPU and under the interpreter, whose fp8 casts truncate."""
    qf = q.to(tl.float32)
    e = ue8m0_exponent(tl.max(tl.abs(qf), axis=1), 8, 0x600000)  # [R]
    codes = e4m3_codes(qf * pow2(-e)[:, None])
    return codes.to(tl.uint8).to(tl.float8e4nv, bitcast=True), wh * pow2(e)


@triton.jit
def _load_keys(keys_ptr, dbase, sbase, valid, dd, BS: tl.constexpr, DH: tl.constexpr,
               FP4: tl.constexpr):  # fmt: skip
    """One tile of index keys, dequantized apart from a per-row factor: ``k`` [BS, DH] and
    ``kscale`` [BS] (FP8 keeps its fp32 row scale for after the dot; MXFP4's per-32 UE8M0 scales
    vary along DH, so they are applied here and ``kscale`` is 1). ``dbase`` / ``sbase`` [BS]:
    byte offsets of each row's data / scale part; invalid rows read as zeros."""
    if FP4:
        raw = tl.load(keys_ptr + dbase[:, None] + tl.arange(0, DH // 2)[None, :], valid[:, None], 0)
        nib = tl.reshape(tl.join(raw & 15, raw >> 4), [BS, DH]).to(tl.int32)
        e = (nib >> 1) & 3
        mag = tl.where(
            e == 0, 0.5 * (nib & 1), (1.0 + 0.5 * (nib & 1)) * (1 << tl.maximum(e - 1, 0))
        )
        val = tl.where(nib >= 8, -mag, mag)
        sexp = tl.load(
            keys_ptr + sbase[:, None] + tl.arange(0, DH // 32)[None, :], valid[:, None], 127
        )
        sc = ((sexp.to(tl.int32) & 0xFF) << 23).to(tl.float32, bitcast=True)  # 2^(byte - 127)
        k = tl.reshape(tl.reshape(val, [BS, DH // 32, 32]) * sc[:, :, None], [BS, DH])
        kscale = tl.full([BS], 1.0, tl.float32)
    else:
        raw = tl.load(keys_ptr + dbase[:, None] + dd[None, :], valid[:, None], 0)
        k = raw.to(tl.float8e4nv, bitcast=True)
        kscale = tl.load((keys_ptr + sbase).to(tl.pointer_type(tl.float32)), valid, 0.0)
    return k, kscale


@triton.jit(do_not_specialize=["bt_stride", "n_splits"])
def _logits_kernel(
    q_ptr,
    q_stride_t,
    q_stride_h,
    w_ptr,
    w_stride,
    keys_ptr,
    bt_ptr,
    bt_stride,
    qreq_ptr,
    pos_ptr,
    logits_ptr,
    ld,
    n_splits,
    H: tl.constexpr,
    DH: tl.constexpr,
    BS: tl.constexpr,
    EPB: tl.constexpr,
    RATIO: tl.constexpr,
    RPP: tl.constexpr,
    FP4: tl.constexpr,
    DOT_F32: tl.constexpr,
    ROTATE: tl.constexpr,
    Q_FP8: tl.constexpr,  # e4m3 queries (FP8 keys): rounded as the extend indexer rounds them
):
    t = tl.program_id(0)
    split = tl.program_id(1)
    b = tl.load(qreq_ptr + t).to(tl.int64)
    vis = (tl.load(pos_ptr + t).to(tl.int32) + 1) // RATIO
    hh = tl.arange(0, H)
    dd = tl.arange(0, DH)
    q = tl.load(q_ptr + t.to(tl.int64) * q_stride_t + hh[:, None] * q_stride_h + dd[None, :])
    wh = tl.load(w_ptr + t.to(tl.int64) * w_stride + hh).to(tl.float32) * (H**-0.5)
    if ROTATE:
        q = _rotate_q(q, dd, DOT_F32)
        wh = wh * (DH**-0.5)  # the Hadamard's normalization, moved from q into the weights
    # keys are the MMA's M side (64 per tile, from registers), heads its N side: the head sum
    # is then a row reduction inside each thread's accumulator fragment
    q = q.to(tl.float32) if DOT_F32 else q.to(tl.bfloat16)  # [H, DH], the rotation rounded
    if Q_FP8:  # e4m3 values through the bf16 MMA: exact products (memory-bound, no FP8 MMA)
        q, wh = quantize_queries(q, wh)
    q_t = tl.trans(q.to(tl.float32) if DOT_F32 else q.to(tl.bfloat16))  # [DH, H]
    DATA: tl.constexpr = DH // 2 if FP4 else DH
    SCALE: tl.constexpr = DH // 32 if FP4 else 4
    PAGE: tl.constexpr = RPP * (DATA + SCALE)
    out_row = logits_ptr + t.to(tl.int64) * ld
    for tile in range(split, tl.cdiv(vis, BS), n_splits):
        i = tile * BS + tl.arange(0, BS)
        valid = i < vis
        blk = tl.load(bt_ptr + b * bt_stride + i // EPB, mask=valid, other=0).to(tl.int64)
        row = blk * EPB + i % EPB
        kpage = row // RPP
        kslot = row - kpage * RPP
        dbase = kpage * PAGE + kslot * DATA
        sbase = kpage * PAGE + RPP * DATA + kslot * SCALE
        k, kscale = _load_keys(keys_ptr, dbase, sbase, valid, dd, BS, DH, FP4)
        k = k.to(tl.float32) if DOT_F32 else k.to(tl.bfloat16)
        s = tl.dot(k, q_t)  # [BS, H] fp32
        s = tl.maximum(s, 0.0) * (DH**-0.5)
        logit = tl.sum(s * wh[None, :], axis=1) * kscale
        tl.store(out_row + i, logit, valid)


@triton.jit
def _order_key(x):
    """int32 whose signed order is the float order of ``x``."""
    u = x.to(tl.int32, bitcast=True)
    return tl.where(u < 0, u ^ 0x7FFFFFFF, u)


@triton.jit
def _chunk_keys(src, c0, hi, x, CHUNK: tl.constexpr):
    """The chunk of entries ``c0 ..`` (below ``hi``) whose scores ``x`` were loaded one step
    before: its mask, order keys, and the next chunk's scores, whose load is in flight while
    this chunk is counted (the passes are compute-bound; this hides the load's latency)."""
    idx = c0 + tl.arange(0, CHUNK)
    x_next = tl.load(src + idx + CHUNK, idx + CHUNK < hi, 0.0)
    return idx < hi, _order_key(x), x_next


@triton.jit
def _pass_hist(src, lo, hi, prefix, PASS: tl.constexpr, CHUNK: tl.constexpr):
    """Radix pass ``PASS``: 256-bin histogram of byte ``PASS`` (from the top) of the order keys
    of entries ``lo .. hi-1`` that match ``prefix`` in the bytes above it."""
    SHIFT: tl.constexpr = 24 - 8 * PASS
    hist = tl.zeros([256], tl.int32)
    x = tl.load(src + lo + tl.arange(0, CHUNK), lo + tl.arange(0, CHUNK) < hi, 0.0)
    for c0 in range(lo, hi, CHUNK):
        m, key, x = _chunk_keys(src, c0, hi, x, CHUNK)
        if PASS == 0:
            digit = ((key >> 24) & 0xFF) ^ 0x80  # the sign bit orders the top byte
            match = m
        else:
            digit = (key >> SHIFT) & 0xFF
            match = m & ((key >> (SHIFT + 8)) == (prefix >> (SHIFT + 8)))
        hist += tl.histogram(digit, 256, mask=match)
    return hist


@triton.jit
def _next_digit(hist, need, prefix, PASS: tl.constexpr):
    """From pass ``PASS``'s histogram [256]: the bin ``d`` holding the ``need``-th largest
    matching key, ``need`` less the entries in higher bins, ``prefix`` with byte ``PASS`` set."""
    bins = tl.arange(0, 256)
    at_least = tl.cumsum(hist, 0, reverse=True)  # entries with digit >= d
    d = tl.max(tl.where(at_least >= need, bins, 0))
    need -= tl.sum(tl.where(bins > d, hist, 0))
    byte = d
    if PASS == 0:
        byte = d ^ 0x80
    return d, need, prefix | (byte << (24 - 8 * PASS))


@triton.jit
def _write_picks(src, lo, hi, prefix, need, taken, equal_seen, ids, rows, bt_row, id_base,
                 EPB: tl.constexpr, CHUNK: tl.constexpr, WRITE_ROWS: tl.constexpr):  # fmt: skip
    """Entries ``lo .. hi-1`` above ``prefix`` (the k-th largest key), and those equal to it
    while fewer than ``need`` came before (``equal_seen`` of them before ``lo``), written in
    entry order from slot ``taken`` of ``ids`` as ``id_base + entry`` (and their rows through
    ``bt_row``)."""
    x = tl.load(src + lo + tl.arange(0, CHUNK), lo + tl.arange(0, CHUNK) < hi, 0.0)
    for c0 in range(lo, hi, CHUNK):
        m, key, x = _chunk_keys(src, c0, hi, x, CHUNK)
        idx = c0 + tl.arange(0, CHUNK)
        eq = (m & (key == prefix)).to(tl.int32)
        take = (m & (key > prefix)) | ((eq != 0) & (equal_seen + tl.cumsum(eq, 0) <= need))
        take_i = take.to(tl.int32)
        slot = taken + tl.cumsum(take_i, 0) - 1
        tl.store(ids + slot, idx + id_base, take)
        if WRITE_ROWS:
            blk = tl.load(bt_row + idx // EPB, mask=take, other=0)
            tl.store(rows + slot, blk * EPB + idx % EPB, take)
        taken += tl.sum(take_i)
        equal_seen += tl.sum(eq)


@triton.jit
def _pad_picks(ids, rows, k, K: tl.constexpr, KCHUNK: tl.constexpr, WRITE_ROWS: tl.constexpr):
    """-1 in slots ``k .. K-1``."""
    for c0 in tl.static_range(0, K, KCHUNK):
        j = c0 + tl.arange(0, KCHUNK)
        pad = (j >= k) & (j < K)
        tl.store(ids + j, tl.full([KCHUNK], -1, tl.int32), pad)
        if WRITE_ROWS:
            tl.store(rows + j, tl.full([KCHUNK], -1, tl.int32), pad)


@triton.jit
def _radix_threshold(src, vis, k, CHUNK: tl.constexpr):
    """``(prefix, need)`` for :func:`_write_picks` over entries ``0 .. vis-1``: the k-th largest
    order key and how many entries equal to it are picks (4 radix passes), or, when every
    visible entry is a pick (``k == vis``: half the queries of a 4K prompt at top-512), no pass:
    a prefix at or below every key and ``need = vis`` (H100, 2026-12-07: the extend select of
    a 4096-token prompt 257 -> 183 us). Stopping after the pass whose bin holds exactly the
    picks still needed was measured slower at 16K-64K prompts (+6-12 %): not done."""
    prefix = tl.full([], -2147483648, tl.int32)  # below or equal to every order key
    need = vis
    if k < vis:
        prefix = tl.zeros([], tl.int32)
        need = k
        for p in tl.static_range(4):
            hist = _pass_hist(src, 0, vis, prefix, p, CHUNK)
            _, need, prefix = _next_digit(hist, need, prefix, p)
    return prefix, need


@triton.jit
def _pick_base(base_ptr, req, REBASE: tl.constexpr):
    """What a query's picks are written as, ``base + entry id``: ``base_ptr[req]`` (the
    request's first row in FlashMLA's extend workspace, ``PickLists``) or 0 (entry ids)."""
    return tl.load(base_ptr + req) if REBASE else tl.zeros([], tl.int32)


@triton.jit(do_not_specialize=["bt_stride"])
def _topk_kernel(
    logits_ptr,
    ld,
    qreq_ptr,
    pos_ptr,
    bt_ptr,
    bt_stride,
    ids_ptr,
    ids_ld,
    rows_ptr,
    len_ptr,
    base_ptr,
    K: tl.constexpr,
    RATIO: tl.constexpr,
    EPB: tl.constexpr,
    CHUNK: tl.constexpr,
    KCHUNK: tl.constexpr,
    WRITE_ROWS: tl.constexpr,
    REBASE: tl.constexpr,
):
    """One query per program. ``ids`` rows ``ids_ld`` apart (``K``: the plan's buffer; wider:
    K columns of FlashMLA's index lists, written with ``base_ptr[request]`` added when
    ``REBASE``); ``rows`` K apart."""
    t = tl.program_id(0)
    vis = (tl.load(pos_ptr + t).to(tl.int32) + 1) // RATIO
    k = tl.minimum(vis, K)
    src = logits_ptr + t.to(tl.int64) * ld
    prefix, need = _radix_threshold(src, vis, k, CHUNK)
    req = tl.load(qreq_ptr + t)
    bt_row = bt_ptr + req.to(tl.int64) * bt_stride
    zero = tl.zeros([], tl.int32)
    ids = ids_ptr + t.to(tl.int64) * ids_ld
    rows = rows_ptr + t.to(tl.int64) * K
    _write_picks(src, 0, vis, prefix, need, zero, zero, ids, rows, bt_row,
                 _pick_base(base_ptr, req, REBASE), EPB, CHUNK, WRITE_ROWS)  # fmt: skip
    _pad_picks(ids, rows, k, K, KCHUNK, WRITE_ROWS)
    tl.store(len_ptr + t, k)


# --------------------------------------------------------------- top-k split over programs
# Few queries (decode at small batch): the one-program select above leaves the GPU idle while
# one SM walks ctx/4 scores five times (H100, 2026-11-22: 43 us at 32K tokens, 147 us at 128K,
# batch 1 or 32). Here each query's entries are cut into SPLITS contiguous ranges, one program
# each: every radix pass is a launch whose programs histogram their range into their own row of
# ``hist`` [T, 4, SPLITS, 256] (no atomics, nothing to zero: each row is rewritten every step),
# and every program re-derives the passes before it from those rows. The last launch writes
# each range's picks at its offset: the larger entries and the equal ones taken before it,
# known from the rows of the ranges before it. Same picks in the same (entry) order.


@triton.jit
def _split_prefix(hist, need, PASSES: tl.constexpr, SPLITS: tl.constexpr, SB: tl.constexpr):
    """The select's state after passes ``0 .. PASSES-1`` from the ranges' histograms ``hist``
    (one query's [4, SPLITS, 256]): ``prefix``, ``need``, and per range [SB] the entries above
    the prefix so far and those equal to it in the last pass's byte."""
    sp = tl.arange(0, SB)
    bins = tl.arange(0, 256)
    prefix = tl.zeros([], tl.int32)
    above = tl.zeros([SB], tl.int32)
    equal = tl.zeros([SB], tl.int32)
    for p in tl.static_range(PASSES):
        rows = tl.load(hist + (p * SPLITS + sp[:, None]) * 256 + bins[None, :],
                       mask=sp[:, None] < SPLITS, other=0)  # fmt: skip
        d, need, prefix = _next_digit(tl.sum(rows, 0), need, prefix, p)
        above += tl.sum(tl.where(bins[None, :] > d, rows, 0), 1)
        equal = tl.sum(tl.where(bins[None, :] == d, rows, 0), 1)
    return prefix, need, above, equal


@triton.jit
def _split_range(vis, s, SPLITS: tl.constexpr):
    """Entries ``lo .. hi-1`` of range ``s`` (contiguous: entry order is range order)."""
    span = tl.cdiv(vis, SPLITS)
    lo = tl.minimum(s * span, vis)
    return lo, tl.minimum(lo + span, vis)


@triton.jit
def _split_hist_kernel(
    logits_ptr, ld, pos_ptr, hist_ptr,
    K: tl.constexpr, RATIO: tl.constexpr, SPLITS: tl.constexpr, SB: tl.constexpr,
    PASS: tl.constexpr, CHUNK: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0)
    s = tl.program_id(1)
    vis = (tl.load(pos_ptr + t).to(tl.int32) + 1) // RATIO
    hist = hist_ptr + t.to(tl.int64) * (4 * SPLITS * 256)
    prefix, _, _, _ = _split_prefix(hist, tl.minimum(vis, K), PASS, SPLITS, SB)
    lo, hi = _split_range(vis, s, SPLITS)
    counts = _pass_hist(logits_ptr + t.to(tl.int64) * ld, lo, hi, prefix, PASS, CHUNK)
    tl.store(hist + (PASS * SPLITS + s) * 256 + tl.arange(0, 256), counts)


@triton.jit(do_not_specialize=["bt_stride"])
def _split_write_kernel(
    logits_ptr, ld, pos_ptr, hist_ptr, qreq_ptr, bt_ptr, bt_stride, ids_ptr, rows_ptr, len_ptr,
    K: tl.constexpr, RATIO: tl.constexpr, SPLITS: tl.constexpr, SB: tl.constexpr,
    EPB: tl.constexpr, CHUNK: tl.constexpr, KCHUNK: tl.constexpr, WRITE_ROWS: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0)
    s = tl.program_id(1)
    vis = (tl.load(pos_ptr + t).to(tl.int32) + 1) // RATIO
    k = tl.minimum(vis, K)
    hist = hist_ptr + t.to(tl.int64) * (4 * SPLITS * 256)
    prefix, need, above, equal = _split_prefix(hist, k, 4, SPLITS, SB)
    before = tl.arange(0, SB) < s  # the ranges before this one
    equal_seen = tl.sum(tl.where(before, equal, 0))
    taken = tl.sum(tl.where(before, above, 0)) + tl.minimum(equal_seen, need)
    lo, hi = _split_range(vis, s, SPLITS)
    bt_row = bt_ptr + tl.load(qreq_ptr + t).to(tl.int64) * bt_stride
    _write_picks(logits_ptr + t.to(tl.int64) * ld, lo, hi, prefix, need, taken, equal_seen,
                 ids_ptr + t * K, rows_ptr + t * K, bt_row, 0, EPB, CHUNK, WRITE_ROWS)  # fmt: skip
    if s == 0:
        _pad_picks(ids_ptr + t * K, rows_ptr + t * K, k, K, KCHUNK, WRITE_ROWS)
        tl.store(len_ptr + t, k)


def logits_width(max_keys: int) -> int:
    """Entries per fp32 score row of the workspace for queries seeing up to ``max_keys``: whole
    16-entry vectors (the selects load rows in them), at least one."""
    return max(16, -(-max_keys // 16) * 16)


class IndexerTopK:
    """Indexer scores + top-k of one c4 layer kind. ``plan()`` once per batch (sizes, grid,
    workspace, which select), ``run()`` per layer (two launches, six with the split select; no
    sync, no allocation, no host branch). ``topk_splits``: ranges per query of the select (1:
    one program per query); None lets ``plan()`` pick by shape."""

    def __init__(
        self,
        topk: int,
        n_heads: int,
        head_dim: int = 128,
        *,
        ratio: int = 4,
        block_size: int = 128,
        key_layout: IndexKeyLayout | None = None,
        write_rows: bool = True,
        max_workspace_bytes: int = 1 << 28,
        rotate: bool = False,
        topk_splits: int | None = None,
    ):
        if n_heads & (n_heads - 1) or n_heads < 16 or head_dim & (head_dim - 1):
            raise ValueError(f"{n_heads} heads x {head_dim}: powers of 2, >= 16 heads")
        if rotate and not 16 <= head_dim <= 256:
            raise ValueError(f"the in-kernel Hadamard rotation takes 16..256 dims, got {head_dim}")
        self.rotate = rotate  # q unrotated, keys rotated: the score kernel rotates q
        self.topk, self.n_heads, self.head_dim = topk, n_heads, head_dim
        self.ratio, self.entries_per_block = ratio, block_size // ratio
        self.key_layout = key_layout or IndexKeyLayout("fp8", head_dim=head_dim)
        if self.key_layout.head_dim != head_dim:
            raise ValueError(f"key layout {self.key_layout} is not {head_dim}-dimensional")
        # FP8 keys: e4m3 queries, rounded as ``IndexerExtend`` rounds them (a token's picks
        # are then the same function of its q in a prefill chunk and in a decode step)
        self.q_fp8 = self.key_layout.fmt == "fp8"
        self.write_rows = write_rows
        self.max_workspace_bytes = max_workspace_bytes
        self.block_keys = 64
        self._topk_splits = topk_splits  # None: plan() picks by shape (``_split_count``)
        self._planned = False

    def plan(self, n_queries: int, max_keys: int, device: torch.device | str) -> None:
        """Size for ``n_queries`` queries seeing at most ``max_keys`` entries each (decode under
        CUDA graphs: the capacity of the captured batch). Allocates the outputs and workspace."""
        device = torch.device(device)
        self.n_queries = n_queries
        self.ld = logits_width(max_keys)
        self._radix_chunk = radix_chunk(self.ld)
        # queries per launch pair, so the fp32 workspace stays within max_workspace_bytes
        self.q_chunk = max(1, min(n_queries, self.max_workspace_bytes // (4 * self.ld)))
        self.logits = torch.empty(self.q_chunk, self.ld, dtype=torch.float32, device=device)
        self.ids = torch.empty(n_queries, self.topk, dtype=torch.int32, device=device)
        self.rows = torch.empty_like(self.ids) if self.write_rows else self.ids
        self.lengths = torch.empty(n_queries, dtype=torch.int32, device=device)
        self._ids_base = (self.lengths, False)  # entry ids (no base; a dummy pointer)
        sms = (
            torch.cuda.get_device_properties(device).multi_processor_count
            if device.type == "cuda"
            else 4
        )
        tiles = triton.cdiv(max(max_keys, 1), self.block_keys)
        # decode: spread a query's tiles over the GPU, ~2 programs per SM (>= 4 tiles each);
        # 128-key tiles with ~4 programs per SM measured slower (docs/perf)
        self.splits = max(1, min(triton.cdiv(tiles, 4), triton.cdiv(2 * sms, self.q_chunk)))
        self.topk_splits = self._topk_splits or _split_count(self.q_chunk, max_keys, sms)
        # the select, chosen here by shape: run() has no branch
        self._select_topk = self._select if self.topk_splits == 1 else self._select_split
        self.hist = torch.empty(
            self.q_chunk if self.topk_splits > 1 else 0, 4, self.topk_splits, 256,
            dtype=torch.int32, device=device,
        )  # fmt: skip
        self._dot_f32 = device.type != "cuda"
        self._planned = True

    def run(
        self,
        q: torch.Tensor,
        weights: torch.Tensor,
        keys: torch.Tensor,
        block_table: torch.Tensor,
        query_req: torch.Tensor,
        positions: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``q`` [T, H, Dh] bf16 (roped; rotated like the keys unless ``rotate``), ``weights``
        [T, H] (raw ``weights_proj`` output), ``keys`` the indexer key cache (uint8,
        ``key_layout``), ``block_table`` [B, max_blocks] int32, ``query_req`` [T] int32 (row of
        ``block_table`` of each query), ``positions`` [T] int32/int64.

        Returns ``(ids, rows, lengths)``: entry ids [T, topk] int32 (-1 = none), their key rows
        (= entry rows, same addressing) [T, topk] int32 (``ids`` itself if ``write_rows`` is
        off), pick counts [T] int32. The tensors are the plan's buffers (rewritten per run).
        """
        if not self._planned:
            raise RuntimeError("plan() before run()")
        t_all, h, dh = q.shape
        if (h, dh) != (self.n_heads, self.head_dim) or t_all != self.n_queries:
            raise ValueError(f"q {tuple(q.shape)} != planned [{self.n_queries}, {self.n_heads}, "
                             f"{self.head_dim}]")  # fmt: skip
        if q.stride(2) != 1 or weights.stride(1) != 1:
            raise ValueError("q and weights need a contiguous last dim")
        for t0 in range(0, t_all, self.q_chunk):
            t1 = min(t_all, t0 + self.q_chunk)
            self._scores(q, weights, keys, block_table, query_req, positions, t0, t1)
            self._select_topk(block_table, query_req, positions, t0, t1)
        return self.ids, self.rows, self.lengths

    def _scores(self, q, weights, keys, block_table, query_req, positions, t0, t1) -> None:
        lay = self.key_layout
        _logits_kernel[(t1 - t0, self.splits)](
            q_ptr=q[t0:t1], q_stride_t=q.stride(0), q_stride_h=q.stride(1),
            w_ptr=weights[t0:t1], w_stride=weights.stride(0), keys_ptr=keys,
            bt_ptr=block_table, bt_stride=block_table.stride(0), qreq_ptr=query_req[t0:t1],
            pos_ptr=positions[t0:t1], logits_ptr=self.logits, ld=self.ld, n_splits=self.splits,
            H=self.n_heads, DH=self.head_dim, BS=self.block_keys, EPB=self.entries_per_block,
            RATIO=self.ratio, RPP=lay.rows_per_page, FP4=lay.fmt == "fp4",
            DOT_F32=self._dot_f32, ROTATE=self.rotate, Q_FP8=self.q_fp8, num_warps=4,
            num_stages=3,
        )  # fmt: skip

    def _select(self, block_table, query_req, positions, t0, t1) -> None:
        """One program per query (many queries: they fill the GPU), ``_radix_chunk`` entries
        a loop step (``topk_shapes.radix_chunk``: a pass counts whole steps, masked entries
        included, so rows of at most 1024 scores, a 4K prompt's extend, take their width)."""
        base, rebase = self._ids_base
        _topk_kernel[(t1 - t0,)](
            logits_ptr=self.logits, ld=self.ld, qreq_ptr=query_req[t0:t1],
            pos_ptr=positions[t0:t1], bt_ptr=block_table, bt_stride=block_table.stride(0),
            ids_ptr=self.ids[t0:t1], ids_ld=self.ids.stride(0), rows_ptr=self._rows_out[t0:t1],
            len_ptr=self.lengths[t0:t1], base_ptr=base, K=self.topk, RATIO=self.ratio,
            EPB=self.entries_per_block, CHUNK=self._radix_chunk, KCHUNK=self._kchunk,
            WRITE_ROWS=self.write_rows, REBASE=rebase, num_warps=8,
        )  # fmt: skip

    def _select_split(self, block_table, query_req, positions, t0, t1) -> None:
        """``topk_splits`` programs per query: four histogram launches, then the writes."""
        grid = (t1 - t0, self.topk_splits)
        common = dict(
            logits_ptr=self.logits, ld=self.ld, pos_ptr=positions[t0:t1], hist_ptr=self.hist,
            K=self.topk, RATIO=self.ratio, SPLITS=self.topk_splits,
            SB=triton.next_power_of_2(self.topk_splits), CHUNK=_SPLIT_CHUNK,
        )  # fmt: skip
        for p in range(4):
            _split_hist_kernel[grid](**common, PASS=p, num_warps=4)
        _split_write_kernel[grid](
            **common, qreq_ptr=query_req[t0:t1], bt_ptr=block_table,
            bt_stride=block_table.stride(0), ids_ptr=self.ids[t0:t1], rows_ptr=self.rows[t0:t1],
            len_ptr=self.lengths[t0:t1], EPB=self.entries_per_block, KCHUNK=self._kchunk,
            WRITE_ROWS=self.write_rows, num_warps=4,
        )  # fmt: skip

    @property
    def _rows_out(self) -> torch.Tensor:
        """The rows pointer of the select (``ids`` when no rows are written: never stored)."""
        return self.ids if self.rows is None else self.rows

    @property
    def _kchunk(self) -> int:
        return min(1024, triton.next_power_of_2(self.topk))


_SPLIT_CHUNK = 512  # scores per loop step of a split top-k program (a range at 32K, batch 1)
_SPLIT_KEYS = 512  # at least this many entries per range (at the plan's max_keys)
_MAX_SPLITS = 16  # ranges per query: each program sums SPLITS x 256 counts per pass


def _split_count(n_queries: int, max_keys: int, sms: int) -> int:
    """Ranges per query of the top-k: 1 (one program per query) unless the queries leave most
    SMs idle; then enough ranges to fill them, ``_SPLIT_KEYS`` entries each at least."""
    return max(1, min(_MAX_SPLITS, triton.cdiv(max(max_keys, 1), _SPLIT_KEYS), sms // n_queries))
