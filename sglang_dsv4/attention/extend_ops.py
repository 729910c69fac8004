"""The ops of an extend (prefill) layer, one interface each, chosen once at construction.

==========  ========================================  ========================================
op          torch twin (CPU; the ``ref`` math)         kernels (GPU; one launch for the batch)
==========  ========================================  ========================================
``store``   ``raw[swa slots] = kv``                    ``kernels.kv_store.store_kv``
``flush``   ``ref.compressor.compress`` per request    ``kernels.compressor.CompressorFlush``
``picks``   ``ref.indexer`` per request, query chunks  ``kernels.indexer_extend.IndexerExtend``
``attend``  ``ref.attention.attend`` per request       ``kernels.attention.SparseMQA`` (or,
                                                      per batch shape, FlashMLA's sparse
                                                      prefill: ``extend_choice``)
==========  ========================================  ========================================

Every op has ``plan(batch)`` (host work, once per batch, no pool access) and ``run(...)``
(launches). Pools are read and written in their own row format (FP8 / bf16 / fp32, the layer's
``RowStore``s): the kernels take the format's layout, the twins go through ``LayerKV.read_*`` /
``write_*``. Key lists are one representation for both: ``window`` [T, W] swa slots of each
query's ``swa_window`` and ``extra`` [T, K] rows of the layer's flattened entry pool (-1 = none).
The kv handed to ``store`` is the raw ``wkv(x)`` with its ``KVNorm`` (normed and roped in the
store), or already normed and roped.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sglang_dsv4.attention.decode import KVNorm
from sglang_dsv4.attention.plan import BatchPlan, RequestPlan, TailMode
from sglang_dsv4.mem.pools import LayerKV, RowStore, TailBuffers
from sglang_dsv4.ref.attention import attend
from sglang_dsv4.ref.compressor import CompressorState, CompressorWeights, compress, project
from sglang_dsv4.ref.indexer import fp8_rotated_queries, index_scores, index_topk
from sglang_dsv4.ref.quant import hadamard

__all__ = [
    "AttendTorch",
    "AttendTriton",
    "ExtendOps",
    "FlushTorch",
    "FlushTriton",
    "PickLists",
    "PicksTorch",
    "PicksTriton",
    "StoreTorch",
    "StoreTriton",
    "extend_ops",
]


# ---------------------------------------------------------------- store: raw KV rows


class StoreTorch:
    def plan(self, batch: BatchPlan) -> None:
        self._rows = batch.out_loc_swa  # [T]

    def run(self, lk: LayerKV, kv: torch.Tensor, kv_norm: KVNorm | None = None) -> None:
        """``kv`` [T, D] into the layer's raw rows at the new tokens' swa slots: the raw
        ``wkv(x)`` normed and roped here by ``kv_norm``, or (without) already normed and roped."""
        lk.write_raw(self._rows, kv if kv_norm is None else kv_norm.apply(kv))


class StoreTriton(StoreTorch):
    """One launch: RMSNorm + RoPE (with ``kv_norm``) + quantize + scatter (``store_kv``)."""

    def __init__(self):
        from sglang_dsv4.kernels.kv_store import store_kv

        self._store = store_kv

    def run(self, lk: LayerKV, kv: torch.Tensor, kv_norm: KVNorm | None = None) -> None:
        norm = {}
        if kv_norm is not None:
            norm = dict(norm_weight=kv_norm.weight, positions=kv_norm.positions,
                        inv_freq=kv_norm.inv_freq.float(), eps=kv_norm.eps)  # fmt: skip
        self._store(kv, lk.raw, self._rows, layout=lk.raw_rows.layout, **norm)


# ---------------------------------------------------------------- flush: one compressor


class FlushTorch:
    """One compressor of a layer kind (c128 main, c4 main, or with ``index`` the c4 indexer's):
    the new tokens extend each request's tail, completed windows become entries (indexer keys);
    on c4 layers the a-halves of every window that ends a block are kept at that block's swa
    page (``boundary``)."""

    def __init__(self, ratio: int, index: bool = False):
        self.ratio, self.index = ratio, index

    def _state(self, lk: LayerKV) -> tuple[TailBuffers, TailBuffers | None]:
        if self.index:
            return lk.index_tail, lk.index_boundary
        return lk.tail, lk.boundary

    def plan(self, batch: BatchPlan) -> None:
        self._plan = batch
        self._ends = [self._block_end_rows(req) for req in batch.requests]

    def _block_end_rows(self, req: RequestPlan) -> tuple[torch.Tensor, torch.Tensor]:
        """(swa pages [B], rows [B, r]) per block end in (P, S]: where its state is kept, and the
        rows of the window just before it in the stream "current window's tail tokens, then the
        new tokens" (that window's a-halves are the state kept at the block end)."""
        device = req.slots.device
        ends = torch.tensor([e for e, _ in req.block_ends], dtype=torch.long, device=device)
        pages = torch.tensor([p for _, p in req.block_ends], dtype=torch.long, device=device)
        start = req.prefix - req.prefix % self.ratio  # position of the stream's first row
        rows = (ends - start).unsqueeze(1) + torch.arange(-self.ratio, 0, device=device)
        return pages, rows

    def _weights(self, comp) -> CompressorWeights:
        return comp.indexer.compressor if self.index else comp.compressor

    def run(self, comp, lk) -> None:
        """``comp`` (``wrappers.CompressedInputs``): the twin runs ``ref.compressor`` on
        ``comp.x`` [T, hidden], the compressor input of the batch's new tokens."""
        x, w, inv_freq, eps = comp.x, self._weights(comp), comp.inv_freq, comp.norm_eps
        tail, boundary = self._state(lk)
        write = lk.write_index_keys if self.index else lk.write_entries
        for req, (pages, rows) in zip(self._plan.requests, self._ends, strict=True):
            xr = x[req.tokens]
            state = _load_tail(tail, req, boundary)
            kv, score = project(xr, req.prefix, w)  # [n, coff*D]
            if boundary is not None:  # the tail's current-window slots precede the new tokens
                held, r, d = req.prefix % self.ratio, self.ratio, w.head_dim
                stream_kv = torch.cat([state.kv[r : r + held], kv])
                stream_score = torch.cat([state.score[r : r + held], score])
                boundary.kv[pages] = stream_kv[rows, :d]  # [n_ends, r, D]
                boundary.score[pages] = stream_score[rows, :d]
            entries, first, state = compress(xr, req.prefix, state, w, inv_freq, eps, (kv, score))
            _store_entries(write, req, first, entries, self.ratio)
            tail.kv[req.req_slot], tail.score[req.req_slot] = state.kv, state.score


class FlushTriton(FlushTorch):
    """``rows``: the pool's ``RowStore`` of the entries (indexer keys): FP8 rows (keys) or plain
    bf16 / fp32 rows, the ``CompressorFlush`` output format."""

    def __init__(self, ratio: int, rows: RowStore, index: bool = False, norm_eps: float = 1e-6):
        from sglang_dsv4.kernels.compressor import CompressorFlush

        super().__init__(ratio, index)
        if rows.layout is not None:
            out = "index_fp8" if index else "fp8"  # index_fp8 rotates the keys (Hadamard)
        else:
            out = _PLAIN_OUT[rows.read_dtype]
        self.kernel = CompressorFlush(ratio, rows.dim, out, layout=rows.layout, norm_eps=norm_eps)
        self.plain = rows.layout is None

    def plan(self, batch: BatchPlan) -> None:
        self._plan = batch
        reqs = batch.requests
        self.kernel.plan([r.prefix for r in reqs], [r.seq_len - r.prefix for r in reqs])

    def run(self, comp, lk) -> None:
        """The kernel over ``comp.projections()``: ``wkv(x)``, ``wgate(x)`` as the model's fused
        input GEMM made them (computed here only when the caller has none)."""
        t = self._plan.tables
        tail, boundary = self._state(lk)
        pool = lk.index_keys if self.index else lk.entries
        w = self._weights(comp)
        kv, score = comp.projections(index=self.index)  # [T, coff*D] each
        c4 = boundary is not None
        # ape / norm as stored (bf16 in a bf16 model): the kernel widens them to fp32 as it
        # loads them (exact), as the decode flush does; a cast here cost a launch per step
        self.kernel.run(
            kv=kv,
            score=score,
            ape=w.ape,
            norm_weight=w.norm,
            inv_freq=comp.inv_freq,
            tail_kv=tail.kv,
            tail_score=tail.score,
            req_slots=t.req_slots,
            prefix_lens=t.prefix,
            cu_seqlens=t.cu_seqlens,
            block_table=t.block_table,
            out=pool.view(-1, pool.shape[-1]) if self.plain else pool,
            tail_mode=t.tail_mode if c4 else t.tail_mode_c128,
            rebuild_page=t.rebuild_page,
            boundary=(boundary.kv, boundary.score) if c4 else None,
            boundary_table=t.boundary_table if c4 else None,
        )


# ---------------------------------------------------------------- picks: c4 indexer top-k


@dataclass
class Picks:
    # [T, K] int32/int64 rows of the flattened entry pool, -1 = none (None: the picks went
    # straight into the attend op's lists, ``PickLists``)
    rows: torch.Tensor | None
    lengths: torch.Tensor | None = None  # [T] int32 valid prefix of each row (kernels)
    # [T, K] the request-local entry ids of ``rows`` (c4); rebased (``PickLists``) when the
    # picks op wrote them into the attend op's lists
    ids: torch.Tensor | None = None


@dataclass(frozen=True)
class PickLists:
    """Where a c4 layer's picks go when the attend op reads them from index lists of its own
    (FlashMLA's, ``extend_choice.AttendFlashMLA``: laid out once per batch in its ``plan()``):
    the picks op writes entry id ``i`` of a query of request ``b`` as ``base[b] + i`` into
    ``ids`` (-1 past its picks), so no op runs between the top-k and the attention."""

    ids: torch.Tensor  # [T, K] int32, a view into the lists (row stride theirs, unit columns)
    base: torch.Tensor  # [B] int32 first workspace row of each request's entries


class PicksTorch:
    """The indexer's top-k entries of every query, as rows of the flattened entry pool.
    ``fp8_keys``: the pool's keys are FP8, whose kernels score e4m3 queries (rounded after
    the Hadamard rotation: ``ref.indexer.fp8_rotated_queries``)."""

    def __init__(self, topk: int, ratio: int = 4, fp8_keys: bool = False):
        self.topk, self.ratio = topk, ratio
        self._query = fp8_rotated_queries if fp8_keys else _same

    def plan(self, batch: BatchPlan, into: PickLists | None = None) -> None:
        """``into``: the attend op's lists, which then receive the picks (``PickLists``)."""
        self._plan = batch
        self._rows = [_entry_rows(req, self.ratio) for req in batch.requests]  # [E_i]
        self.width = min(self.topk, max((r.numel() for r in self._rows), default=0))
        self._into = into
        self._deliver = _no_lists if into is None else _into_lists

    def run(self, lk: LayerKV, q: torch.Tensor, weights: torch.Tensor) -> Picks:
        """Over the layer's indexer keys: ``q`` [T, Hi, Di] (roped), ``weights`` [T, Hi]."""
        out, ids = [], []
        q = self._query(q)
        for req, rows in zip(self._plan.requests, self._rows, strict=True):
            qr, wr, keys = q[req.tokens], weights[req.tokens], lk.read_index_keys(rows)
            picks = _top_k(keys, qr, wr, req, self.ratio, self.topk)  # [n, k] entry ids
            ids.append(F.pad(picks, (0, self.width - picks.shape[1]), value=-1))
            picks = torch.where(picks >= 0, rows[picks.clamp(min=0)], -1)
            out.append(F.pad(picks, (0, self.width - picks.shape[1]), value=-1))
        picks = Picks(torch.cat(out), ids=torch.cat(ids))
        self._deliver(picks, self._into, self._plan)
        return picks


def _no_lists(picks: Picks, into: None, batch: BatchPlan) -> None:
    pass


def _into_lists(picks: Picks, into: PickLists, batch: BatchPlan) -> None:
    """The twin of the select kernels' in-list writes: ids rebased, -1 kept, -1 past them."""
    base = into.base[batch.tables.query_req.long()].unsqueeze(1)  # [T, 1]
    into.ids.fill_(-1)
    k = picks.ids.shape[1]
    into.ids[:, :k] = torch.where(picks.ids >= 0, picks.ids + base, -1)


# Bound on the twin's per-chunk score tensor (a 32K-token prefill would need 17 GB at once).
_SCORE_BYTES = 1 << 28


def _top_k(keys, q, w, req: RequestPlan, ratio: int, topk: int) -> torch.Tensor:
    """[n, min(topk, E)] entry ids the indexer picks for the queries of ``req`` (query chunks:
    the scores of one chunk are [c, Hi, E] fp32 before the head sum)."""
    chunk = max(1, _SCORE_BYTES // (4 * q.shape[1] * max(1, keys.shape[0])))
    positions = req.positions
    return torch.cat(
        [
            index_topk(
                index_scores(q[i : i + chunk], w[i : i + chunk], keys),
                positions[i : i + chunk],
                ratio,
                topk,
            )
            for i in range(0, q.shape[0], chunk)
        ]
    )


class PicksTriton(PicksTorch):
    """``rows``: the pool's ``RowStore`` of the indexer keys (FP8 keys of the Hadamard-rotated
    key, or plain rows). Against rotated keys the queries are rotated too (one GEMM with the
    +-1 Hadamard matrix; its n^-1/2 goes into the head weights, as the logits kernel's
    ``w_scale``: the weights reach it as the model made them, no cast or product per step)."""

    def __init__(self, topk: int, n_heads: int, rows: RowStore, ratio: int = 4):
        from sglang_dsv4.kernels.indexer_extend import IndexerExtend

        super().__init__(topk, ratio)
        self.kernel = IndexerExtend(topk, n_heads, rows.dim, ratio=ratio, key_layout=rows.layout)
        self.plain = rows.layout is None
        self._prepare = _unrotated if self.plain else _rotated

    def plan(self, batch: BatchPlan, into: PickLists | None = None) -> None:
        """``into``: the attend op's lists: the select kernel writes the picks there, rebased
        (``PickLists``); then ``run()`` returns no rows (the ids are that view)."""
        self._plan = batch
        reqs = batch.requests
        self.width = min(self.topk, max((r.seq_len // self.ratio for r in reqs), default=0))
        device = batch.out_loc.device
        lists = {} if into is None else dict(ids_out=into.ids, id_base=into.base)
        self.kernel.plan([r.seq_len - r.prefix for r in reqs], [r.seq_len for r in reqs], device,
                         **lists)  # fmt: skip

    def run(self, lk, q, weights) -> Picks:
        t = self._plan.tables
        q, w_scale = self._prepare(q)
        keys = lk.index_keys
        ids, rows, lengths = self.kernel.run(
            q=q,
            weights=weights,
            w_scale=w_scale,
            keys=keys.flatten(0, 1) if self.plain else keys,
            block_table=t.block_table,
            query_req=t.query_req,
            positions=t.positions,
        )
        return Picks(rows, lengths, ids)


def _unrotated(q: torch.Tensor) -> tuple[torch.Tensor, float]:
    return q, 1.0


def _same(q: torch.Tensor) -> torch.Tensor:
    return q


_HADAMARD: dict = {}


def _rotated(q: torch.Tensor) -> tuple[torch.Tensor, float]:
    """(``q`` H, the head weights' factor n^-1/2) with H the +-1 Sylvester matrix: scores
    against keys stored as ``hadamard(k) = k H n^-1/2`` equal those of ``q`` against ``k``."""
    n = q.shape[-1]
    key = (n, q.dtype, q.device)
    if key not in _HADAMARD:  # +-1 entries: exact in bf16
        _HADAMARD[key] = (hadamard(torch.eye(n, device=q.device)) * n**0.5).round().to(q.dtype)
    # q [T, Hi, n] (rows strided: a split of the fused GEMM) @ H is the batched GEMM of H
    # broadcast over tokens: that bmm called directly (``@`` dispatches it with four more
    # expand / view ops each step). n^-1/2 goes to the fp32 weights in the logits kernel: it is
    # not a power of 2, a bf16 product would round every weight.
    return torch.bmm(q, _HADAMARD[key].expand(q.shape[0], n, n)), n**-0.5


# ---------------------------------------------------------------- attend


class AttendTorch:
    """One softmax with sink per query over its window rows in ``raw`` and its ``extra`` rows of
    the flattened entries (``ref.attention.attend``), request by request."""

    # reads the extra keys as rows (``Picks.rows``): a c128 layer lists its visible entries
    reads_rows = True
    # where the c4 picks op writes its picks (``PickLists``), set by ``plan()``; None: the
    # op reads ``Picks``
    picks_into: PickLists | None = None

    def plan(self, batch: BatchPlan, extra_width: int) -> None:
        self._plan = batch

    def run(self, q, lk: LayerKV, window, sink, scale, extra: Picks | None = None):
        """``q`` [T, H, D], ``window`` [T, W] swa slots, ``extra`` rows of the layer's entries
        -> [T, H, D]."""
        out = torch.empty_like(q)
        for req in self._plan.requests:
            win = window[req.tokens]
            keys, valid = lk.read_raw(win.clamp(min=0)), win >= 0  # [n, W, D], [n, W]
            if extra is not None:
                rows = extra.rows[req.tokens]
                keys = torch.cat([keys, lk.read_entries(rows.clamp(min=0)).to(keys.dtype)], 1)
                valid = torch.cat([valid, rows >= 0], dim=1)
            out[req.tokens] = attend(q[req.tokens], keys, valid, sink, scale)
        return out


class AttendTriton(AttendTorch):
    """``kernels.attention.SparseMQA`` over the batch (bf16 or FP8 rows): one launch."""

    def __init__(self, n_heads: int, head_dim: int, window: int, kv_fp8: bool, device):
        from sglang_dsv4.kernels.attention import SparseMQA

        self.kernel = SparseMQA(n_heads, head_dim, kv_fp8=kv_fp8, device=device)
        self.window = window

    def plan(self, batch: BatchPlan, extra_width: int) -> None:
        self._plan = batch
        self.kernel.plan(int(batch.out_loc.numel()), self.window, extra_width)

    def run(self, q, lk, window, sink, scale, extra: Picks | None = None):
        more = {}
        if extra is not None and self.kernel.extra_topk:
            more = {"extra_kv": lk.entry_pages(), "extra_indices": extra.rows}
            if extra.lengths is not None:
                more["extra_lengths"] = extra.lengths
        # the planned output buffer: the layer consumes it before the next layer of the kind
        return self.kernel.run(q.to(torch.bfloat16), lk.raw_pages(), window, sink, scale, **more)


# ---------------------------------------------------------------- the set of one layer kind


@dataclass(frozen=True)
class ExtendOps:
    store: StoreTorch
    attend: AttendTorch
    flush: FlushTorch | None = None  # c4 / c128 main compressor
    index_flush: FlushTorch | None = None  # c4 indexer compressor
    picks: PicksTorch | None = None  # c4 indexer top-k


_PLAIN_OUT = {torch.float32: "fp32", torch.bfloat16: "bf16"}


def extend_ops(
    ratio: int,
    lk: LayerKV | None,
    *,
    window: int,
    n_heads: int,
    index_heads: int = 0,
    topk: int = 0,
    device,
    kernels: bool,
    norm_eps: float = 1e-6,
) -> ExtendOps:
    """The ops of one layer kind (``ratio`` 0 SWA, 4 c4, 128 c128), for the row formats of its
    layers (``lk``: one of them; None when the model has no layer of the kind): the Triton
    kernels when ``kernels`` (GPU; CPU tests force them under the Triton interpreter), else the
    torch twins. The sparse MQA kernel reads bf16 or FP8 rows: fp32 rows attend with the twin."""
    if not kernels or lk is None:
        flush = FlushTorch(ratio) if ratio else None
        index_flush = FlushTorch(ratio, index=True) if ratio == 4 else None
        fp8_keys = lk is not None and ratio == 4 and lk.key_rows.layout is not None
        picks = PicksTorch(topk, ratio, fp8_keys) if ratio == 4 else None
        return ExtendOps(StoreTorch(), AttendTorch(), flush, index_flush, picks)
    flush = FlushTriton(ratio, lk.entry_rows, norm_eps=norm_eps) if ratio else None
    index_flush = picks = None
    if ratio == 4:
        index_flush = FlushTriton(ratio, lk.key_rows, index=True, norm_eps=norm_eps)
        picks = PicksTriton(topk, index_heads, lk.key_rows, ratio=ratio)
    rows = lk.raw_rows
    if rows.read_dtype == torch.bfloat16:  # bf16 or FP8 rows
        from sglang_dsv4.attention.extend_choice import attend_choice

        ours = AttendTriton(n_heads, rows.dim, window, kv_fp8=lk.fp8, device=device)
        kind = {0: "swa", 4: "csa", 128: "hca"}[ratio]
        attend = attend_choice(kind, n_heads, rows.dim, window, ours, lk, device, topk)
    else:
        attend = AttendTorch()
    return ExtendOps(StoreTriton(), attend, flush, index_flush, picks)


# ---------------------------------------------------------------- helpers of the twins


def _entry_rows(req: RequestPlan, ratio: int) -> torch.Tensor:
    """Flat rows of entries ``0 .. S//r - 1`` (entry ``i`` sits at ``slot(i*r) // r``)."""
    n = req.seq_len // ratio
    return req.slots[: n * ratio : ratio] // ratio


def _load_tail(
    tail: TailBuffers, req: RequestPlan, boundary: TailBuffers | None
) -> CompressorState:
    if req.tail == TailMode.KEEP:
        return CompressorState(tail.kv[req.req_slot].clone(), tail.score[req.req_slot].clone())
    state = CompressorState(
        torch.zeros_like(tail.kv[0]), torch.full_like(tail.score[0], float("-inf"))
    )
    if req.tail == TailMode.REBUILD and boundary is not None:
        half, d = boundary.kv.shape[1], boundary.kv.shape[2]
        state.kv[:half, :d] = boundary.kv[req.rebuild_page]
        state.score[:half, :d] = boundary.score[req.rebuild_page]
    return state


def _store_entries(write, req: RequestPlan, first: int, entries: torch.Tensor, ratio: int) -> None:
    if entries.shape[0] == 0:
        return
    ids = torch.arange(first, first + entries.shape[0], device=req.slots.device)
    write(req.slots[ids * ratio] // ratio, entries)
