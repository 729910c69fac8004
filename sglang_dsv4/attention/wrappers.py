"""Attention wrappers, one per layer kind, FlashInfer style: ``plan()`` once per batch (host
work, shared by every layer of that kind), ``run()`` per layer (launches only).

Every layer stores its raw KV rows, then attends over one key list per query: its
``swa_window`` rows, plus on c128 layers every visible entry and on c4 layers the indexer's
top-k entries (see ``ref.attention``). Compressed layers first flush their compressors: the new
tokens extend the request's tail, completed windows become entries in the pools, and on c4
layers the state at each block end is kept in ``boundary`` for prefix hits.

The ops (``attention.extend_ops``: store, flush, picks, attend) are chosen when the wrapper is
built: Triton kernels over the whole batch on the GPU, the ``ref`` twins on CPU.
"""

from dataclasses import dataclass

import torch

from sglang_dsv4.attention.decode import KVNorm
from sglang_dsv4.attention.extend_ops import ExtendOps, Picks
from sglang_dsv4.attention.plan import BatchPlan
from sglang_dsv4.mem.pools import LayerKV
from sglang_dsv4.ref.compressor import CompressorWeights
from sglang_dsv4.ref.linear import linear

__all__ = ["CSAWrapper", "CompressedInputs", "HCAWrapper", "IndexerInputs", "SWAWrapper"]


Projected = tuple[torch.Tensor, torch.Tensor]
"""A compressor's ``wkv(x)``, ``wgate(x)`` [T, coff*D] (raw: no ``ape``), in ``x``'s dtype."""


@dataclass
class IndexerInputs:
    q: torch.Tensor  # [T, Hi, Di] roped indexer queries
    weights: torch.Tensor  # [T, Hi] raw weights_proj output
    compressor: CompressorWeights
    topk: int
    projected: Projected | None = None  # the indexer compressor's, when the model has them


@dataclass
class CompressedInputs:
    x: torch.Tensor  # [T, hidden] normed attention input (compressor input)
    compressor: CompressorWeights
    inv_freq: torch.Tensor
    norm_eps: float
    indexer: IndexerInputs | None = None
    # wkv(x), wgate(x) of the main compressor as the model's fused input GEMM made them
    # (``ops.proj``); None: computed from ``x`` where a kernel needs them (tests, benchmarks)
    projected: Projected | None = None

    def projections(self, index: bool = False) -> Projected:
        """The main (``index``: the indexer's) compressor's ``wkv(x)``, ``wgate(x)``. The twins
        run ``ref.compressor`` on ``x`` instead (its fp32 projection)."""
        w, got = (self.indexer.compressor, self.indexer.projected) if index else (
            self.compressor, self.projected
        )  # fmt: skip
        if got is not None:
            return got
        x = self.x.to(w.wkv.dtype)  # a no-op in a bf16 model
        return linear(x, w.wkv), linear(x, w.wgate)


class SWAWrapper:
    """Every layer kind: store the new raw rows, attend over each query's ``swa_window`` (and
    the entry rows the subclasses add). Lists that do not depend on the layer (windows, c128
    visible entries) are built once in ``plan()``."""

    ratio = 0

    def __init__(self, window: int, ops: ExtendOps):
        self.window = window
        self.ops = ops
        self._plan: BatchPlan | None = None

    def plan(self, batch: BatchPlan) -> None:
        self._plan = batch
        self._window_rows = batch.tables.window_rows  # [T, W] (one gather in plan_batch)
        self.ops.store.plan(batch)
        self.ops.attend.plan(batch, self._max_entries(batch))

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
        kv_norm: KVNorm | None = None,
    ) -> torch.Tensor:
        """``q`` [T, H, D], ``kv`` [T, D] of the new tokens (raw ``wkv(x)`` with ``kv_norm``, or
        normed and roped) -> ``o`` [T, H, D]."""
        self.ops.store.run(lk, kv, kv_norm)
        return self.ops.attend.run(q, lk, self._window_rows, sink, scale)


class HCAWrapper(SWAWrapper):
    """c128: the compressor flush, then every visible entry joins the key list."""

    ratio = 128

    def plan(self, batch: BatchPlan) -> None:
        super().plan(batch)
        self.ops.flush.plan(batch)
        # the attend op's choice is made (super().plan): FlashMLA plans its own lists
        self._visible = Picks(self._visible_rows(batch)) if self.ops.attend.reads_rows else None

    def _max_entries(self, batch: BatchPlan) -> int:
        return max((r.seq_len // self.ratio for r in batch.requests), default=0)

    def run(self, lk, q, kv, sink, scale, comp: CompressedInputs | None = None, kv_norm=None):
        self.ops.store.run(lk, kv, kv_norm)
        self.ops.flush.run(comp, lk)
        return self.ops.attend.run(q, lk, self._window_rows, sink, scale, self._visible)

    def _visible_rows(self, batch: BatchPlan) -> torch.Tensor:
        """[T, E] every entry row a query sees (-1 past its visible count), E the batch's most
        entries. A c128 entry is one per block: entry ``i`` of a request sits at row
        ``slot(128 i) // 128``, the block's full page (``block_table``)."""
        t = batch.tables
        width = self._max_entries(batch)
        ids = torch.arange(width, device=t.positions.device)  # [E]
        rows = t.block_table[t.query_req.long(), :width]  # [T, E]
        visible = (t.positions + 1) // self.ratio  # [T]
        return torch.where(ids < visible.unsqueeze(1), rows, -1).int()


class CSAWrapper(SWAWrapper):
    """c4: main and indexer compressor flush (keeping block-end state), indexer top-k, then the
    selected entries join the key list."""

    ratio = 4

    def __init__(self, window: int, ops: ExtendOps, topk: int = 0):
        super().__init__(window, ops)
        self.topk = topk

    def plan(self, batch: BatchPlan) -> None:
        super().plan(batch)
        for op in (self.ops.flush, self.ops.index_flush):
            op.plan(batch)
        # the attend op is planned (super().plan): FlashMLA's lists take the picks directly
        self.ops.picks.plan(batch, into=self.ops.attend.picks_into)

    def _max_entries(self, batch: BatchPlan) -> int:
        return min(self.topk, max((r.seq_len // self.ratio for r in batch.requests), default=0))

    def run(self, lk, q, kv, sink, scale, comp: CompressedInputs | None = None, kv_norm=None):
        ops, ix = self.ops, comp.indexer
        ops.store.run(lk, kv, kv_norm)
        ops.flush.run(comp, lk)
        ops.index_flush.run(comp, lk)
        picks = ops.picks.run(lk, ix.q, ix.weights)  # [T, topk] entry rows
        return ops.attend.run(q, lk, self._window_rows, sink, scale, picks)
