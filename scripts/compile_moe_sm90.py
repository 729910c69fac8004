"""Compile the MoE Triton kernels (``kernels/moe_route.py``, ``kernels/moe_experts.py``) for
Hopper (sm_90) on a machine without a GPU, and print each variant's registers / spills.

    python scripts/compile_moe_sm90.py

Why, and the shared machinery: ``sglang_dsv4/perf/sm90_compile.py``. Variants: every bank format
(dense bf16, FP8, MXFP4, NVFP4) in both kernel forms as the wrappers launch them at Flash dims
(top-6 + a shared slot; a zero-top-k call for a shared bank of its own), the fp32 (IEEE) sorted
form, and the routing kernel for every scoring function, scored and hash, in both forms
(one-token tiles, 16-token tiles) for E 16, 256 and 384 (expert blocks).
"""

import os

os.environ.pop("TRITON_INTERPRET", None)  # before triton is imported: compiled jit functions

from sglang_dsv4.kernels import moe_experts as ME
from sglang_dsv4.kernels import moe_route as MR
from sglang_dsv4.perf.sm90_compile import build, resource_usage

WEIGHT = {"dense": "bf16", "fp8": "fp8e4nv", "mxfp4": "u8", "nvfp4": "u8"}


def expert_variants():
    for fmt, dt in WEIGHT.items():
        sdt = "bf16" if fmt == "dense" else "u8"
        fmt_ce = dict(FMT=ME.FORMATS[fmt], G=16 if fmt == "nvfp4" else 32, NV=fmt == "nvfp4")
        types = {a: f"*{dt}" for a in ("w_ptr", "w1_ptr", "w3_ptr")}
        types |= {a: f"*{sdt}" for a in ("s_ptr", "s1_ptr", "s3_ptr")}
        types |= {a: "*fp32" for a in ("gs_ptr", "gs1_ptr", "gs3_ptr", "weights_ptr")}
        types |= {a: "*bf16" for a in ("x_ptr", "h_ptr", "out_ptr", "y_ptr")}
        types |= {"chosen_ptr": "*i32", "order_ptr": "*i32", "off_ptr": "*i32", "limit": "fp32"}
        # the tiles the wrapper picks: served dims at T 1 / 8, Flash at T 1; a one-row bank
        for t, topk, inter in ((1, 2, 1024), (8, 2, 1024), (1, 6, 2048), (1, 0, 2048)):
            tiles = ME.slot_tiles(fmt, t * (topk + 1), t, inter, 4096)
            kernels = ((ME._slot_w13_kernel, tiles.block_i, tiles.k_i),
                       (ME._slot_w2_kernel, tiles.block_d, tiles.k_d))  # fmt: skip
            for fn, block_n, block_k in kernels:
                ce = dict(TOPK=topk, SLOTS=topk + 1, SP=max(2, 1 << topk.bit_length()),
                          BLOCK_N=block_n, BLOCK_K=block_k, UNROLL=tiles.unroll)  # fmt: skip
                yield f"{fmt} T{t} top-{topk} {tiles}", fn, types, ce | fmt_ce
        sorted_ce = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, BLOCK_R=32, IEEE=False, **fmt_ce)
        yield fmt, ME._sorted_w13_kernel, types, dict(SLOTS=7, **sorted_ce)
        yield fmt, ME._sorted_w2_kernel, types, sorted_ce
    fp32 = {a: "*fp32" for a in ME._sorted_w13_kernel.arg_names if a.endswith("_ptr")}
    fp32 |= {"order_ptr": "*i32", "off_ptr": "*i32", "limit": "fp32"}
    ce = dict(SLOTS=7, BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, BLOCK_R=32, IEEE=True, FMT=0, G=32,
              NV=False)  # fmt: skip
    yield "fp32", ME._sorted_w13_kernel, fp32, ce


def route_variants():
    types = {"x_ptr": "*bf16", "g_ptr": "*bf16", "bias_ptr": "*fp32", "tid2eid_ptr": "*i64",
             "ids_ptr": "*i64", "chosen_ptr": "*i32", "weights_ptr": "*fp32", "rsf": "fp32",
             "part_ptr": "*fp32", "ticket_ptr": "*i32"}  # fmt: skip
    for dot in (False, True):  # the forms moe_route picks by token count
        tb, bd = (16, 64) if dot else (1, 128)
        for hashed in (False, True):
            for scoring in MR.SCORING.values():
                ce = dict(D=4096, TOPK=6, BLOCK_K=8, TB=tb, BE=16, BEF=16, BD=bd,
                          SB=16 if dot else 32, SCORING=scoring, HASH=hashed, FP32=False,
                          DOT=dot)  # fmt: skip
                yield f"E16 dot={dot} hash={hashed} scoring={scoring}", MR._route_kernel, types, ce
        for n_exp, bef in ((256, 256), (384, 512)):  # Flash, Pro
            ce = dict(D=7168, TOPK=8, BLOCK_K=8, TB=tb, BE=32, BEF=bef, BD=bd,
                      SB=max(1, 4096 // (tb * bef)), SCORING=0, HASH=False, FP32=False,
                      DOT=dot)  # fmt: skip
            yield f"E{n_exp} dot={dot}", MR._route_kernel, types, ce


def main() -> None:
    for tag, fn, types, constexprs in (*expert_variants(), *route_variants()):
        warps = 8 if fn.fn.__name__.startswith("_sorted") else 4  # as the wrappers launch them
        usage = resource_usage(build(fn, types, constexprs, warps))
        print(f"{fn.fn.__name__:22s} {tag}: {usage}", flush=True)


if __name__ == "__main__":
    main()
