"""Lightning indexer of c4 layers for extend batches: many queries per request, tiled over
queries and keys, then the exact top-k of ``kernels.indexer``.

Twin: ``ref.indexer.index_scores`` + ``index_topk`` per request (the scores formula is in
``kernels.indexer``). Decode (one query per request) keeps ``IndexerTopK``'s one-query programs;
an extend has ``n`` queries per request that read the same keys, so here one program owns a
*query tile*: ``BQ`` consecutive queries of one request (``BQ * H`` query rows, e.g. 4 x 64 heads
= 256, stationary in shared memory), and streams that request's keys ``BS`` at a time:

    S = K_tile [BS, Dh] @ Q^T [Dh, BQ*H]  ->  ReLU, head weights, sum over each query's H heads

so every key tile is read once per ``BQ`` queries instead of once per query. The causal bound is
per query (entry ``s`` visible to the query at ``pos`` iff ``s < (pos + 1) // 4``); the tile's
last query sees the most keys, so the key loop runs to its bound and masks the rest.

Keys: FP8 (``kv_store.IndexKeyLayout("fp8")``: e4m3 + one power-of-2 scale per key, applied after
the sums) or plain rows (``[n_rows, Dh]`` bf16 / fp32: ``EntryFormat.BF16`` / ``FP32`` index keys,
which only CPU pools hold; GPU pools keep FP8 keys, ``mem.sizing.row_format``). Entry ``s`` of
request ``b`` is key row ``block_table[b, s // 32] * 32 + s % 32``. Plain keys are scored as
stored, with the queries as given (twin: ``index_scores`` of ``q`` and the rows, no rounding):
bf16 x bf16 on the tensor cores (exact products, fp32 sums), and exact fp32 dots as soon as
either side is fp32 (a bf16 MMA would round fp32 keys to 8 bits). Every MMA reads its key tile
as loaded, from double-buffered shared memory: keys converted in registers first compiled (sm_90)
to a single-buffered wgmma with the keys as register operand, the layout of both GPU failures on
main (FP8 keys at 512-row tiles, plain fp32 keys' wrong picks). Over FP8 keys the program
rounds its query rows to e4m3 once (``indexer.quantize_queries``: a power-of-2 scale per (token,
head), moved into the head weight; twin ``ref.indexer.fp8_queries``) and the MMA is FP8 x FP8,
both operands from shared memory (SGLang's native path: ``fused_q_indexer_rope_hadamard_quant``,
then DeepGEMM's ``fp8_mqa_logits``). Its accumulator keeps 13 mantissa bits (H100), a few 2^-14
of sum |q_d k_d| per dot; the CPU's fp32 dots are exact.

``plan()`` (host) cuts the batch's queries into tiles and the tiles into workspace chunks (the
fp32 logits of a chunk's queries must fit ``max_workspace_bytes``) and picks the top-k's launch
(``kernels.topk_shapes``: ``kernels.indexer``'s radix select, or ``kernels.topk_rows``' select of
rows held in registers; same picks, same order); ``run()`` launches, per chunk, the tiled logits
kernel and that select.
"""

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from sglang_dsv4.kernels.indexer import IndexerTopK, logits_width, quantize_queries
from sglang_dsv4.kernels.kv_store import IndexKeyLayout
from sglang_dsv4.kernels.topk_rows import _rows_topk_kernel
from sglang_dsv4.kernels.topk_shapes import SelectShape, fits, select_shape
from sglang_dsv4.mem.h2d import to_device

__all__ = ["IndexerExtend", "tensor_core_dots"]


@triton.jit(do_not_specialize=["bt_stride", "n_splits", "t_base"])
def _tile_logits_kernel(
    q_ptr, q_stride_t, q_stride_h, w_ptr, w_stride, keys_ptr, bt_ptr, bt_stride, tile_start_ptr,
    tile_len_ptr, qreq_ptr, pos_ptr, logits_ptr, ld, n_splits, t_base, w_scale,
    H: tl.constexpr, DH: tl.constexpr, BQ: tl.constexpr, BS: tl.constexpr, EPB: tl.constexpr,
    RATIO: tl.constexpr, RPP: tl.constexpr,
    KEYS: tl.constexpr,  # 0 FP8 layout, 1 plain rows
    DOT_F32: tl.constexpr,
    Q_FP8: tl.constexpr,  # e4m3 query rows (FP8 keys): an FP8 x FP8 MMA on the GPU
):  # fmt: skip
    tile = tl.program_id(0)
    split = tl.program_id(1)
    t0 = tl.load(tile_start_ptr + tile)  # first query (batch token index)
    n_q = tl.load(tile_len_ptr + tile)
    b = tl.load(qreq_ptr + t0).to(tl.int64)
    jq = tl.arange(0, BQ)
    q_ok = jq < n_q
    tq = (t0 + tl.minimum(jq, n_q - 1)).to(tl.int64)  # [BQ] clamped: padded rows repeat
    vis = (tl.load(pos_ptr + tq).to(tl.int32) + 1) // RATIO  # [BQ]
    vis = tl.where(q_ok, vis, 0)
    vis_max = tl.max(vis, axis=0)
    # query rows r = j * H + h: [BQ*H, DH]
    r = tl.arange(0, BQ * H)
    rq = tq[:, None] + 0 * tl.arange(0, H)[None, :]  # [BQ, H]
    rq = tl.reshape(rq, [BQ * H])
    rh = r % H
    dd = tl.arange(0, DH)
    q = tl.load(q_ptr + rq[:, None] * q_stride_t + rh[:, None] * q_stride_h + dd[None, :])
    # the caller's factor first, then the head count's: the order of the former torch product
    wh = tl.load(w_ptr + rq * w_stride + rh).to(tl.float32) * w_scale * (H**-0.5)  # [BQ*H]
    if Q_FP8:
        q, wh = quantize_queries(q, wh)
    mma: tl.constexpr = tl.float32 if DOT_F32 else (tl.float8e4nv if Q_FP8 else tl.bfloat16)
    q_t = tl.trans(q.to(mma))  # [DH, BQ*H]
    PAGE: tl.constexpr = RPP * (DH + 4)
    out_rows = logits_ptr + (tq - t_base) * ld  # [BQ]
    for kt in range(split, tl.cdiv(vis_max, BS), n_splits):
        i = kt * BS + tl.arange(0, BS)
        valid = i < vis_max
        blk = tl.load(bt_ptr + b * bt_stride + i // EPB, mask=valid, other=0).to(tl.int64)
        row = blk * EPB + i % EPB
        if KEYS == 0:
            kpage = row // RPP
            kslot = row - kpage * RPP
            # loaded as e4m3 (not bytes bitcast in registers): the FP8 MMA reads them from
            # shared memory as they were copied there
            kptr = (keys_ptr + (kpage * PAGE + kslot * DH)[:, None] + dd[None, :]).to(
                tl.pointer_type(tl.float8e4nv)
            )
            k = tl.load(kptr, valid[:, None], 0.0)
            sptr = (keys_ptr + kpage * PAGE + RPP * DH + kslot * 4).to(tl.pointer_type(tl.float32))
            kscale = tl.load(sptr, valid, 0.0)
        else:
            k = tl.load(keys_ptr + row[:, None] * DH + dd[None, :], valid[:, None], 0.0)
            kscale = tl.full([BS], 1.0, tl.float32)
        if DOT_F32:  # CPU, fp32 q or plain fp32 keys: exact fp32 products, no TF32
            s = tl.dot(k.to(tl.float32), q_t, input_precision="ieee")  # [BS, BQ*H]
        else:  # bf16 or e4m3 operands, fp32 accumulator (FP8: the tensor core's 13-bit sums)
            s = tl.dot(k.to(mma), q_t)  # [BS, BQ*H]
        s = tl.maximum(s, 0.0) * (DH**-0.5) * wh[None, :]
        logit = tl.sum(tl.reshape(s, [BS, BQ, H]), axis=2) * kscale[:, None]  # [BS, BQ]
        keep = (i[:, None] < vis[None, :]) & q_ok[None, :]
        tl.store(out_rows[None, :] + i[:, None], logit, keep)


def tensor_core_dots(q_dtype: torch.dtype, keys_dtype: torch.dtype) -> bool:
    """Whether the GPU scores queries of ``q_dtype`` against a key cache of ``keys_dtype``
    (uint8: the FP8 layout) on the tensor cores: only where that is exact, bf16 x bf16 or e4m3 x
    e4m3; fp32 on either side takes exact fp32 dots (fp32 keys rounded to bf16 moved scores from
    ``index_scores``: H100, Flash dims, 1.3e-2 in a row of scores up to 2.62)."""
    return torch.float32 not in (q_dtype, keys_dtype)


class IndexerExtend:
    """Indexer logits + exact top-k of one c4 layer kind over an extend batch. ``plan()`` once
    per batch (tiles, chunks, buffers, the select's launch), ``run()`` per layer (launches
    only, no sync). ``select``: the top-k's launch; None lets ``plan()`` pick it from
    ``topk_shapes.MEASURED`` by row width."""

    def __init__(
        self,
        topk: int,
        n_heads: int,
        head_dim: int = 128,
        *,
        ratio: int = 4,
        block_size: int = 128,
        key_layout: IndexKeyLayout | None = None,
        query_rows: int = 256,
        block_keys: int = 64,
        warps: int = 8,
        stages: int = 2,
        max_workspace_bytes: int = 1 << 28,
        select: SelectShape | None = None,
    ):
        if n_heads & (n_heads - 1) or head_dim & (head_dim - 1) or n_heads > query_rows:
            raise ValueError(f"{n_heads} heads x {head_dim}: powers of 2, <= {query_rows} heads")
        self.topk, self.n_heads, self.head_dim = topk, n_heads, head_dim
        self.ratio, self.entries_per_block = ratio, block_size // ratio
        self.key_layout = key_layout  # None: plain rows
        if key_layout is not None and (key_layout.fmt, key_layout.head_dim) != ("fp8", head_dim):
            raise ValueError(f"key layout {key_layout}: FP8 keys of {head_dim} dims or plain rows")
        # FP8 keys take e4m3 queries (the scale per (token, head) folded into the head weight):
        # an FP8 x FP8 MMA at twice the bf16 rate, as SGLang's native DSV4 indexer
        self.q_fp8 = key_layout is not None
        self.tile_q = max(1, query_rows // n_heads)  # queries per tile (BQ)
        # the logits launch's shape: ``bench_kv_kernels.py --only isweep`` times alternatives
        self.block_keys, self.warps, self.stages = block_keys, warps, stages
        self.max_workspace_bytes = max_workspace_bytes
        self._select_shape = select  # None: plan() picks by row width
        self._planned = False

    def plan(
        self,
        extend_lens: Sequence[int],
        seq_lens: Sequence[int],
        device: torch.device | str,
        *,
        ids_out: torch.Tensor | None = None,
        id_base: torch.Tensor | None = None,
    ) -> None:
        """Host lengths of the batch (new tokens ``n_b``, sequence lengths ``S_b``; the batch's
        tokens are the requests' new tokens in order). ``ids_out`` [T, topk] int32 (unit column
        stride, any row stride; ``id_base`` [B] int32): the select writes each query's picks
        there as ``id_base[request] + entry id`` (FlashMLA's index lists, ``PickLists``) and
        no rows; None: into the plan's ``ids`` and ``rows`` buffers."""
        device = torch.device(device)
        bq = self.tile_q
        max_keys = max((s // self.ratio for s in seq_lens), default=0)
        self.ld = logits_width(max_keys)
        q_chunk = max(bq, self.max_workspace_bytes // (4 * self.ld))
        starts, lens, chunks = [], [], []  # chunks: (t0, t1, first tile, n tiles)
        t, c_t0, c_tile = 0, 0, 0
        for n in extend_lens:
            for j in range(0, n, bq):
                m = min(bq, n - j)
                if t + m - c_t0 > q_chunk:  # this tile starts a new chunk
                    chunks.append((c_t0, t, c_tile, len(starts) - c_tile))
                    c_t0, c_tile = t, len(starts)
                starts.append(t)
                lens.append(m)
                t += m
        if t > c_t0:
            chunks.append((c_t0, t, c_tile, len(starts) - c_tile))
        self.n_queries, self.chunks = t, chunks
        tiles = to_device(torch.tensor([starts, lens], dtype=torch.int32), device)  # no sync
        self.tile_start, self.tile_len = tiles[0], tiles[1]
        rows = max((t1 - t0 for t0, t1, _, _ in chunks), default=1)
        self.logits = torch.empty(rows, self.ld, dtype=torch.float32, device=device)
        self.lengths = torch.empty(t, dtype=torch.int32, device=device)
        self._plan_ids(t, device, ids_out, id_base)
        sms = (
            torch.cuda.get_device_properties(device).multi_processor_count
            if device.type == "cuda"
            else 4
        )
        key_tiles = triton.cdiv(max(max_keys, 1), self.block_keys)
        n_tiles = max((n for _, _, _, n in chunks), default=1)
        # few query tiles (a short chunk over a long prefix): spread each one's keys too
        self.splits = max(1, min(triton.cdiv(key_tiles, 4), triton.cdiv(2 * sms, n_tiles)))
        self._dot_f32 = device.type != "cuda"
        self.select_shape = self._select_shape or select_shape(self.ld, self.topk)
        if not fits(self.select_shape, self.ld):
            raise ValueError(f"select {self.select_shape} cannot take rows of {self.ld} entries")
        self._radix_chunk = self.select_shape.chunk
        self._row = triton.next_power_of_2(self.ld)  # the rows select's register row
        # the select, chosen here: run() has no branch
        rows = self.select_shape.kind == "rows"
        self._select = self._select_rows if rows else self._select_radix
        self._planned = True

    def _plan_ids(self, t: int, device, ids_out, id_base) -> None:
        """The select's outputs: ``ids`` (+ ``rows``), or ``ids_out`` rebased (no rows)."""
        if ids_out is None:
            self.ids = torch.empty(t, self.topk, dtype=torch.int32, device=device)
            self.rows = torch.empty_like(self.ids)
            self.write_rows, self._ids_base = True, (self.lengths, False)  # base: a dummy
            return
        if ids_out.shape != (t, self.topk) or ids_out.dtype != torch.int32:
            raise ValueError(f"ids_out {tuple(ids_out.shape)} {ids_out.dtype}: int32 "
                             f"[{t}, {self.topk}]")  # fmt: skip
        if ids_out.stride(1) != 1 or id_base is None or id_base.dtype != torch.int32:
            raise ValueError("ids_out needs unit column stride and an int32 id_base")
        self.ids, self.rows = ids_out, None
        self.write_rows, self._ids_base = False, (id_base, True)

    def run(
        self,
        q: torch.Tensor,
        weights: torch.Tensor,
        keys: torch.Tensor,
        block_table: torch.Tensor,
        query_req: torch.Tensor,
        positions: torch.Tensor,
        w_scale: float = 1.0,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """``q`` [T, H, Dh] bf16 (fp32: exact fp32 dots), roped and rotated like the keys;
        ``weights`` [T, H] (bf16 or fp32, read as stored), scaled by ``w_scale`` in fp32 as the
        kernel loads them (e.g. the query rotation's Dh^-1/2: no torch op per step); ``keys``
        the key cache (uint8 FP8 layout, or plain rows viewed [n_rows, Dh]); ``block_table``
        [B, max_blocks] int32; ``query_req`` [T] int32; ``positions`` [T] int32/int64.

        Returns the plan's buffers ``(ids, rows, lengths)``: entry ids [T, topk] int32 (-1 past
        the ``min(topk, visible)`` picks), their key / entry rows, the pick counts [T]. With
        ``ids_out`` planned: that view (rebased ids) and no rows (None)."""
        if not self._planned:
            raise RuntimeError("plan() before run()")
        if q.shape != (self.n_queries, self.n_heads, self.head_dim):
            raise ValueError(f"q {tuple(q.shape)} != planned [{self.n_queries}, "
                             f"{self.n_heads}, {self.head_dim}]")  # fmt: skip
        if q.stride(2) != 1 or weights.stride(1) != 1:
            raise ValueError("q and weights need a contiguous last dim")
        plain = self.key_layout is None
        if plain and (keys.dim() != 2 or keys.shape[1] != self.head_dim):
            raise ValueError(f"plain keys must be [n_rows, {self.head_dim}]")
        if plain and keys.dtype not in (torch.bfloat16, torch.float32):
            raise ValueError(f"plain keys are bf16 or fp32 rows, got {keys.dtype}")
        dot_f32 = self._dot_f32 or not tensor_core_dots(q.dtype, keys.dtype)
        rpp = 1 if plain else self.key_layout.rows_per_page
        for t0, t1, first, n_tiles in self.chunks:
            _tile_logits_kernel[(n_tiles, self.splits)](
                q_ptr=q, q_stride_t=q.stride(0), q_stride_h=q.stride(1), w_ptr=weights,
                w_stride=weights.stride(0), keys_ptr=keys, bt_ptr=block_table,
                bt_stride=block_table.stride(0), tile_start_ptr=self.tile_start[first:],
                tile_len_ptr=self.tile_len[first:], qreq_ptr=query_req, pos_ptr=positions,
                logits_ptr=self.logits, ld=self.ld, n_splits=self.splits, t_base=t0,
                w_scale=w_scale,
                H=self.n_heads, DH=self.head_dim, BQ=self.tile_q, BS=self.block_keys,
                EPB=self.entries_per_block, RATIO=self.ratio, RPP=rpp, KEYS=1 if plain else 0,
                DOT_F32=dot_f32, Q_FP8=self.q_fp8,
                num_warps=self.warps, num_stages=self.stages,
            )  # fmt: skip
            self._select(block_table, query_req, positions, t0, t1)
        return self.ids, self.rows, self.lengths

    def _select_rows(self, block_table, query_req, positions, t0, t1) -> None:
        """``topk_rows``: one program per query, its row in registers."""
        base, rebase = self._ids_base
        _rows_topk_kernel[(t1 - t0,)](
            logits_ptr=self.logits, ld=self.ld, qreq_ptr=query_req[t0:t1],
            pos_ptr=positions[t0:t1], bt_ptr=block_table, bt_stride=block_table.stride(0),
            ids_ptr=self.ids[t0:t1], ids_ld=self.ids.stride(0), rows_ptr=self._rows_out[t0:t1],
            len_ptr=self.lengths[t0:t1], base_ptr=base, K=self.topk, RATIO=self.ratio,
            EPB=self.entries_per_block, ROW=self._row, WCHUNK=self.select_shape.chunk,
            KCHUNK=self._kchunk, WRITE_ROWS=self.write_rows, REBASE=rebase,
            num_warps=self.select_shape.warps,
        )  # fmt: skip

    # the exact radix top-k of the decode indexer, over this class's workspace (same fields)
    _rows_out = IndexerTopK._rows_out
    _select_radix = IndexerTopK._select
    _kchunk = IndexerTopK._kchunk
