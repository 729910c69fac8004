"""The sorted MoE form's grouping of (token, slot) pairs by expert as one or two Triton launches:
``chosen`` [T, k] (+ the shared row as slot k of every token) -> ``order`` int32 [P] (sorted
position -> pair ``t * slots + j``), ``offsets`` int32 [R + 1] (expert r's pairs are sorted
positions ``offsets[r]:offsets[r + 1]``) and ``weights`` fp32 [P] in token order (the shared
slot's weight 1), ``P = T * slots``.

``order`` is exactly the permutation of a stable sort of the pairs' expert ids and ``offsets``
exactly what ``searchsorted`` gives on the sorted ids, so everything downstream has the same
bits as with :func:`group_pairs_torch` (the twin and oracle: ``cat`` for the shared slot,
``torch.sort(stable=True)``, ``arange`` + ``searchsorted``, the casts -- the 8-10 launches per
MoE layer it replaces; cub's radix sort alone is 4 kernels at a decode step, 8 at an 8K-token
prefill chunk).

A counting sort: pair ``i`` of expert ``e`` goes to ``offsets[e]`` plus the number of pairs of
``e`` before it. Pairs are read in steps of ``SUB``: a step's ranks among its own pairs come
from a [SUB, SUB] comparison (no sort), the counts before the step from a per-expert running
count (``tl.histogram`` of the steps before, looked up with ``tl.gather``).

* decode (``P <= ONE_PROGRAM_MAX``): one program, one launch: the histogram of every pair, its
  exclusive prefix (the offsets), then the scatter;
* prefill: chunks of ``chunk`` pairs, two launches: each chunk's histogram into a table
  [chunks, RB], then per chunk the scatter, each program summing the table's rows (totals ->
  offsets, rows before its own -> its start per expert).

Buffers are sized from the shapes only and nothing is read back: no host sync, CUDA-graph safe.
Ids outside ``[0, R)`` (routers never emit them) are dropped: sorted after every expert's pairs,
past ``offsets[R]``, which the GEMM kernels never read (torch would sort negative ids first).
"""

from typing import NamedTuple

import torch
import triton
import triton.language as tl

__all__ = [
    "CHUNKS",
    "ONE_PROGRAM_MAX",
    "Grouping",
    "group_chunk",
    "group_pairs",
    "group_pairs_torch",
]

CHUNKS = (256, 512, 1024, 2048)  # chunk sizes the benchmark times
ONE_PROGRAM_MAX = 512
"""Most pairs grouped by one program (a decode step: batch 32 x 7 slots is 224): above it, the
two-launch chunked form spreads the pairs over the GPU. Measured (``scripts/bench_moe.py
--group``, H100, 2026-12-07, docs/gpu/lease_20261207c/moebench.txt): 224 pairs in one program
14.7 us; at 896 pairs one program 41.0 us, chunks of 256 18.5 us."""
SUB = 64  # pairs per scatter step: a [64, 64] rank comparison, 16 elements per thread
WARPS = 8  # sm_90: 118 registers at SUB 64 (4 warps: 239, next to the 255 limit)
_COUNT_MAX = 1024  # pairs per histogram step: 4 ids per thread
_TABLE_ROWS = 16  # histogram-table rows read per step by the scatter programs


class Grouping(NamedTuple):
    """The pairs grouped by expert (module docstring)."""

    order: torch.Tensor  # int32 [P]: sorted position -> pair t * slots + j
    offsets: torch.Tensor  # int32 [R + 1]
    weights: torch.Tensor  # fp32 [P], token order


@triton.jit
def _pair_bins(chosen_ptr, i, R, shared_row, TOPK: tl.constexpr, SLOTS: tl.constexpr):
    """Bin int32 of pairs ``i`` (t * SLOTS + j; masked by the caller): slot j < TOPK's expert id,
    past TOPK the shared row; ids outside [0, R) in bin R."""
    t = i // SLOTS
    j = i - t * SLOTS
    routed = j < TOPK
    e = tl.load(chosen_ptr + t * TOPK + j, mask=routed, other=0).to(tl.int32)
    e = tl.where(routed, e, shared_row)
    return tl.where((e >= 0) & (e < R), e, R)


@triton.jit
def _count(chosen_ptr, lo, hi, R, shared_row, TOPK: tl.constexpr, SLOTS: tl.constexpr,
           RB: tl.constexpr, SUB: tl.constexpr):  # fmt: skip
    """Pairs ``lo ... hi`` per bin -> int32 [RB], ``SUB`` pairs per step (the launchers pass
    the whole range, up to 1024 pairs: one load and one histogram, no serial steps)."""
    counts = tl.zeros((RB,), dtype=tl.int32)
    for s in range(lo, hi, SUB):
        i = s + tl.arange(0, SUB)
        b = _pair_bins(chosen_ptr, tl.minimum(i, hi - 1), R, shared_row, TOPK, SLOTS)
        counts += tl.histogram(b, RB, mask=i < hi)
    return counts


@triton.jit
def _place(chosen_ptr, weights_ptr, order_ptr, w_out_ptr, start, lo, hi, R, shared_row,
           TOPK: tl.constexpr, SLOTS: tl.constexpr, RB: tl.constexpr,
           SUB: tl.constexpr):  # fmt: skip
    """Scatter pairs ``lo ... hi`` in order: pair i of bin b to ``start[b]`` plus the pairs of b
    before it from ``lo`` (``start`` [RB]: each bin's first sorted position for pair ``lo``);
    copy their weights (fp32, 1 for the shared slot) in token order."""
    lane = tl.arange(0, SUB)
    b = _pair_bins(chosen_ptr, tl.minimum(lo + lane, hi - 1), R, shared_row, TOPK, SLOTS)
    for s in range(lo, hi, SUB):
        i = s + lane
        ok = i < hi
        ic = tl.minimum(i, hi - 1)  # lanes past hi repeat the last pair (never stored)
        # the next step's ids, loaded now: their latency overlaps this step's work
        b_next = _pair_bins(chosen_ptr, tl.minimum(i + SUB, hi - 1), R, shared_row, TOPK, SLOTS)
        # rank among this step's pairs of the same bin: earlier lanes only (stable)
        same = (b[:, None] == b[None, :]) & (lane[None, :] < lane[:, None])
        rank = tl.sum(same.to(tl.int32), axis=1)
        tl.store(order_ptr + tl.gather(start, b, 0) + rank, i, mask=ok)
        start += tl.histogram(b, RB, mask=ok)
        t = ic // SLOTS
        j = ic - t * SLOTS
        w = tl.load(weights_ptr + t * TOPK + j, mask=ok & (j < TOPK), other=1.0)
        tl.store(w_out_ptr + i, w.to(tl.float32), mask=ok)
        b = b_next


@triton.jit
def _group_one_kernel(chosen_ptr, weights_ptr, order_ptr, off_ptr, w_out_ptr, P, R, shared_row,
                      TOPK: tl.constexpr, SLOTS: tl.constexpr, RB: tl.constexpr,
                      SUB: tl.constexpr, COUNT: tl.constexpr):  # fmt: skip
    counts = _count(chosen_ptr, 0, P, R, shared_row, TOPK, SLOTS, RB, COUNT)
    offsets = tl.cumsum(counts, axis=0) - counts  # [RB]: pairs in lower bins
    bins = tl.arange(0, RB)
    tl.store(off_ptr + bins, offsets, mask=bins <= R)
    _place(chosen_ptr, weights_ptr, order_ptr, w_out_ptr, offsets, 0, P, R, shared_row, TOPK,
           SLOTS, RB, SUB)  # fmt: skip


@triton.jit
def _group_count_kernel(chosen_ptr, hist_ptr, P, R, shared_row, TOPK: tl.constexpr,
                        SLOTS: tl.constexpr, RB: tl.constexpr, COUNT: tl.constexpr,
                        CHUNK: tl.constexpr):  # fmt: skip
    c = tl.program_id(0)
    lo = c * CHUNK
    counts = _count(chosen_ptr, lo, tl.minimum(lo + CHUNK, P), R, shared_row, TOPK, SLOTS, RB,
                    COUNT)  # fmt: skip
    tl.store(hist_ptr + c * RB + tl.arange(0, RB), counts)


@triton.jit
def _group_place_kernel(chosen_ptr, weights_ptr, hist_ptr, order_ptr, off_ptr, w_out_ptr, P, R,
                        shared_row, chunks, TOPK: tl.constexpr, SLOTS: tl.constexpr,
                        RB: tl.constexpr, SUB: tl.constexpr, CHUNK: tl.constexpr,
                        ROWS: tl.constexpr):  # fmt: skip
    c = tl.program_id(0)
    bins = tl.arange(0, RB)
    total = tl.zeros((RB,), dtype=tl.int32)
    before = tl.zeros((RB,), dtype=tl.int32)  # pairs of each bin in the chunks before c
    for r0 in range(0, chunks, ROWS):
        rows = r0 + tl.arange(0, ROWS)
        ok = (rows < chunks)[:, None] & (bins <= R)[None, :]
        h = tl.load(hist_ptr + rows[:, None] * RB + bins[None, :], mask=ok, other=0)
        total += tl.sum(h, axis=0)
        before += tl.sum(tl.where((rows < c)[:, None], h, 0), axis=0)
    offsets = tl.cumsum(total, axis=0) - total
    tl.store(off_ptr + bins, offsets, mask=(bins <= R) & (c == 0))
    lo = c * CHUNK
    _place(chosen_ptr, weights_ptr, order_ptr, w_out_ptr, offsets + before, lo,
           tl.minimum(lo + CHUNK, P), R, shared_row, TOPK, SLOTS, RB, SUB)  # fmt: skip


def group_chunk(pairs: int) -> int:
    """Pairs per program of the chunked form: ~128 programs (about one per H100 SM; each
    scatter program also sums the whole histogram table, chunks x bins, so more is not free),
    256 to 2048 pairs. It picks the fastest of :data:`CHUNKS` at every measured size (H100,
    2026-12-07, ``bench_moe.py --group``): 896 pairs -> 256 (18.5 us; 512: 31.1), 24576 -> 256
    (14.6 us; 2048: 53.2), 57344 -> 512 (39.3 us; 256: 66.2)."""
    return min(max(triton.next_power_of_2(-(-pairs // 128)), 256), 2048)


def bins(n_rows: int) -> int:
    """Histogram bins: experts ``[0, R)`` and the drop bin ``R``, a power of two >= 32."""
    return max(32, triton.next_power_of_2(n_rows + 1))


def group_pairs(
    chosen: torch.Tensor,
    weights: torch.Tensor,
    n_rows: int,
    shared_row: int | None = None,
    chunk: int | None = None,
    out: Grouping | None = None,
) -> Grouping:
    """``chosen`` int [T, k] (ids in ``[0, n_rows)``), ``weights`` [T, k] (+ ``shared_row`` as
    slot k with weight 1) grouped by expert (module docstring), into ``out`` when given.
    ``chunk``: pairs per program of the chunked form (default: one program up to
    :data:`ONE_PROGRAM_MAX` pairs, else :func:`group_chunk`)."""
    t, topk = chosen.shape
    slots = topk + (shared_row is not None)
    pairs, dev = t * slots, chosen.device
    order, offsets, w_out = out or (
        torch.empty(pairs, dtype=torch.int32, device=dev),
        torch.empty(n_rows + 1, dtype=torch.int32, device=dev),
        torch.empty(pairs, dtype=torch.float32, device=dev),
    )
    if pairs == 0:
        offsets.zero_()
        return Grouping(order, offsets, w_out)
    chunk = chunk or (pairs if pairs <= ONE_PROGRAM_MAX else group_chunk(pairs))
    args = dict(
        chosen_ptr=chosen.contiguous(), weights_ptr=weights.contiguous(), order_ptr=order,
        w_out_ptr=w_out, P=pairs, R=n_rows, shared_row=-1 if shared_row is None else shared_row,
        TOPK=topk, SLOTS=slots, RB=bins(n_rows), SUB=SUB, num_warps=WARPS,
    )  # fmt: skip
    if chunk >= pairs:
        count = min(triton.next_power_of_2(pairs), _COUNT_MAX)
        _group_one_kernel[(1,)](off_ptr=offsets, COUNT=count, **args)
        return Grouping(order, offsets, w_out)
    chunk = max(SUB, triton.next_power_of_2(chunk))
    n = triton.cdiv(pairs, chunk)
    hist = torch.empty(n, args["RB"], dtype=torch.int32, device=dev)  # [chunks, RB]
    skip = ("weights_ptr", "order_ptr", "w_out_ptr", "SUB")
    count = {k: v for k, v in args.items() if k not in skip}
    _group_count_kernel[(n,)](hist_ptr=hist, CHUNK=chunk, COUNT=min(chunk, _COUNT_MAX), **count)
    _group_place_kernel[(n,)](
        hist_ptr=hist, off_ptr=offsets, chunks=n, CHUNK=chunk, ROWS=_TABLE_ROWS, **args
    )
    return Grouping(order, offsets, w_out)


def group_pairs_torch(
    chosen: torch.Tensor, weights: torch.Tensor, n_rows: int, shared_row: int | None = None
) -> Grouping:
    """The twin: the torch ops :func:`group_pairs` replaces (module docstring)."""
    t = chosen.shape[0]
    chosen, weights = chosen.long(), weights.float()
    if shared_row is not None:  # the shared expert: one more slot of every token, weight 1
        chosen = torch.cat([chosen, chosen.new_full((t, 1), shared_row)], dim=1)
        weights = torch.cat([weights, weights.new_ones(t, 1)], dim=1)
    # group r starts at the first sorted id >= r (searchsorted, not bincount: bincount sizes its
    # output from the data and syncs)
    sorted_ids, order = torch.sort(chosen.reshape(-1), stable=True)  # [P]
    bounds = torch.arange(n_rows + 1, device=chosen.device, dtype=sorted_ids.dtype)
    offsets = torch.searchsorted(sorted_ids, bounds).to(torch.int32)  # [R + 1]
    return Grouping(order.to(torch.int32), offsets, weights.reshape(-1).contiguous())
