"""Sparse attention of extend batches through FlashMLA's sparse prefill, and the per-shape choice
between it and ours (``kernels.attention.SparseMQA`` straight over the pools' rows).

FlashMLA (``sgl_kernel.flash_mla.flash_mla_sparse_fwd``: sm90, 64 / 128 heads of 512) reads one
bf16 KV buffer. As SGLang's own DSV4 backend does, ``plan()`` lays out a per-batch workspace,
every request's entries (all of them: c4 top-k picks or c128 visible entries index into them)
followed by every request's window rows (positions ``window_lo .. S-1``), and each query's index
list into it; ``run()`` gathers the rows there in one launch (``kernels.kv_gather``: FP8 rows
dequantized bit-equal to SGLang's ``dequantize_k_cache_paged``, bf16 rows copied) and launches
FlashMLA. c4 lists get the indexer's picks per layer (request-local entry id + the request's
workspace base), written by the top-k select kernel straight into their columns
(``extend_ops.PickLists``).

:func:`pick` chooses per batch shape from ``MEASURED`` (``scripts/bench_extend.py --attend``
prints its rows on the H100): the nearest measured shape's faster kernel. Until a shape is
measured, ours serves.
"""

import functools
import math

import torch

from sglang_dsv4.attention.choice import FLASHMLA, OURS, flashmla_eligible
from sglang_dsv4.attention.extend_ops import AttendTorch, PickLists, Picks
from sglang_dsv4.attention.plan import BatchPlan
from sglang_dsv4.attention.plan_tables import ragged
from sglang_dsv4.kernels.kv_gather import gather_fp8_rows, gather_plain_rows

__all__ = ["MEASURED", "AttendChoice", "AttendFlashMLA", "pick"]

# (kind, heads, new tokens, keys per query, ours ms, FlashMLA ms): kind "csa" = window + c4
# top-k, "hca" = window + every c128 entry, "swa" = window only. Ours serves unmeasured shapes.
MEASURED: tuple[tuple[str, int, int, int, float, float], ...] = (
    # 2026-12-06, NVIDIA H100 80GB HBM3, fp8 rows: scripts/bench_extend.py
    ("csa", 64, 512, 256, 0.214, 0.31),
    ("csa", 64, 4096, 640, 2.069, 0.811),
    ("csa", 64, 8192, 256, 2.12, 1.493),
    ("csa", 64, 8192, 640, 4.717, 1.447),
    ("hca", 64, 512, 132, 0.192, 0.202),
    ("hca", 64, 4096, 160, 1.014, 0.501),
    ("hca", 64, 8192, 132, 1.902, 0.883),
    ("hca", 64, 8192, 160, 1.903, 0.868),
    ("hca", 64, 8192, 384, 3.054, 0.99),
    ("hca", 64, 8192, 1152, 7.675, 2.106),
    ("swa", 64, 512, 128, 0.135, 0.171),
    ("swa", 64, 4096, 128, 0.614, 0.392),
    ("swa", 64, 8192, 128, 1.124, 0.695),
)

_ALIGN = 128  # FlashMLA's sparse prefill wants index lists of a multiple of 64 (h64) / 128


def pick(kind: str, heads: int, tokens: int, keys: int, eligible: bool) -> str:
    """The faster kernel for this extend shape, from the nearest measured row (log scale)."""
    rows = [r for r in MEASURED if r[0] == kind and r[1] == heads]
    if not eligible or not rows:
        return OURS

    def distance(r) -> float:
        return abs(math.log(max(tokens, 1) / r[2])) + abs(math.log(max(keys, 1) / r[3]))

    _, _, _, _, ours, flashmla = min(rows, key=distance)
    return OURS if ours <= flashmla else FLASHMLA


class AttendFlashMLA(AttendTorch):
    """One ``flash_mla_sparse_fwd`` over a per-batch bf16 workspace (module docstring).
    ``topk``: the c4 picks op's width (its columns of the lists); ``fwd``: FlashMLA's sparse
    prefill (None: ``sgl_kernel``'s; the CPU tests give its ``ref`` twin)."""

    reads_rows = False  # its lists are planned (c4: the picks' ids), no extra rows read

    def __init__(
        self, ratio: int, window: int, fp8: bool, raw_page: int, entry_page: int, dim: int = 512,
        topk: int = 0, fwd=None,
    ):  # fmt: skip
        if ratio == 4 and topk <= 0:  # the picks need their columns in the lists
            raise ValueError("a c4 layer's FlashMLA lists need the picks' width (topk)")
        if fwd is None:
            from sgl_kernel.flash_mla import flash_mla_sparse_fwd as fwd
        self._fwd = fwd
        self.ratio, self.window, self.fp8, self.dim = ratio, window, fp8, dim
        self.topk = topk if ratio == 4 else 0
        self._pages = (raw_page, entry_page)
        # the workspace's rows in one launch (kernels.kv_gather), chosen here for the row format
        if fp8:
            self._gather = functools.partial(gather_fp8_rows, ent_page=entry_page,
                                             raw_page=raw_page)  # fmt: skip
        else:
            self._gather = gather_plain_rows

    def plan(self, batch: BatchPlan, extra_width: int) -> None:
        """The workspace layout and every query's index list, whole-batch device ops from the
        plan's tables (no host tensor, no copy): request ``b``'s entries at ``ent_base[b]``,
        then every request's window rows (positions ``window_lo .. S-1``), in the order of the
        plan's ``window_slots`` (a query's window ids are ``window_ids`` after the entries).
        c4: ``picks_into`` is the lists' ``topk`` columns for the picks op (``PickLists``)."""
        reqs, t = batch.requests, batch.tables
        device = batch.out_loc.device
        self._plan = batch
        ratio = max(self.ratio, 1)  # SWA: no entries
        n_ent = t.seq_lens.long() // ratio if self.ratio else torch.zeros_like(t.seq_lens).long()
        total_ent = sum(r.seq_len // ratio for r in reqs) if self.ratio else 0  # host ints
        ent_base = n_ent.cumsum(0) - n_ent  # [B] exclusive prefix sums
        self._ent_rows = self._entry_rows(t, n_ent, total_ent, device)
        self._raw_rows = t.window_slots  # [NW] swa slots
        self.n_kv = total_ent + self._raw_rows.numel()
        req = t.query_req.long()  # [T]
        # the window rows sit after the entries in the order of the plan's window slots
        window = t.window_ids
        if total_ent:
            window = torch.where(window >= 0, window + total_ent, -1)  # [T, W]
        if self.ratio == 128:  # every visible entry
            e = torch.arange(extra_width, device=device)
            vis = e < (t.positions.unsqueeze(1) + 1) // self.ratio  # [T, E]
            window = torch.cat([window, torch.where(vis, ent_base[req].unsqueeze(1) + e, -1)], 1)
        self._lists = self._index_lists(window)  # [T, 1, K'] int32
        k = window.shape[1]
        self.picks_into = (
            PickLists(self._lists[:, 0, k : k + self.topk], ent_base.int()) if self.topk else None
        )
        self._workspace = torch.empty(self.n_kv, 1, self.dim, dtype=torch.bfloat16, device=device)

    def _index_lists(self, fixed: torch.Tensor) -> torch.Tensor:
        """[T, 1, K'] int32 index lists of the batch, FlashMLA's layout: the ``fixed`` lists
        (window rows, c128 entries), ``topk`` columns the c4 picks op writes per layer, -1 up
        to a multiple of 128 columns."""
        t, k = fixed.shape
        width = k + self.topk
        idx = fixed.new_full((t, 1, width + (-width % _ALIGN)), -1, dtype=torch.int32)
        idx[:, 0, :k] = fixed
        return idx

    def _entry_rows(self, t, n_ent: torch.Tensor, total: int, device) -> torch.Tensor:
        """[NE] flat entry rows of every request's entries ``0 .. S//r - 1`` in order: entry
        ``i`` of request ``b`` is row ``block_table[b, i // epb] * epb + i % epb`` (``epb`` =
        entries per block = rows per entry page), i.e. ``slot(i*r) // r`` as
        ``extend_ops._entry_rows`` reads it. ``n_ent`` [B] device, ``total`` its sum (host)."""
        if total == 0:
            return torch.empty(0, dtype=torch.long, device=device)
        epb = self._pages[1]
        req, i = ragged(n_ent, torch.zeros_like(n_ent), total)  # [NE] each, on the device
        return t.block_table[req, i // epb].long() * epb + i % epb

    def run(self, q, lk, window, sink, scale, extra: Picks | None = None):
        """Two launches: the workspace's rows (``kv_gather``), FlashMLA. c4: the picks op has
        written this layer's picks into the lists (``picks_into``); ``extra`` is not read."""
        ws = self._workspace
        self._gather(ent_cache=lk.entries, ent_rows=self._ent_rows, raw_cache=lk.raw,
                     raw_rows=self._raw_rows, out=ws)  # fmt: skip
        out, _, _ = self._fwd(q, ws, self._lists, scale, self.dim, sink.float(), None)
        return out


class AttendChoice(AttendTorch):
    """Ours or FlashMLA per batch shape (:func:`pick`), decided in ``plan()``."""

    def __init__(self, kind: str, heads: int, window: int, ours, flashmla):
        self.kind, self.heads, self.window = kind, heads, window
        self._ours, self._flashmla = ours, flashmla
        self.choice = OURS

    @property
    def reads_rows(self) -> bool:
        return self._op.reads_rows

    @property
    def picks_into(self) -> PickLists | None:
        return self._op.picks_into

    def plan(self, batch: BatchPlan, extra_width: int) -> None:
        tokens = int(batch.out_loc.numel())
        self.choice = pick(self.kind, self.heads, tokens, self.window + extra_width, True)
        self._op = self._flashmla if self.choice == FLASHMLA else self._ours
        self._op.plan(batch, extra_width)

    def run(self, q, lk, window, sink, scale, extra: Picks | None = None):
        return self._op.run(q, lk, window, sink, scale, extra)


def attend_choice(
    kind: str, heads: int, head_dim: int, window: int, ours, lk, device, topk: int = 0
):
    """``ours`` alone where FlashMLA cannot run, else the per-shape choice of the two
    (``topk``: the c4 picks' width)."""
    if not flashmla_eligible(True, heads, head_dim, device) or lk.raw_rows.read_dtype != (
        torch.bfloat16
    ):
        return ours
    ratio = {"swa": 0, "csa": 4, "hca": 128}[kind]
    entry_page = lk.entry_rows.rows_per_page if lk.entry_rows is not None else 1
    flashmla = AttendFlashMLA(ratio, window, lk.fp8, lk.raw_rows.rows_per_page, entry_page,
                              head_dim, topk)  # fmt: skip
    return AttendChoice(kind, heads, window, ours, flashmla)
