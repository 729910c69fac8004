"""Compile the extend path's Triton kernels for Hopper (sm_90) on a machine without a GPU, at
Flash dims, in the variants ``attention/extend_ops.py`` launches: the query-tiled indexer logits
(FP8 keys with e4m3 or bf16 / fp32 queries, plain keys), the compressor flush with per-request
tail modes and boundary output (c4 main / indexer, c128; FP8 and bf16 rows). The KV store and
the top-k are the decode script's variants (``scripts/compile_decode_sm90.py``).

    PYTHONPATH=$PWD python scripts/compile_extend_sm90.py
"""

import os
import sys
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # before triton is imported: compiled jit functions
sys.path.insert(0, str(Path(__file__).resolve().parent))

from compile_decode_sm90 import flush_variants

from sglang_dsv4.kernels import indexer_extend
from sglang_dsv4.perf.sm90_compile import check_all


def tile_logits_variants():
    fn = indexer_extend._tile_logits_kernel
    types = dict(q_ptr="*bf16", w_ptr="*bf16", keys_ptr="*u8", bt_ptr="*i32",
                 tile_start_ptr="*i32", tile_len_ptr="*i32", qreq_ptr="*i32", pos_ptr="*i64",
                 logits_ptr="*fp32")  # fmt: skip
    base = dict(H=64, DH=128, BQ=4, BS=64, EPB=32, RATIO=4, RPP=32, KEYS=0, DOT_F32=False,
                Q_FP8=True)  # fmt: skip
    yield "indexer_extend fp8 keys, e4m3 q", fn, types, base, 8
    plain = dict(base, KEYS=1, Q_FP8=False)
    yield "indexer_extend bf16 keys", fn, dict(types, keys_ptr="*bf16"), plain, 8
    t32 = dict(types, q_ptr="*fp32", w_ptr="*fp32", keys_ptr="*fp32")
    yield "indexer_extend fp32", fn, t32, dict(plain, DOT_F32=True), 8
    yield (
        "indexer_extend fp8 keys, fp32 q",
        fn,
        dict(types, q_ptr="*fp32", w_ptr="*fp32"),
        dict(base, DOT_F32=True),
        8,
    )
    yield "indexer_extend 16 heads", fn, types, dict(base, H=16, BQ=16), 8


def extend_flush_variants():
    for name, fn, types, ce, warps in flush_variants():
        yield f"{name} (tail modes)", fn, types, dict(ce, HAS_MODE=True), warps


def main() -> int:
    """Compile every variant; the number that failed."""
    return check_all((*tile_logits_variants(), *extend_flush_variants()), tail=600)


if __name__ == "__main__":
    raise SystemExit(1 if main() else 0)
