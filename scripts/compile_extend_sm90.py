"""Compile the extend path's Triton kernels for Hopper (sm_90) on a machine without a GPU, at
Flash dims, in the variants ``attention/extend_ops.py`` launches: the query-tiled indexer logits
(FP8 keys with e4m3 or bf16 / fp32 queries, plain keys), the compressor flush with per-request
tail modes and boundary output (c4 main / indexer, c128; FP8 and bf16 rows). The KV store and
the top-k are the decode script's variants (``scripts/compile_decode_sm90.py``).

    PYTHONPATH=$PWD python scripts/compile_extend_sm90.py
    PYTHONPATH=$PWD python scripts/compile_extend_sm90.py --topk-shapes

``--topk-shapes``: the extend select's launch candidates (``kernels.topk_shapes``) at the served
row widths (4K-64K prompts: 1024-16384 entries, top-512), each with its registers / spills and
the SASS instructions of each loop's trip (radix: the four histogram passes and the write, per
step of ``chunk`` entries; rows: one bisection step over the whole row, then the write per
``chunk`` entries); exits 1 when one spills.
"""

import os
import sys
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # before triton is imported: compiled jit functions
sys.path.insert(0, str(Path(__file__).resolve().parent))

from compile_decode_sm90 import flush_variants

from sglang_dsv4.kernels import indexer, indexer_extend, topk_rows
from sglang_dsv4.kernels.topk_shapes import candidates
from sglang_dsv4.perf.sm90_compile import build, check_all, resource_usage, sass_loops


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
    # plain fp32 keys under bf16 queries: fp32 dots (a bf16 MMA would round the keys)
    f32_keys = dict(types, keys_ptr="*fp32")
    yield "indexer_extend fp32 keys, bf16 q", fn, f32_keys, dict(plain, DOT_F32=True), 8
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


def topk_variants():
    """``(name, fn, types, constexprs, warps)`` of every select candidate at the served widths,
    as ``IndexerExtend`` launches them."""
    types = dict(logits_ptr="*fp32", qreq_ptr="*i32", pos_ptr="*i64", bt_ptr="*i32",
                 ids_ptr="*i32", rows_ptr="*i32", len_ptr="*i32")  # fmt: skip
    base = dict(K=512, RATIO=4, EPB=32, KCHUNK=512, WRITE_ROWS=True)
    for ld in (1024, 2048, 4096, 8192, 16384):
        for s in candidates(ld):
            if s.kind == "radix":
                yield f"ld {ld} {s}", indexer._topk_kernel, types, dict(base, CHUNK=s.chunk), 8
            else:
                ce = dict(base, ROW=ld, WCHUNK=s.chunk)
                yield f"ld {ld} {s}", topk_rows._rows_topk_kernel, types, ce, s.warps


def topk_shapes() -> int:
    """Registers and loop sizes of every select candidate (module docstring); how many spill."""
    spills = 0
    for name, fn, types, ce, warps in topk_variants():
        k = build(fn, types, ce, warps, divisible=("ld",))
        usage = resource_usage(k)
        spills += "STACK:0 " not in usage or "LOCAL:0" not in usage
        print(f"{name}: {usage} loop trips {sass_loops(k)}", flush=True)
    return spills


def main() -> int:
    """Compile every variant; the number that failed."""
    if "--topk-shapes" in sys.argv[1:]:
        return topk_shapes()
    variants = (*tile_logits_variants(), *extend_flush_variants(), *topk_variants())
    return check_all(variants, tail=600)


if __name__ == "__main__":
    raise SystemExit(1 if main() else 0)
