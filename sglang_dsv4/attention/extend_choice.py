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
from sglang_dsv4.attention.plan_tables import ENTRY_RATIOS, ragged
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
    prefill (None: ``sgl_kernel``'s; the CPU tests give its ``ref`` twin); ``lists``: the
    builder of the index lists and entry rows (None: :func:`lists_torch`)."""

    reads_rows = False  # its lists are planned (c4: the picks' ids), no extra rows read

    def __init__(
        self, ratio: int, window: int, fp8: bool, raw_page: int, entry_page: int, dim: int = 512,
        topk: int = 0, fwd=None, lists=None,
    ):  # fmt: skip
        if ratio == 4 and topk <= 0:  # the picks need their columns in the lists
            raise ValueError("a c4 layer's FlashMLA lists need the picks' width (topk)")
        if fwd is None:
            from sgl_kernel.flash_mla import flash_mla_sparse_fwd as fwd
        self._fwd = fwd
        self._build_lists = lists or lists_torch  # the kernel on the GPU (attend_choice)
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
        """The workspace layout and every query's index list from the plan's tables (no host
        tensor, no copy; ``lists``: one launch on the GPU): request ``b``'s entries at its
        entry start, then every request's window rows (positions ``window_lo .. S-1``), in the
        order of the plan's ``window_slots``. c4: ``picks_into`` is the lists' ``topk`` columns
        for the picks op (``PickLists``)."""
        reqs, t = batch.requests, batch.tables
        self._plan = batch
        starts = None
        total_ent = max_ent = 0
        if self.ratio:  # SWA: no entries
            starts = t.entry_start[ENTRY_RATIOS.index(self.ratio)]  # [B+1] int32
            total_ent = sum(r.seq_len // self.ratio for r in reqs)  # host ints
            max_ent = max((r.seq_len // self.ratio for r in reqs), default=0)
        window = t.window_ids.shape[1]
        fixed = window + (extra_width if self.ratio == 128 else 0)  # window + c128 entries
        width = fixed + self.topk
        self._lists, self._ent_rows = self._build_lists(
            t, starts, ratio=self.ratio, entries_per_block=self._pages[1], total_ent=total_ent,
            max_ent=max_ent, extra=extra_width, topk=self.topk, width=width + (-width % _ALIGN),
        )  # fmt: skip
        self._raw_rows = t.window_slots  # [NW] swa slots
        self.n_kv = total_ent + self._raw_rows.numel()
        self.picks_into = (
            PickLists(self._lists[:, 0, fixed : fixed + self.topk], starts[:-1])
            if self.topk
            else None
        )
        self._workspace = torch.empty(self.n_kv, 1, self.dim, dtype=torch.bfloat16,
                                      device=t.positions.device)  # fmt: skip

    def run(self, q, lk, window, sink, scale, extra: Picks | None = None):
        """Two launches: the workspace's rows (``kv_gather``), FlashMLA. c4: the picks op has
        written this layer's picks into the lists (``picks_into``); ``extra`` is not read."""
        ws = self._workspace
        self._gather(ent_cache=lk.entries, ent_rows=self._ent_rows, raw_cache=lk.raw,
                     raw_rows=self._raw_rows, out=ws)  # fmt: skip
        out, _, _ = self._fwd(q, ws, self._lists, scale, self.dim, sink.float(), None)
        return out


def lists_torch(t, starts, *, ratio, entries_per_block, total_ent, max_ent, extra, topk, width):
    """The torch form of :func:`~sglang_dsv4.kernels.flashmla_lists.flashmla_lists` (its
    signature): ``(lists [T, 1, width] int32, entry rows [total_ent] int64)``."""
    device = t.positions.device
    ent_rows = torch.empty(0, dtype=torch.long, device=device)
    window = t.window_ids  # [T, W]
    if total_ent:
        # entry i of request b is row block_table[b, i // epb] * epb + i % epb (epb = entries
        # per block = rows per entry page), i.e. slot(i*r) // r as extend_ops._entry_rows reads it
        epb, start = entries_per_block, starts[:-1].long()
        req, i = ragged(starts[1:].long() - start, torch.zeros_like(start), total_ent)
        ent_rows = t.block_table[req, i // epb].long() * epb + i % epb  # [NE]
        window = torch.where(window >= 0, window + total_ent, -1)  # the window rows: after
    if ratio == 128:  # every visible entry
        e = torch.arange(extra, device=device)
        vis = e < (t.positions.unsqueeze(1) + 1) // ratio  # [T, E]
        base = starts[t.query_req.long()].unsqueeze(1)
        window = torch.cat([window, torch.where(vis, base + e, -1)], 1)
    lists = window.new_full((window.shape[0], 1, width), -1, dtype=torch.int32)
    lists[:, 0, : window.shape[1]] = window
    return lists, ent_rows


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
    from sglang_dsv4.kernels.flashmla_lists import flashmla_lists

    flashmla = AttendFlashMLA(ratio, window, lk.fp8, lk.raw_rows.rows_per_page, entry_page,
                              head_dim, topk, lists=flashmla_lists)  # fmt: skip
    return AttendChoice(kind, heads, window, ours, flashmla)
