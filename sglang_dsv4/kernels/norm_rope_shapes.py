"""Launch shapes of :func:`~sglang_dsv4.kernels.norm_rope.rms_rope_` (rows per program, warps),
picked per call from measured times kept here.

A program of ``_rms_rope_kernel`` owns ``rows`` (token, head) rows. With the norm it loads
whole head rows (D channels), without only their last 64 channels (128 bytes of bf16 per row):
at the served prefill (8K tokens x 64 heads) the default shapes run ~2x off HBM bandwidth for
the q norm + RoPE [T, 64, 512] and read only 4-8 KB per program, so more rows or other warp
counts per program may be faster; at decode (T 1: 64 rows) fewer rows spread over more SMs.

Every candidate gives the default's bits on 2-byte activations (bf16, what the model serves).
Without the norm each element's RoPE is the same arithmetic whatever the layout. With it the
row's sum of squares is a ``tl.sum`` whose order is the register layout's: the D = 512
candidates keep the default's layout of a row -- 8 contiguous channels per thread (16-byte
loads: rows x 512 / (32 x warps) >= 8, i.e. rows >= warps / 2), 32 lanes, 2 warps across the
row (warps >= 2) -- so the same adds in the same order (the sm_90 layouts:
``scripts/compile_ops_sm90.py --rope-shapes``; the bits: the GPU tests of
``tests/kernels/test_norm_rope_shapes.py``). fp32 loads (4 channels per thread) lay rows out
otherwise, so other dtypes always run the default.

:func:`rope_shape` is a pure function of (rows of the call, D, norm): below the smallest row
count measured for (D, norm), and for keys never measured, :func:`default_shape` (the shape the
kernel always ran with); from it, the shape of the measured row with the largest row count not
above the call's. Rows come from ``python scripts/bench_ops.py --rope-shapes`` (H100, the three
served uses: q norm + RoPE D 512, the output's inverse RoPE D 512, the indexer's RoPE D 128, 64
heads), which times every :data:`CANDIDATES` entry and prints the winners as rows to paste into
:data:`MEASURED`.
"""

from typing import NamedTuple

__all__ = ["CANDIDATES", "MEASURED", "RopeShape", "default_shape", "rope_shape"]


class RopeShape(NamedTuple):
    """(token, head) rows per program and warps of one ``_rms_rope_kernel`` launch."""

    rows: int
    warps: int = 4


def default_shape(d: int, norm: bool) -> RopeShape:
    """The shape the kernel ran with before any measurement: 2048 channels per program with the
    norm (4 rows of 512), 32 rows of 64 RoPE channels without."""
    return RopeShape(max(1, 2048 // d) if norm else 32, 4)


# (D, norm) -> shapes timed by the bench, the default first. D 512 with norm: rows >= warps / 2
# and warps >= 2 (module docstring: the default's reduction layout). Without the norm: fewer
# rows for decode, more for prefill (a row is 128 bytes).
_ROPE_ONLY = tuple(RopeShape(*s) for s in ((32, 4), (8, 1), (16, 2), (16, 4), (64, 4), (64, 8),
                                           (128, 4), (128, 8), (256, 8)))  # fmt: skip
CANDIDATES: dict[tuple[int, bool], tuple[RopeShape, ...]] = {
    (512, True): tuple(RopeShape(*s) for s in ((4, 4), (1, 2), (2, 2), (2, 4), (4, 2), (4, 8),
                                               (8, 4), (8, 8), (16, 8), (16, 16))),
    (512, False): _ROPE_ONLY,
    (128, False): _ROPE_ONLY,
}  # fmt: skip

# (D, norm, rows of the call (T x H), shape, us): the fastest candidate at that row count,
# pasted from ``scripts/bench_ops.py --rope-shapes`` (date and GPU in a comment above each run).
MEASURED: tuple[tuple[int, bool, int, RopeShape, float], ...] = (
    # 2026-12-07, NVIDIA H100 80GB HBM3: scripts/bench_ops.py --rope-shapes (q norm + RoPE at
    # T = 8192 x 64 heads: 741 -> 617 us; the output's inverse RoPE 62 -> 58 us)
    (128, False, 64, RopeShape(16, 4), 2.1),
    (128, False, 2048, RopeShape(16, 4), 2.4),
    (128, False, 8192, RopeShape(16, 2), 3.1),
    (128, False, 65536, RopeShape(16, 4), 7.9),
    (128, False, 524288, RopeShape(16, 4), 56.1),
    (512, False, 64, RopeShape(16, 4), 2.2),
    (512, False, 2048, RopeShape(16, 4), 2.7),
    (512, False, 8192, RopeShape(16, 4), 2.7),
    (512, False, 65536, RopeShape(16, 4), 7.9),
    (512, False, 524288, RopeShape(16, 4), 57.8),
    (512, True, 64, RopeShape(1, 2), 2.7),
    (512, True, 2048, RopeShape(1, 2), 4.8),
    (512, True, 8192, RopeShape(1, 2), 11.9),
    (512, True, 65536, RopeShape(1, 2), 81.2),
    (512, True, 524288, RopeShape(1, 2), 617.2),
)


def rope_shape(n_rows: int, d: int, norm: bool, two_byte: bool, measured=None) -> RopeShape:
    """The launch shape of ``rms_rope_`` over ``n_rows`` (token, head) rows of head dim ``d``
    (module docstring): the default unless the activations are ``two_byte`` (bf16 / fp16);
    ``measured`` defaults to :data:`MEASURED`."""
    measured = (MEASURED if measured is None else measured) if two_byte else ()
    rows = [r for r in measured if r[0] == d and r[1] == norm and r[2] <= n_rows]
    return max(rows, key=lambda r: r[2])[3] if rows else default_shape(d, norm)
