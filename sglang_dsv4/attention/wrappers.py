"""Attention wrappers, one per layer kind, FlashInfer style: ``plan()`` once per batch (host
work, shared by every layer of that kind), ``run()`` per layer (launches only).

This is the reference implementation: ``run()`` calls the ``ref/`` ops request by request on
the pools. GPU kernels plug in behind the same two methods.

Every layer stores its raw KV rows, then attends over one gathered key list per query: its
``swa_window`` rows, plus on c128 layers every visible entry and on c4 layers the indexer's
top-k entries (see ``ref.attention``). Compressed layers first flush their compressors: the new
tokens extend the request's tail, completed windows become entries in the pools, and on c4
layers the state at each block end is kept in ``boundary`` for prefix hits.
"""

from dataclasses import dataclass

import torch

from sglang_dsv4.attention.plan import BatchPlan, RequestPlan, TailMode
from sglang_dsv4.mem.pools import LayerKV, TailBuffers
from sglang_dsv4.ref.attention import sparse_attention, window_indices
from sglang_dsv4.ref.compressor import CompressorState, CompressorWeights, compress
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
    def __init__(self, window: int):
        self.window = window
        self._plan: BatchPlan | None = None

    def plan(self, batch: BatchPlan) -> None:
        self._plan = batch

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
        lk.raw[batch.out_loc_swa] = kv.to(lk.raw.dtype)
        out = torch.empty_like(q)
        for req in batch.requests:
            keys = lk.raw[req.window_slots]  # [S - window_lo, D]
            idx = window_indices(req.positions, self.window, -req.window_lo)
            keys, idx = self._extend_keys(lk, req, keys, idx, comp)
            out[req.tokens] = sparse_attention(q[req.tokens], keys, idx, sink, scale)
        return out

    def _extend_keys(self, lk, req, keys, idx, comp):
        return keys, idx


class HCAWrapper(SWAWrapper):
    """c128: the compressor flush, then every visible entry joins the key list."""

    ratio = 128

    def run(self, lk, q, kv, sink, scale, comp: CompressedInputs | None = None):
        for req in self._plan.requests:
            self._flush(req, lk, comp)
        return super().run(lk, q, kv, sink, scale, comp)

    def _flush(self, req: RequestPlan, lk: LayerKV, comp: CompressedInputs) -> None:
        state = _load_tail(lk.tail, req, lk.boundary)
        entries, first, state = compress(
            comp.x[req.tokens], req.prefix, state, comp.compressor, comp.inv_freq, comp.norm_eps
        )
        _store_entries(lk.entries, req, first, entries, self.ratio)
        _save_tail(lk.tail, req, state)

    def _entry_rows(self, req: RequestPlan) -> torch.Tensor:
        """Flat rows of entries ``0 .. S//r - 1`` (entry ``i`` sits at ``slot(i*r) // r``)."""
        n = req.seq_len // self.ratio
        return req.slots[: n * self.ratio : self.ratio] // self.ratio

    def _extend_keys(self, lk, req, keys, idx, comp):
        rows = self._entry_rows(req)
        entries = lk.entries.view(-1, lk.entries.shape[-1])[rows]  # [E, D]
        visible = (req.positions + 1) // self.ratio
        picks = torch.arange(rows.numel(), device=idx.device).expand(idx.shape[0], -1)
        picks = torch.where(picks < visible.unsqueeze(1), picks + keys.shape[0], -1)
        return torch.cat([keys, entries.to(keys.dtype)]), torch.cat([idx, picks], dim=1)


class CSAWrapper(HCAWrapper):
    """c4: main and indexer compressor flush (keeping block-end state), indexer top-k, then the
    selected entries join the key list."""

    ratio = 4

    def _flush(self, req: RequestPlan, lk: LayerKV, comp: CompressedInputs) -> None:
        main = _load_tail(lk.tail, req, lk.boundary)
        index = _load_tail(lk.index_tail, req, lk.index_boundary)
        ix = comp.indexer
        x = comp.x[req.tokens]
        # Split at block ends so the state there can be kept for prefix hits.
        pos = req.prefix
        for end, page in [*req.block_ends, (req.seq_len, -1)]:
            if end <= pos:
                continue
            seg = x[pos - req.prefix : end - req.prefix]
            entries, first, main = compress(
                seg, pos, main, comp.compressor, comp.inv_freq, comp.norm_eps
            )
            _store_entries(lk.entries, req, first, entries, self.ratio)
            keys, first, index = compress(
                seg, pos, index, ix.compressor, comp.inv_freq, comp.norm_eps
            )
            _store_entries(lk.index_keys, req, first, keys, self.ratio)
            if page >= 0:
                _save_boundary(lk.boundary, page, main)
                _save_boundary(lk.index_boundary, page, index)
            pos = end
        _save_tail(lk.tail, req, main)
        _save_tail(lk.index_tail, req, index)

    def _extend_keys(self, lk, req, keys, idx, comp):
        ix = comp.indexer
        rows = self._entry_rows(req)
        index_keys = lk.index_keys.view(-1, lk.index_keys.shape[-1])[rows]  # [E, Di]
        scores = index_scores(ix.q[req.tokens], ix.weights[req.tokens], index_keys)
        picks = index_topk(scores, req.positions, self.ratio, ix.topk)  # [n, k] entry ids
        entries = lk.entries.view(-1, lk.entries.shape[-1])[rows]
        picks = torch.where(picks >= 0, picks + keys.shape[0], -1)
        return torch.cat([keys, entries.to(keys.dtype)]), torch.cat([idx, picks], dim=1)


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


def _save_boundary(boundary: TailBuffers, page: int, state: CompressorState) -> None:
    """The previous window's a-halves (slots [0, r), channels [0, D)) at a block end."""
    half, d = boundary.kv.shape[1], boundary.kv.shape[2]
    boundary.kv[page] = state.kv[:half, :d]
    boundary.score[page] = state.score[:half, :d]


def _store_entries(
    pool: torch.Tensor, req: RequestPlan, first: int, entries: torch.Tensor, ratio: int
) -> None:
    if entries.shape[0] == 0:
        return
    ids = torch.arange(first, first + entries.shape[0], device=req.slots.device)
    rows = req.slots[ids * ratio] // ratio
    pool.view(-1, pool.shape[-1])[rows] = entries.to(pool.dtype)
