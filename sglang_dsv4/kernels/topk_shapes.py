"""Launch shapes of the extend indexer's exact top-k (``IndexerExtend``'s select), picked in
``plan()`` from measured times kept here.

Two kernels give the same picks in the same order (``tests/kernels/test_topk_rows.py``):

* ``radix``: ``kernels.indexer._topk_kernel`` (four 8-bit histogram passes over the row, then a
  write pass), ``chunk`` entries a loop step, 8 warps; what the extend always ran;
* ``rows``: ``kernels.topk_rows._rows_topk_kernel`` (the row in registers, bisection on the
  order keys' bits), ``warps`` warps, for rows of at most :data:`MAX_ROW` entries.

On sm_90 (``scripts/compile_extend_sm90.py --topk-shapes``), per 8K-entry row of the served 32K
chunk: radix ~110K warp instructions, 148 registers (one program per SM); rows at 8 warps ~35K,
80 registers (three per SM). Which is faster where is measured, not assumed:
``python scripts/bench_kv_kernels.py --only tsweep`` times every :func:`candidates` entry at
the last 8192-query chunk of 4K-64K prompts, checks each one's ids / rows / lengths against the
default's bit for bit, and prints the fastest per shape as rows to paste into :data:`MEASURED`.

:func:`select_shape` is a pure function of (the plan's row width ``ld``, top-k): for keys never
measured and below the smallest measured width, :func:`default_shape`; else the shape of the
measured row with the largest width not above ``ld`` that can run it (a ``rows`` shape only up
to :data:`MAX_ROW` entries).
"""

from typing import NamedTuple

from triton import next_power_of_2

__all__ = ["MAX_ROW", "MEASURED", "SelectShape", "candidates", "default_shape", "select_shape"]

MAX_ROW = 16384  # entries of a row the ``rows`` kernel holds (registers; its packed scan's bound)


class SelectShape(NamedTuple):
    """One launch of the select: ``kind`` "radix" or "rows", its warps, and its loop step in
    entries (radix: every pass's; rows: the write's, after the search over the whole row)."""

    kind: str
    warps: int = 8
    chunk: int = 2048


def radix_chunk(ld: int) -> int:
    """The radix select's loop step for rows of ``ld`` entries: as wide as the row up to 2048
    (a pass counts whole steps, masked entries included), 256 at least."""
    return min(2048, max(256, next_power_of_2(ld)))


def default_shape(ld: int) -> SelectShape:
    """The select before any measurement: the radix kernel, 8 warps."""
    return SelectShape("radix", 8, radix_chunk(ld))


def fits(shape: SelectShape, ld: int) -> bool:
    """Whether ``shape`` can select over rows of ``ld`` entries."""
    return shape.kind == "radix" or ld <= MAX_ROW


def candidates(ld: int) -> tuple[SelectShape, ...]:
    """The shapes the sweep times at row width ``ld``, the default first: the radix kernel at a
    2048 step too (before rows were narrower), the rows kernel at 2 to 16 warps (4 to 64 entries
    of the row per thread; its write 4 entries per thread a step)."""
    out = [default_shape(ld)]
    if out[0].chunk != 2048:
        out.append(SelectShape("radix", 8, 2048))
    if ld <= MAX_ROW:
        row = next_power_of_2(ld)
        out += [SelectShape("rows", w, 128 * w) for w in (2, 4, 8, 16)
                if 4 <= row // (32 * w) <= 64]  # fmt: skip
    return tuple(out)


# (ld, topk, shape, us): the fastest candidate at that row width, pasted from
# ``scripts/bench_kv_kernels.py --only tsweep`` (date and GPU in a comment above each run).
MEASURED: tuple[tuple[int, int, SelectShape, float], ...] = (
    # 2026-12-07, NVIDIA H100 80GB HBM3: scripts/bench_kv_kernels.py --only tsweep (the last
    # 8192-query chunk of a ctx = 4 * ld prompt; every candidate's picks == the default's).
    # us of the radix default (w8, chunk 2048) at the same rows: 221.6 / 606.9 / 1284.7 /
    # 2397.5 / 4497.0 (docs/gpu/lease_20261207b/bench_topk.txt)
    (1024, 512, SelectShape("rows", 2, 256), 26.1),  # ctx 4096
    (2048, 512, SelectShape("rows", 2, 256), 81.9),  # ctx 8192
    (4096, 512, SelectShape("rows", 2, 256), 200.6),  # ctx 16384
    (8192, 512, SelectShape("rows", 4, 512), 438.3),  # ctx 32768
    (16384, 512, SelectShape("rows", 8, 1024), 1061.4),  # ctx 65536
)


def select_shape(ld: int, topk: int, measured=None) -> SelectShape:
    """The select's shape for rows of ``ld`` entries and ``topk`` picks (module docstring);
    ``measured`` defaults to :data:`MEASURED`."""
    rows = [r for r in (MEASURED if measured is None else measured)
            if r[1] == topk and r[0] <= ld and fits(r[2], ld)]  # fmt: skip
    return max(rows, key=lambda r: r[0])[2] if rows else default_shape(ld)
