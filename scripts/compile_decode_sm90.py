"""Compile the decode path's Triton kernels (step metadata, KV store, compressor flush, indexer
scores and top-k) for Hopper (sm_90) on a machine without a GPU, at Flash dims, in the variants
the decode step launches (``attention/decode_kernels.py``).

    PYTHONPATH=$PWD python scripts/compile_decode_sm90.py

Why, and the shared machinery: ``sglang_dsv4/perf/sm90_compile.py``. The sparse MQA
kernels are compiled by their GPU tests (``tests/kernels/test_attention.py``).
"""

import os

os.environ.pop("TRITON_INTERPRET", None)  # before triton is imported: compiled jit functions

import torch
import triton

from sglang_dsv4.kernels import alloc_decode, compressor, decode_meta, indexer, kv_store
from sglang_dsv4.perf.sm90_compile import check_all


def flush_variants():
    types = {a: "*fp32" for a in compressor._flush_kernel.arg_names if a.endswith("_ptr")}
    for a in ("req_slot_ptr", "prefix_ptr", "cu_ptr", "mode_ptr", "rebuild_ptr", "bt_ptr",
              "bnd_bt_ptr"):  # fmt: skip
        types[a] = "*i32"
    types.update(kv_ptr="*bf16", score_ptr="*bf16", out_ptr="*u8", norm_ptr="*bf16", eps="fp32")
    # (name, ratio, coff, dim, out index, boundary): c4 main / indexer, c128, bf16 rows
    cases = (
        ("c4", 4, 2, 512, 0, True),
        ("c4 index", 4, 2, 128, 3, True),
        ("c128", 128, 1, 512, 0, False),
        ("c4 bf16", 4, 2, 512, 1, True),
    )
    for name, r, coff, d, out, bnd in cases:
        s = coff * r
        ce = dict(
            R=r, COFF=coff, D=d, BLOCK=128, EPP=4 if coff == 2 else 1, SC=s if s <= 8 else 16,
            TSC=min(s, 16), TCC=min(coff * d, 256), OUT=out, LOG2D=d.bit_length() - 1,
            RPP=32 if r == 4 else 1, PAGE=19008, HAS_MODE=False, HAS_BOUNDARY=bnd,
        )  # fmt: skip
        yield f"flush {name}", compressor._flush_kernel, types, ce, 8 if s > 8 else 4


def store_variants():
    types = dict(kv_ptr="*bf16", w_ptr="*bf16", pos_ptr="*i64", inv_freq_ptr="*fp32",
                 rows_ptr="*i64", cache_ptr="*u8", eps="fp32")  # fmt: skip
    for norm in (False, True):
        for fmt in (0, 1):
            t = dict(types, cache_ptr="*u8" if fmt == 0 else "*bf16")
            ce = dict(D=512, TB=16, NORM=norm, ROPE=norm, X_BF16=True, W_BF16=norm, FMT=fmt,
                      RPP=128 if fmt == 0 else 1, PAGE=74880 if fmt == 0 else 1)  # fmt: skip
            yield f"store_kv fmt={fmt} norm={norm}", kv_store._kv_store_kernel, t, ce, 4


def indexer_variants():
    types = dict(q_ptr="*bf16", w_ptr="*bf16", keys_ptr="*u8", bt_ptr="*i32", qreq_ptr="*i32",
                 pos_ptr="*i64", logits_ptr="*fp32")  # fmt: skip
    # rotate: the queries rotated in the kernel (decode: bf16 queries; fp32 ones in tests);
    # FP8 keys round them to e4m3 (Q_FP8), FP4 keys keep them bf16
    for rotate, q, fp4 in ((False, "*bf16", False), (True, "*bf16", False),
                           (True, "*fp32", False), (True, "*bf16", True)):  # fmt: skip
        ce = dict(H=64, DH=128, BS=64, EPB=32, RATIO=4, RPP=32, FP4=fp4, DOT_F32=False,
                  ROTATE=rotate, Q_FP8=not fp4)  # fmt: skip
        t = dict(types, q_ptr=q)
        name = f"indexer logits rotate={rotate} q={q} keys={'fp4' if fp4 else 'fp8'}"
        yield name, indexer._logits_kernel, t, ce, 4
    types = dict(logits_ptr="*fp32", qreq_ptr="*i32", pos_ptr="*i64", bt_ptr="*i32",
                 ids_ptr="*i32", rows_ptr="*i32", len_ptr="*i32", base_ptr="*i32")  # fmt: skip
    ce = dict(K=512, RATIO=4, EPB=32, CHUNK=2048, KCHUNK=512, WRITE_ROWS=True, REBASE=False)
    yield "indexer top-k", indexer._topk_kernel, types, ce, 8
    # the split select (few queries): 16 ranges at batch 1, 4 / 3 at batch 32 / 33 (SB 4)
    types["hist_ptr"] = "*i32"
    for splits in (16, 3):
        ce = dict(K=512, RATIO=4, SPLITS=splits, SB=triton.next_power_of_2(splits), CHUNK=512)
        for p in range(4):
            yield f"indexer split top-k s={splits} pass {p}", indexer._split_hist_kernel, types, \
                dict(ce, PASS=p), 4  # fmt: skip
        ce.update(EPB=32, KCHUNK=512, WRITE_ROWS=True)
        yield f"indexer split top-k s={splits} write", indexer._split_write_kernel, types, ce, 4


def meta_variants():
    fn = decode_meta._decode_meta_kernel
    types = {a: "*i64" for a in fn.arg_names if a.endswith("_ptr")}  # SGLang's int64 buffers
    # the outputs as decode_meta_fields allocates them (one table: decode_meta._OUTPUTS)
    ptr = {torch.int64: "*i64", torch.int32: "*i32", torch.bool: "*i1"}
    types.update({f"{name}_ptr": ptr[dtype] for name, _, dtype in decode_meta._OUTPUTS})
    types["r2t_ptr"] = "*i32"
    ce = dict(W=128, WB=128, BLOCK=128, PP=1, CH=256)
    for req in ("*i32", "*i64"):  # SGLang's req_pool_indices: either
        yield f"decode meta req={req}", fn, dict(types, req_ptr=req), ce, 4


def alloc_variants():
    """The hybrid allocator's one-launch decode step (``kernels.alloc_decode``): SGLang's int64
    lengths and free pages, ``last_loc`` gathered from the int32 ``req_to_token``, batch
    buckets of 1 / 32 / 256 requests."""
    fn = alloc_decode._alloc_decode_pair_kernel
    types = {a: "*i64" for a in fn.arg_names if a.endswith("_ptr")}
    for bs in (1, 32, 256):
        for last in ("*i32", "*i64"):
            yield f"alloc decode bs<={bs} last={last}", fn, dict(types, last_loc_ptr=last), \
                dict(BS=bs, PAGE=128), 4  # fmt: skip


def main() -> int:
    """Compile every variant; the number that failed."""
    return check_all((*store_variants(), *flush_variants(), *indexer_variants(), *meta_variants(),
                      *alloc_variants()))  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(1 if main() else 0)
