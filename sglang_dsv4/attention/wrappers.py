"""Attention wrappers, one per layer kind, FlashInfer style: ``plan()`` once per batch (host
work, shared by every layer of that kind), ``run()`` per layer (launches only).

``run()`` flushes compressors with the ``ref/`` ops request by request, then attends: on the GPU
(bf16 rows) through one ``SparseMQA`` launch per layer over per-query row lists planned in
``plan()``, on CPU with the ``ref`` softmax per request.

Every layer stores its raw KV rows, then attends over one gathered key list per query: its
``swa_window`` rows, plus on c128 layers every visible entry and on c4 layers the indexer's
top-k entries (see ``ref.attention``). Compressed layers first flush their compressors: the new
tokens extend the request's tail, completed windows become entries in the pools, and on c4
layers the state at each block end is kept in ``boundary`` for prefix hits.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sglang_dsv4.attention.plan import BatchPlan, RequestPlan, TailMode
from sglang_dsv4.mem.pools import LayerKV, TailBuffers
from sglang_dsv4.ref.attention import attend, window_indices
from sglang_dsv4.ref.compressor import CompressorState, CompressorWeights, compress, project
from sglang_dsv4.ref.indexer import index_scores, index_topk

__all__ = ["CSAWrapper", "CompressedInputs", "HCAWrapper", "IndexerInputs", "SWAWrapper"]


@dataclass
class IndexerInputs:
    q: torch.Tensor  # [T, Hi, Di] roped indexer queries
    weights: torch.Tensor  # [T, Hi] raw weights_proj output
    compressor: CompressorWeights
    topk: int


@dataclass
class CompressedInputs:
    x: torch.Tensor  # [T, hidden] normed attention input (compressor input)
    compressor: CompressorWeights
    inv_freq: torch.Tensor
    norm_eps: float
    indexer: IndexerInputs | None = None


class SWAWrapper:
    """Every layer kind: store the new raw rows, build each query's key lists, attend.

    A query's lists are its ``swa_window`` slots in ``raw`` and, on compressed layers, rows of
    the flattened entry pool (``_entry_lists``). Lists that do not depend on the layer (windows,
    c128 visible entries) are built once in ``plan()``. With a ``kernel``
    (``kernels.attention.SparseMQA``, GPU with bf16 rows) one launch covers the whole batch;
    without, the ``ref`` softmax runs request by request on the gathered rows."""

    ratio = 0

    def __init__(self, window: int, kernel=None):
        self.window = window
        self.kernel = kernel
        self._plan: BatchPlan | None = None

    def plan(self, batch: BatchPlan) -> None:
        self._plan = batch
        self._windows = [self._window(req) for req in batch.requests]  # [n_i, W] swa slots
        self._extra_rows = None  # [T, K] int32 kernel entry lists, when fixed for the batch
        if self.kernel is not None:
            self._window_rows = torch.cat(self._windows).int()  # [T, W]
            self.kernel.plan(int(batch.out_loc.numel()), self.window, self._max_entries(batch))

    def _max_entries(self, batch: BatchPlan) -> int:
        """Longest entry list of a query of this batch (0: no entries)."""
        return 0

    def run(
        self,
        lk: LayerKV,
        q: torch.Tensor,
        kv: torch.Tensor,
        sink: torch.Tensor,
        scale: float,
        comp: CompressedInputs | None = None,
    ) -> torch.Tensor:
        """``q`` [T, H, D], ``kv`` [T, D] of the new tokens -> ``o`` [T, H, D]."""
        batch = self._plan
        lk.write_raw(batch.out_loc_swa, kv)
        lists = self._entry_lists(lk, comp)  # per request [n_i, K_i], or None
        if self.kernel is not None:
            extra = {}
            if lists is not None and self.kernel.extra_topk:
                rows = self._extra_rows
                if rows is None:
                    rows = _pad_cat(lists, self.kernel.extra_topk).int()  # [T, K]
                extra = {"extra_kv": lk.entry_pages(), "extra_indices": rows}
            window = self._window_rows
            return self.kernel.run(
                q, lk.raw_pages(), window, sink, scale, out=torch.empty_like(q), **extra
            )
        out = torch.empty_like(q)
        for i, (req, window) in enumerate(zip(batch.requests, self._windows, strict=True)):
            keys, valid = lk.read_raw(window.clamp(min=0)), window >= 0  # [n, W, D], [n, W]
            if lists is not None:
                rows = lists[i]
                keys = torch.cat([keys, lk.read_entries(rows.clamp(min=0)).to(keys.dtype)], dim=1)
                valid = torch.cat([valid, rows >= 0], dim=1)
            out[req.tokens] = attend(q[req.tokens], keys, valid, sink, scale)
        return out

    def _window(self, req: RequestPlan) -> torch.Tensor:
        """[n, W] swa slots of each query's ``swa_window`` (-1 before position 0)."""
        idx = window_indices(req.positions, self.window, -req.window_lo)
        return torch.where(idx >= 0, req.window_slots[idx.clamp(min=0)], -1)

    def _entry_lists(self, lk, comp) -> list[torch.Tensor] | None:
        """Per request, [n, K] rows of the flattened entries each query attends (-1 = none)."""
        return None


class HCAWrapper(SWAWrapper):
    """c128: the compressor flush, then every visible entry joins the key list."""

    ratio = 128

    def plan(self, batch: BatchPlan) -> None:
        super().plan(batch)
        self._rows = [self._entry_rows(req) for req in batch.requests]  # [E_i] flat entry rows
        self._visible = [  # [n_i, E_i]: the same for every c128 layer
            self._visible_lists(req, rows)
            for req, rows in zip(batch.requests, self._rows, strict=True)
        ]
        if self.kernel is not None and self.kernel.extra_topk:
            self._extra_rows = _pad_cat(self._visible, self.kernel.extra_topk).int()

    def _max_entries(self, batch: BatchPlan) -> int:
        return max((r.seq_len // self.ratio for r in batch.requests), default=0)

    def run(self, lk, q, kv, sink, scale, comp: CompressedInputs | None = None):
        for i, req in enumerate(self._plan.requests):
            self._flush(i, req, lk, comp)
        return super().run(lk, q, kv, sink, scale, comp)

    def _flush(self, i: int, req: RequestPlan, lk: LayerKV, comp: CompressedInputs) -> None:
        """Request ``i`` of the batch: its new tokens through the compressor(s)."""
        state = _load_tail(lk.tail, req, lk.boundary)
        entries, first, state = compress(
            comp.x[req.tokens], req.prefix, state, comp.compressor, comp.inv_freq, comp.norm_eps
        )
        _store_entries(lk.write_entries, req, first, entries, self.ratio)
        _save_tail(lk.tail, req, state)

    def _entry_rows(self, req: RequestPlan) -> torch.Tensor:
        """Flat rows of entries ``0 .. S//r - 1`` (entry ``i`` sits at ``slot(i*r) // r``)."""
        n = req.seq_len // self.ratio
        return req.slots[: n * self.ratio : self.ratio] // self.ratio

    def _visible_lists(self, req: RequestPlan, rows: torch.Tensor) -> torch.Tensor:
        """[n, E] every entry row a query of ``req`` sees (-1 past its visible count)."""
        visible = (req.positions + 1) // self.ratio  # [n]
        ids = torch.arange(rows.numel(), device=rows.device)
        return torch.where(ids < visible.unsqueeze(1), rows, -1)

    def _entry_lists(self, lk, comp):
        return self._visible


class CSAWrapper(HCAWrapper):
    """c4: main and indexer compressor flush (keeping block-end state), indexer top-k, then the
    selected entries join the key list."""

    ratio = 4

    def __init__(self, window: int, kernel=None, topk: int = 0):
        super().__init__(window, kernel)
        self.topk = topk

    def plan(self, batch: BatchPlan) -> None:
        SWAWrapper.plan(self, batch)  # the c128 visible lists do not apply: top-k per layer
        self._rows = [self._entry_rows(req) for req in batch.requests]
        self._block_ends = [self._block_end_rows(req) for req in batch.requests]

    def _max_entries(self, batch: BatchPlan) -> int:
        return min(self.topk, super()._max_entries(batch))

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

    def _flush(self, i: int, req: RequestPlan, lk: LayerKV, comp: CompressedInputs) -> None:
        x = comp.x[req.tokens]
        pages, rows = self._block_ends[i]
        held = req.prefix % self.ratio  # tokens of the current window already in the tail
        for w, write, tail, boundary in (
            (comp.compressor, lk.write_entries, lk.tail, lk.boundary),
            (comp.indexer.compressor, lk.write_index_keys, lk.index_tail, lk.index_boundary),
        ):
            state = _load_tail(tail, req, boundary)
            kv, score = project(x, req.prefix, w)  # [n, 2D]
            # the tail's current-window slots [r, r + held) precede the new tokens
            stream_kv = torch.cat([state.kv[self.ratio : self.ratio + held], kv])
            stream_score = torch.cat([state.score[self.ratio : self.ratio + held], score])
            entries, first, state = compress(
                x, req.prefix, state, w, comp.inv_freq, comp.norm_eps, (kv, score)
            )
            _store_entries(write, req, first, entries, self.ratio)
            d = w.head_dim
            boundary.kv[pages] = stream_kv[rows, :d]  # [n_ends, r, D]
            boundary.score[pages] = stream_score[rows, :d]
            _save_tail(tail, req, state)

    def _entry_lists(self, lk, comp):
        return [
            self._top_k(lk, comp.indexer, req, rows)
            for req, rows in zip(self._plan.requests, self._rows, strict=True)
        ]

    def _top_k(self, lk, ix: IndexerInputs, req: RequestPlan, rows: torch.Tensor) -> torch.Tensor:
        """[n, min(topk, E)] entry rows the indexer picks for the queries of ``req``."""
        index_keys = lk.read_index_keys(rows)  # [E, Di]
        q, w, positions = ix.q[req.tokens], ix.weights[req.tokens], req.positions
        # Queries in chunks: the scores of one chunk are [c, Hi, E] fp32 before the head sum.
        chunk = max(1, _SCORE_BYTES // (4 * q.shape[1] * max(1, rows.numel())))
        picks = torch.cat(
            [
                index_topk(
                    index_scores(q[i : i + chunk], w[i : i + chunk], index_keys),
                    positions[i : i + chunk],
                    self.ratio,
                    ix.topk,
                )
                for i in range(0, q.shape[0], chunk)
            ]
        )  # [n, min(topk, E)] entry ids
        return torch.where(picks >= 0, rows[picks.clamp(min=0)], -1)


# Bound on the indexer's per-chunk score tensor (a 32K-token prefill would need 17 GB at once).
_SCORE_BYTES = 1 << 28


def _pad_cat(lists: list[torch.Tensor], width: int) -> torch.Tensor:
    """Row-concatenate [n_i, k_i] lists, padding each to ``width`` columns with -1."""
    return torch.cat([F.pad(x, (0, width - x.shape[1]), value=-1) for x in lists])


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


def _save_tail(tail: TailBuffers, req: RequestPlan, state: CompressorState) -> None:
    tail.kv[req.req_slot] = state.kv
    tail.score[req.req_slot] = state.score


def _store_entries(write, req: RequestPlan, first: int, entries: torch.Tensor, ratio: int) -> None:
    """``write``: ``LayerKV.write_entries`` or ``write_index_keys`` (flat rows, values)."""
    if entries.shape[0] == 0:
        return
    ids = torch.arange(first, first + entries.shape[0], device=req.slots.device)
    write(req.slots[ids * ratio] // ratio, entries)
