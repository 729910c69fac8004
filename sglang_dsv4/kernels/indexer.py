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
homogeneous): no separate rotation GEMM per layer. The dots run on bf16 tensor cores with fp32
accumulation (e4m3 -> bf16 is exact).

Two launches: (1) scores into an fp32 workspace ``[T, max_keys]``, grid (queries, key splits),
each program striding over 64-key tiles of its query (decode spreads one query over the GPU);
(2) exact top-k per query by radix select on the order-preserving int32 image of the scores (four
8-bit histogram passes find the k-th largest value, a fifth pass writes every larger entry and
the first entries equal to it, in entry order). Outputs: entry ids [T, topk] (``-1`` past the
``min(topk, visible)`` picks), optionally their key / entry rows, and the pick counts [T].
"""

import torch
import triton
import triton.language as tl

from sglang_dsv4.kernels.kv_store import IndexKeyLayout

__all__ = ["IndexerTopK"]


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


@triton.jit(do_not_specialize=["bt_stride"])
def _topk_kernel(
    logits_ptr,
    ld,
    qreq_ptr,
    pos_ptr,
    bt_ptr,
    bt_stride,
    ids_ptr,
    rows_ptr,
    len_ptr,
    K: tl.constexpr,
    RATIO: tl.constexpr,
    EPB: tl.constexpr,
    CHUNK: tl.constexpr,
    KCHUNK: tl.constexpr,
    WRITE_ROWS: tl.constexpr,
):
    t = tl.program_id(0)
    vis = (tl.load(pos_ptr + t).to(tl.int32) + 1) // RATIO
    k = tl.minimum(vis, K)
    src = logits_ptr + t.to(tl.int64) * ld
    bins = tl.arange(0, 256)
    # radix select: after the 4 passes ``prefix`` is the k-th largest key and ``need`` the
    # number of entries equal to it that belong to the top k
    prefix = tl.zeros([], tl.int32)
    need = k
    for p in tl.static_range(4):
        SHIFT = 24 - 8 * p
        hist = tl.zeros([256], tl.int32)
        x = tl.load(src + tl.arange(0, CHUNK), tl.arange(0, CHUNK) < vis, 0.0)
        for c0 in range(0, vis, CHUNK):
            idx = c0 + tl.arange(0, CHUNK)
            m = idx < vis
            x_next = tl.load(src + idx + CHUNK, idx + CHUNK < vis, 0.0)  # in flight meanwhile
            key = _order_key(x)
            x = x_next
            if p == 0:
                digit = ((key >> 24) & 0xFF) ^ 0x80  # the sign bit orders the top byte
                match = m
            else:
                digit = (key >> SHIFT) & 0xFF
                match = m & ((key >> (SHIFT + 8)) == (prefix >> (SHIFT + 8)))
            hist += tl.histogram(digit, 256, mask=match)
        at_least = tl.cumsum(hist, 0, reverse=True)  # entries with digit >= d
        d = tl.max(tl.where(at_least >= need, bins, 0))
        need -= tl.sum(tl.where(bins > d, hist, 0))
        if p == 0:
            d = d ^ 0x80
        prefix = prefix | (d << SHIFT)
    taken = tl.zeros([], tl.int32)
    equal_seen = tl.zeros([], tl.int32)
    x = tl.load(src + tl.arange(0, CHUNK), tl.arange(0, CHUNK) < vis, 0.0)
    for c0 in range(0, vis, CHUNK):
        idx = c0 + tl.arange(0, CHUNK)
        m = idx < vis
        x_next = tl.load(src + idx + CHUNK, idx + CHUNK < vis, 0.0)
        key = _order_key(x)
        x = x_next
        eq = (m & (key == prefix)).to(tl.int32)
        take = (m & (key > prefix)) | ((eq != 0) & (equal_seen + tl.cumsum(eq, 0) <= need))
        take_i = take.to(tl.int32)
        slot = taken + tl.cumsum(take_i, 0) - 1
        tl.store(ids_ptr + t * K + slot, idx, take)
        if WRITE_ROWS:
            b = tl.load(qreq_ptr + t).to(tl.int64)
            blk = tl.load(bt_ptr + b * bt_stride + idx // EPB, mask=take, other=0)
            tl.store(rows_ptr + t * K + slot, blk * EPB + idx % EPB, take)
        taken += tl.sum(take_i)
        equal_seen += tl.sum(eq)
    for c0 in tl.static_range(0, K, KCHUNK):
        j = c0 + tl.arange(0, KCHUNK)
        pad = (j >= k) & (j < K)
        tl.store(ids_ptr + t * K + j, tl.full([KCHUNK], -1, tl.int32), pad)
        if WRITE_ROWS:
            tl.store(rows_ptr + t * K + j, tl.full([KCHUNK], -1, tl.int32), pad)
    tl.store(len_ptr + t, k)


class IndexerTopK:
    """Indexer scores + top-k of one c4 layer kind. ``plan()`` once per batch (sizes, grid,
    workspace), ``run()`` per layer (two launches, no sync, no allocation, no host branch)."""

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
        self.write_rows = write_rows
        self.max_workspace_bytes = max_workspace_bytes
        self.block_keys = 64
        self._planned = False

    def plan(self, n_queries: int, max_keys: int, device: torch.device | str) -> None:
        """Size for ``n_queries`` queries seeing at most ``max_keys`` entries each (decode under
        CUDA graphs: the capacity of the captured batch). Allocates the outputs and workspace."""
        device = torch.device(device)
        self.n_queries = n_queries
        self.ld = max(16, -(-max_keys // 16) * 16)
        # queries per launch pair, so the fp32 workspace stays within max_workspace_bytes
        self.q_chunk = max(1, min(n_queries, self.max_workspace_bytes // (4 * self.ld)))
        self.logits = torch.empty(self.q_chunk, self.ld, dtype=torch.float32, device=device)
        self.ids = torch.empty(n_queries, self.topk, dtype=torch.int32, device=device)
        self.rows = torch.empty_like(self.ids) if self.write_rows else self.ids
        self.lengths = torch.empty(n_queries, dtype=torch.int32, device=device)
        sms = (
            torch.cuda.get_device_properties(device).multi_processor_count
            if device.type == "cuda"
            else 4
        )
        tiles = triton.cdiv(max(max_keys, 1), self.block_keys)
        # decode: spread a query's tiles over the GPU, ~2 programs per SM (>= 4 tiles each);
        # 128-key tiles with ~4 programs per SM measured slower (docs/perf)
        self.splits = max(1, min(triton.cdiv(tiles, 4), triton.cdiv(2 * sms, self.q_chunk)))
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
            self._select(block_table, query_req, positions, t0, t1)
        return self.ids, self.rows, self.lengths

    def _scores(self, q, weights, keys, block_table, query_req, positions, t0, t1) -> None:
        lay = self.key_layout
        _logits_kernel[(t1 - t0, self.splits)](
            q[t0:t1],
            q.stride(0),
            q.stride(1),
            weights[t0:t1],
            weights.stride(0),
            keys,
            block_table,
            block_table.stride(0),
            query_req[t0:t1],
            positions[t0:t1],
            self.logits,
            self.ld,
            self.splits,
            H=self.n_heads,
            DH=self.head_dim,
            BS=self.block_keys,
            EPB=self.entries_per_block,
            RATIO=self.ratio,
            RPP=lay.rows_per_page,
            FP4=lay.fmt == "fp4",
            DOT_F32=self._dot_f32,
            ROTATE=self.rotate,
            num_warps=4,
            num_stages=3,
        )

    def _select(self, block_table, query_req, positions, t0, t1) -> None:
        _topk_kernel[(t1 - t0,)](
            self.logits,
            self.ld,
            query_req[t0:t1],
            positions[t0:t1],
            block_table,
            block_table.stride(0),
            self.ids[t0:t1],
            self.rows[t0:t1],
            self.lengths[t0:t1],
            K=self.topk,
            RATIO=self.ratio,
            EPB=self.entries_per_block,
            CHUNK=2048,
            KCHUNK=min(1024, triton.next_power_of_2(self.topk)),
            WRITE_ROWS=self.write_rows,
            num_warps=8,
        )
