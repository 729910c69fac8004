"""Compile the extend path's Triton kernels for Hopper (sm_90) on a machine without a GPU, at
Flash dims, in the variants ``attention/extend_ops.py`` launches: the query-tiled indexer logits
(FP8 keys with e4m3 or bf16 / fp32 queries, plain keys), the compressor flush with per-request
tail modes and boundary output (c4 main / indexer, c128; FP8 and bf16 rows), the top-k selects
(into their buffers or FlashMLA's lists) and FlashMLA's workspace gather (``kv_gather``). The
KV store and the decode top-k are the decode script's (``scripts/compile_decode_sm90.py``).

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

from sglang_dsv4.kernels import (
    extend_meta,
    flashmla_lists,
    indexer,
    indexer_extend,
    kv_gather,
    topk_rows,
)
from sglang_dsv4.kernels.kv_store import FP8RowLayout
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
                 ids_ptr="*i32", rows_ptr="*i32", len_ptr="*i32", base_ptr="*i32")  # fmt: skip
    base = dict(K=512, RATIO=4, EPB=32, KCHUNK=512, WRITE_ROWS=True, REBASE=False)
    # FlashMLA serving the batch: the picks rebased straight into its lists, no rows
    lists = dict(base, WRITE_ROWS=False, REBASE=True)
    for ld in (1024, 2048, 4096, 8192, 16384):
        for s in candidates(ld):
            for tag, ce in (("", base), (" into lists", lists)):
                if s.kind == "radix":
                    yield f"ld {ld} {s}{tag}", indexer._topk_kernel, types, \
                        dict(ce, CHUNK=s.chunk), 8  # fmt: skip
                else:
                    yield f"ld {ld} {s}{tag}", topk_rows._rows_topk_kernel, types, \
                        dict(ce, ROW=ld, WCHUNK=s.chunk), s.warps  # fmt: skip


def gather_variants():
    """``kv_gather``'s workspace gather: FP8 pools (c4: entry pages of 32 rows, c128: of 1;
    raw pages of 128 and 256 rows) and plain bf16 rows, int64 entry rows, int32 / int64 raw."""
    fn = kv_gather._gather_rows_kernel
    fp8 = dict(ent_ptr="*u8", ent_rows_ptr="*i64", raw_ptr="*u8", raw_rows_ptr="*i32",
               out_ptr="*bf16")  # fmt: skip
    for ent_page, raw_page in ((32, 128), (1, 128), (64, 256)):
        ce = dict(ENT_PAGE=ent_page, RAW_PAGE=raw_page, NOPE=448, ROPE=64, TILES=8, FP8=True,
                  ENT_PAGE_BYTES=FP8RowLayout.paged(ent_page).page_bytes,
                  RAW_PAGE_BYTES=FP8RowLayout.paged(raw_page).page_bytes)  # fmt: skip
        yield f"kv_gather fp8 pages {ent_page}/{raw_page}", fn, fp8, ce, 4
        yield f"kv_gather fp8 pages {ent_page}/{raw_page} i64", fn, dict(
            fp8, raw_rows_ptr="*i64"), ce, 4  # fmt: skip
    plain = dict(fp8, ent_ptr="*bf16", raw_ptr="*bf16")
    ce = dict(ENT_PAGE=1, RAW_PAGE=1, ENT_PAGE_BYTES=0, RAW_PAGE_BYTES=0, NOPE=512, ROPE=0,
              TILES=512, FP8=False)  # fmt: skip
    yield "kv_gather bf16 rows", fn, plain, ce, 4


def plan_variants():
    """The extend plan's two kernels (``kernels.extend_meta``, ``kernels.flashmla_lists``) as
    the plan launches them: window 128, blocks of 128, with and without compressors, the full
    -> swa map int64 (SGLang's) or int32; FlashMLA's lists for SWA / c4 / c128."""
    fn = extend_meta._extend_meta_kernel
    types = {a: "*i32" for a in fn.arg_names if a.endswith("_ptr")}
    types |= {a: "*i64" for a in ("tail_pos_ptr", "positions_ptr", "window_ids_ptr",
                                   "window_slots_ptr", "last_page_ptr", "f2s_ptr")}  # fmt: skip
    types["flags_ptr"] = "*i1"
    ce = dict(W=128, WB=128, HB=128, BLOCK=128, TT=16, CH=256, BB=64)
    for compressed in (True, False):
        for f2s in ("*i64", "*i32"):
            t = dict(types, f2s_ptr=f2s, window_slots_ptr=f2s)
            yield f"extend meta compressed={compressed} map={f2s}", fn, t, \
                dict(ce, COMPRESSED=compressed), 4  # fmt: skip
    fn = flashmla_lists._flashmla_lists_kernel
    types = {a: "*i32" for a in fn.arg_names if a.endswith("_ptr")}
    types |= {"positions_ptr": "*i64", "window_ids_ptr": "*i64", "ent_rows_ptr": "*i64"}
    for ratio, epb in ((0, 1), (4, 32), (128, 1)):
        ce = dict(W=128, WB=128, RATIO=ratio, EPB=epb, TT=16, CH=256, EB=128)
        yield f"flashmla lists ratio {ratio}", fn, types, ce, 4


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
    variants = (*tile_logits_variants(), *extend_flush_variants(), *topk_variants(),
                *gather_variants(), *plan_variants())  # fmt: skip
    return check_all(variants, tail=600)


if __name__ == "__main__":
    raise SystemExit(1 if main() else 0)
