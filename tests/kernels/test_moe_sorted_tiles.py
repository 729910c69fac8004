"""``kernels.moe_sorted_tiles``: the pick of the sorted kernels' tiles from the measured table
(defaults below the smallest measured pair count and for unmeasured formats, the largest
measured pair count not above the call's otherwise, per kernel), the table's own rows, and
that every tile compiles for sm_90 without spills."""

import os
import subprocess
import sys
from pathlib import Path

from sglang_dsv4.kernels.moe_sorted_tiles import (
    CANDIDATES,
    DEFAULT,
    MEASURED,
    GemmTiles,
    sorted_tiles,
    tile_format,
)

BIG13 = GemmTiles(128, 64, 64, 8, 4, True)
BIG2 = GemmTiles(128, 128, 64, 8, 4, True)
ROWS = (
    ("bf16", "w13", 12288, BIG13, 500.0),
    ("bf16", "w2", 24576, BIG2, 400.0),
    ("bf16", "w13", 49152, GemmTiles(128, 128, 64, 8, 3, True), 1900.0),
)


def test_defaults_are_todays_tiles_by_pair_count():
    picks = {p: sorted_tiles(p, "bf16", measured=()) for p in (1, 512, 513, 4096, 4097, 10**6)}
    assert [picks[p].w13.block_m for p in sorted(picks)] == [16, 16, 32, 32, 64, 64]
    assert all(t.w13 == t.w2 for t in picks.values())
    assert picks[10**6].w13 == GemmTiles(64, 64, 64, 8, 3, False) == DEFAULT[-1][1]


def test_measured_rows_apply_from_their_pair_count_per_kernel_and_format():
    below = sorted_tiles(12287, "bf16", measured=ROWS)
    assert below == sorted_tiles(12287, "bf16", measured=())  # not measured down there
    mid = sorted_tiles(20000, "bf16", measured=ROWS)
    assert mid.w13 == BIG13 and mid.w2 == GemmTiles(64)  # w2 measured from 24576 only
    top = sorted_tiles(10**6, "bf16", measured=ROWS)
    assert top.w13 == ROWS[2][3] and top.w2 == BIG2
    assert sorted_tiles(10**6, "fp8", measured=ROWS).w13 == GemmTiles(64)  # other format


def test_table_rows_are_compile_checked_candidates():
    """Every MEASURED row names a candidate of its kernel (those the compile script checks for
    spills), a known format, and a pair count above the default bounds it overrides."""
    for fmt, kernel, pairs, tiles, us in MEASURED:
        assert fmt in ("bf16", "fp16", "fp32", "fp8", "mxfp4", "nvfp4") and us > 0
        assert tiles in CANDIDATES[kernel] and pairs > 0
    assert sorted_tiles(10**6, "fp32").w13 == DEFAULT[-1][1]  # fp32: never measured


def test_tile_format_keys_dense_banks_by_dtype():
    assert tile_format("dense", "bf16") == "bf16"
    assert tile_format("dense", "fp32") == "fp32"
    assert tile_format("fp8", "bf16") == "fp8"


def test_every_sorted_tile_compiles_for_sm90_without_spills():
    """``scripts/compile_moe_sm90.py --sorted`` (Triton's compile-only path to an sm_90 cubin,
    with the launcher's alignment hints): no candidate, default or measured tile spills
    registers or overflows shared memory (a subprocess: this one's kernels are interpreted)."""
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=str(root))
    run = subprocess.run([sys.executable, str(root / "scripts/compile_moe_sm90.py"), "--sorted"],
                         capture_output=True, text=True, env=env, timeout=600)  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.count("_sorted_w") >= sum(map(len, CANDIDATES.values()))
    assert run.stdout.rstrip().endswith("spill or do not fit:\n  none"), run.stdout[-2000:]
