"""Launch shapes of the sorted (grouped-GEMM) MoE kernels of
:mod:`~sglang_dsv4.kernels.moe_sorted`, picked per call from measured times kept here.

Each of the two kernels (``w13``: x @ [w1; w3] with the SwiGLU epilogue, two fp32 accumulators;
``w2``: h @ w2 with the routing-weight epilogue) has its own :class:`GemmTiles`: M block (sorted
pairs of one expert per program), N and K tiles, warps, pipeline stages and raster order. The
raster matters as much as the tile at prefill sizes: with M blocks as the fast axis (``n_fast``
False, the original order) every N tile re-reads every pair's row (at 8K tokens x 3 slots the
w13 kernel gathers 200 MB of x once per N tile, more than L2 holds); with N tiles as the fast
axis a block's rows stay in L2 across its N tiles and one expert's weights (16 MB for w13 at
the served shape) across its blocks.

:func:`sorted_tiles` is a pure function of (pair count, format): below the smallest pair count
measured for a (format, kernel), and for formats never measured, the tiles the kernels always
ran with (:data:`DEFAULT`); from it, the tiles of the measured row with the largest pair count
not above the call's. The rows come from ``python scripts/bench_moe.py --sorted`` (H100, served
shape: 16 experts + shared, top-2, d 4096, I 1024), which times every :data:`CANDIDATES` entry
per kernel and prints the winners as rows to paste into :data:`MEASURED`.
"""

from typing import NamedTuple

__all__ = [
    "CANDIDATES",
    "DEFAULT",
    "MEASURED",
    "GemmTiles",
    "SortedTiles",
    "sorted_tiles",
    "tile_format",
]


class GemmTiles(NamedTuple):
    """One sorted kernel's launch shape (module docstring)."""

    block_m: int
    block_n: int = 64
    block_k: int = 64
    warps: int = 8
    stages: int = 3
    n_fast: bool = False


class SortedTiles(NamedTuple):
    """The tiles of both sorted kernels of one call."""

    w13: GemmTiles
    w2: GemmTiles


KERNELS = ("w13", "w2")

# (largest pair count, tiles) in increasing order, the last without bound: the tiles the sorted
# kernels ran with before any measurement. M block 16 up to 512 pairs keeps a decode-sized
# batch's few pairs per expert from running mostly-masked blocks.
DEFAULT: tuple[tuple[int | None, GemmTiles], ...] = (
    (512, GemmTiles(16)),
    (4096, GemmTiles(32)),
    (None, GemmTiles(64)),
)

# Candidates timed by ``scripts/bench_moe.py --sorted`` at large pair counts, per kernel. Each
# compiles for sm_90a (wgmma, cp.async pipelined) without register spills and fits shared memory
# in bf16 and FP8 (``scripts/compile_moe_sm90.py --sorted``, 2026-12-06: at most 255 registers,
# 0 bytes of stack; none dropped). The first is today's large-T tile.
# (M, N, K, warps, stages, N tiles fast) beyond today's large-T tile in both raster orders
_BEYOND = {
    "w13": ((128, 64, 64, 8, 4, True), (128, 64, 128, 8, 3, True), (64, 128, 64, 8, 4, True),
            (128, 128, 64, 8, 3, True), (128, 64, 64, 4, 4, True)),
    "w2": ((128, 128, 64, 8, 4, True), (128, 128, 128, 8, 3, True), (128, 128, 64, 4, 4, True),
           (128, 256, 64, 8, 3, True)),
}  # fmt: skip
CANDIDATES: dict[str, tuple[GemmTiles, ...]] = {
    k: (GemmTiles(64), GemmTiles(64, n_fast=True), *(GemmTiles(*t) for t in more))
    for k, more in _BEYOND.items()
}

# (format, kernel, pair count, tiles, us): the fastest candidate at that pair count, pasted from
# ``scripts/bench_moe.py --sorted`` (date and GPU in the comment above each run's rows).
MEASURED: tuple[tuple[str, str, int, GemmTiles, float], ...] = (
    # 2026-12-07, NVIDIA H100 80GB HBM3: scripts/bench_moe.py --sorted (served shape; 8192
    # tokens = 24576 pairs: the w13 + w2 kernels 2112 us with the default tiles -> 1139 us)
    ("bf16", "w13", 12288, GemmTiles(128, 128, 64, 8, 3, True), 381.6),
    ("bf16", "w13", 24576, GemmTiles(128, 128, 64, 8, 3, True), 743.9),
    ("bf16", "w13", 49152, GemmTiles(128, 128, 64, 8, 3, True), 1357.7),
    ("bf16", "w2", 12288, GemmTiles(128, 256, 64, 8, 3, True), 211.2),
    ("bf16", "w2", 24576, GemmTiles(128, 256, 64, 8, 3, True), 395.0),
    ("bf16", "w2", 49152, GemmTiles(128, 256, 64, 8, 3, True), 763.2),
    ("fp8", "w13", 12288, GemmTiles(128, 64, 64, 8, 4, True), 605.1),
    ("fp8", "w13", 24576, GemmTiles(128, 64, 64, 4, 4, True), 1081.9),
    ("fp8", "w13", 49152, GemmTiles(128, 64, 64, 4, 4, True), 2071.0),
    ("fp8", "w2", 12288, GemmTiles(128, 128, 64, 8, 4, True), 296.5),
    ("fp8", "w2", 24576, GemmTiles(128, 128, 64, 4, 4, True), 568.0),
    ("fp8", "w2", 49152, GemmTiles(128, 128, 64, 4, 4, True), 1074.3),
)


def tile_format(fmt: str, dtype_name: str) -> str:
    """The table's format key of a bank format (``dense`` banks by activation dtype:
    ``bf16`` / ``fp16`` / ``fp32``)."""
    return dtype_name if fmt == "dense" else fmt


def _pick(pairs: int, fmt: str, kernel: str, measured) -> GemmTiles:
    rows = [r for r in measured if r[0] == fmt and r[1] == kernel and r[2] <= pairs]
    if rows:
        return max(rows, key=lambda r: r[2])[3]
    return next(t for bound, t in DEFAULT if bound is None or pairs <= bound)


def sorted_tiles(pairs: int, fmt: str, measured=None) -> SortedTiles:
    """Tiles of both sorted kernels for ``pairs`` (token, slot) pairs of a bank in format key
    ``fmt`` (:func:`tile_format`), from ``measured`` (default :data:`MEASURED`; module
    docstring)."""
    measured = MEASURED if measured is None else measured
    return SortedTiles(*(_pick(pairs, fmt, k, measured) for k in KERNELS))
