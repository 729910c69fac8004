"""Compile the ops' Triton kernels (``kernels/mhc.py``, ``kernels/mhc_gemm.py``,
``kernels/norm_rope.py``, the MoE's ``kernels/slot_sum.py`` and ``kernels/moe_group.py``) for
Hopper (sm_90) on a machine without a GPU, and print each variant's registers / spills and shared
memory (static, and the launch's dynamic total).

    python scripts/compile_ops_sm90.py
    python scripts/compile_ops_sm90.py --rope-shapes

Why, and the shared machinery: ``sglang_dsv4/perf/sm90_compile.py``. Variants: bf16 and
fp32 activations at Pro dims (hidden 7168, 128 heads x 512, q_lora 1536, indexer 128).

``--rope-shapes``: ``_rms_rope_kernel`` in bf16 at every launch shape of
``kernels.norm_rope_shapes.CANDIDATES`` (the norm weighted and not), each with its registers and
the split of a row in its norm's sum of squares (channels per thread, lanes, warps); exits 1
when a candidate splits rows otherwise than the default shape (its adds would run in another
order: other bits).
"""

import os
import sys

os.environ.pop("TRITON_INTERPRET", None)  # before triton is imported: compiled jit functions

from sglang_dsv4.kernels import mhc, mhc_gemm, moe_group, norm_rope, slot_sum
from sglang_dsv4.kernels.norm_rope_shapes import CANDIDATES, default_shape
from sglang_dsv4.perf.sm90_compile import axis_split, build, reduce_layouts, resource_usage


def variants(dt: str):
    bf = dt == "bf16"
    act = "*" + dt
    yield norm_rope._rms_kernel, {"x_ptr": act, "w_ptr": act, "out_ptr": act, "eps": "fp32"}, {
        "N": 1536, "BN": 2048, "RB": 2, "X_BF16": bf, "W_BF16": bf,
    }  # fmt: skip
    rope_types = {"x_ptr": act, "w_ptr": act, "pos_ptr": "*i64", "inv_freq_ptr": "*fp32",
                  "eps": "fp32"}  # fmt: skip
    for norm, weighted, inverse in ((1, 0, 0), (1, 1, 0), (0, 0, 0), (0, 0, 1)):
        yield norm_rope._rms_rope_kernel, rope_types, {
            "D": 512, "RB": 4 if norm else 32, "NORM": bool(norm), "HAS_W": bool(weighted),
            "INVERSE": bool(inverse), "X_BF16": bf, "W_BF16": bf and bool(weighted),
        }  # fmt: skip
    yield norm_rope._rope_hadamard_kernel, rope_types, {
        "D": 128, "LOG2D": 7, "RB": 16, "INVERSE": False, "X_BF16": bf,
    }  # fmt: skip
    # the sorted MoE's slot sum: Flash dims, top-2 / top-6 + shared row; top-2 + a shared bank's
    # rows (add)
    for slots, add in ((3, False), (7, False), (2, True)):
        yield slot_sum._slot_sum_kernel, {"y_ptr": act, "add_ptr": act, "out_ptr": act}, {
            "SLOTS": slots, "BLOCK_D": slot_sum.BLOCK_D, "OUT_BF16": bf, "ADD": add,
        }  # fmt: skip
    yield from group_variants(dt)
    hc_types = {a: "*fp32" for a in mhc._hc_kernel.arg_names if a.endswith("_ptr")}
    hc_types |= {a: act for a in ("x_ptr", "y_ptr", "x_out_ptr", "norm_w_ptr", "h_ptr")}
    hc_types |= {"ticket_ptr": "*i32", "eps": "fp32", "hc_eps": "fp32"}
    for post, head in ((False, False), (True, False), (True, True)):  # the one-token form
        yield mhc._hc_kernel, hc_types, {
            "D": 7168, "HC": 4, "NM": 4 if head else 24, "NMP": 8 if head else 32,
            "LOG_NMP": 3 if head else 5, "BD": 32, "SB": 256, "ITERS": 20, "POST": post,
            "HEAD": head, "BDN": 8192, "X_BF16": bf, "W_BF16": bf,
        }  # fmt: skip
    tile_types = {a: "*fp32" for a in mhc_gemm._tile_kernel.arg_names if a.endswith("_ptr")}
    tile_types |= {"x_ptr": act, "y_ptr": act, "out_ptr": act}
    for tm, bd in ((mhc_gemm._TM, mhc_gemm._BD), (mhc_gemm._TM_LARGE, mhc_gemm._BD_LARGE)):
        for post, mix, head in ((True, True, False), (True, True, True), (False, True, False),
                                (True, False, False)):  # fmt: skip
            yield mhc_gemm._tile_kernel, tile_types, {
                "D": 7168, "HC": 4, "NM": 4 if head else 24, "NMP": 16 if head else 32,
                "MW": 64, "TM": tm, "BD": bd, "POST": post, "MIX": mix,
                "X_BF16": bf,
            }  # fmt: skip
    maps_types = {a: "*fp32" for a in mhc._maps_collapse_kernel.arg_names if a.endswith("_ptr")}
    maps_types |= {"x_ptr": act, "norm_w_ptr": act, "h_ptr": act, "eps": "fp32", "hc_eps": "fp32"}
    for head in (False, True):
        yield mhc._maps_collapse_kernel, maps_types, {
            "D": 7168, "HC": 4, "NM": 4 if head else 24, "NMP": 16 if head else 32,
            "LOG_NMP": 4 if head else 5, "SB": 64, "ITERS": 20, "HEAD": head, "BDN": 8192,
            "X_BF16": bf, "W_BF16": bf,
        }  # fmt: skip


def group_variants(dt: str):
    """The sorted MoE's grouping (``moe_group``): the served (16 + shared, top-2), Flash (256 +
    shared, top-6) and Pro (384 + shared, top-6) bins; int32 ids, weights in ``dt``."""
    types = {"chosen_ptr": "*i32", "weights_ptr": "*" + dt, "hist_ptr": "*i32",
             "order_ptr": "*i32", "off_ptr": "*i32", "w_out_ptr": "*fp32"}  # fmt: skip
    for rows, topk in ((17, 2), (257, 6), (385, 6)):
        ce = {"TOPK": topk, "SLOTS": topk + 1, "RB": moe_group.bins(rows)}
        yield moe_group._group_one_kernel, types, ce | {"SUB": moe_group.SUB, "COUNT": 256}
        yield moe_group._group_count_kernel, types, ce | {"COUNT": 1024, "CHUNK": 1024}
        yield moe_group._group_place_kernel, types, ce | {
            "SUB": moe_group.SUB, "CHUNK": 1024, "ROWS": moe_group._TABLE_ROWS,
        }  # fmt: skip


def rope_shapes() -> int:
    """Compile every candidate shape (module docstring); returns how many split the norm's rows
    otherwise than the default."""
    types = {"x_ptr": "*bf16", "w_ptr": "*bf16", "pos_ptr": "*i64", "inv_freq_ptr": "*fp32",
             "eps": "fp32"}  # fmt: skip
    differ = 0
    for (d, norm), shapes in CANDIDATES.items():
        for weighted in (False, True) if norm else (False,):
            ce = {"D": d, "NORM": norm, "HAS_W": weighted, "INVERSE": False, "X_BF16": True,
                  "W_BF16": weighted}  # fmt: skip
            first = None
            for shape in dict.fromkeys((default_shape(d, norm), *shapes)):
                k = build(norm_rope._rms_rope_kernel, types, ce | {"RB": shape.rows},
                          shape.warps, divisible=("stride_t", "stride_h"))  # fmt: skip
                split = axis_split(reduce_layouts(k)[0], 1) if norm else "no norm"
                first = first or split
                differ += split != first
                mark = "" if split == first else "  ROW SPLIT DIFFERS"
                print(f"D {d} norm {norm} w {weighted} {shape}: {resource_usage(k)} "
                      f"row split {split}{mark}", flush=True)  # fmt: skip
    print(f"candidates that split the norm's rows otherwise than the default: {differ}")
    return differ


def main() -> None:
    if "--rope-shapes" in sys.argv[1:]:
        sys.exit(1 if rope_shapes() else 0)
    for dt in ("bf16", "fp32"):
        for fn, types, constexprs in variants(dt):
            shown = ("TM", "NM")  # the tile variants differ in these too
            flags = {k: v for k, v in constexprs.items() if isinstance(v, bool) or k in shown}
            warps = 8 if fn in (mhc._hc_kernel, mhc._maps_collapse_kernel) else 4  # as launched
            if fn is mhc_gemm._tile_kernel:
                warps = mhc_gemm._WARPS
            if fn.fn.__module__ == moe_group.__name__:  # its launch's warps; which bins / top-k
                warps = moe_group.WARPS
                flags |= {k: constexprs[k] for k in ("RB", "TOPK")}
            kernel = build(fn, types, constexprs, warps)
            usage = f"{resource_usage(kernel)} DYN_SHARED:{kernel.metadata.shared}"  # + pipeline
            print(f"{fn.fn.__name__:22s} {dt} {flags}: {usage}", flush=True)


if __name__ == "__main__":
    main()
