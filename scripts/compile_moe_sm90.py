"""Compile the MoE Triton kernels (``kernels/moe_route.py``, ``moe_experts.py``,
``moe_sorted.py``) for Hopper (sm_90) on a machine without a GPU, and print each variant's
registers / spills.

    python scripts/compile_moe_sm90.py            # --sorted: the sorted kernels' tiles only

Why, and the shared machinery: ``sglang_dsv4/perf/sm90_compile.py``. Variants: every bank format
(dense bf16, FP8, MXFP4, NVFP4) in both kernel forms as the wrappers launch them at Flash dims
(top-6 + a shared slot; a zero-top-k call for a shared bank of its own), the fp32 (IEEE) sorted
form, every sorted-kernel tile (``kernels.moe_sorted_tiles``: today's, the candidates and the
measured rows) for dense bf16 and FP8 banks, and the routing kernel for every scoring function,
scored and hash, in both forms (one-token tiles, 16-token tiles) for E 16, 256 and 384 (expert
blocks).
"""

import os
import sys

os.environ.pop("TRITON_INTERPRET", None)  # before triton is imported: compiled jit functions

from sglang_dsv4.kernels import moe_experts as ME
from sglang_dsv4.kernels import moe_route as MR
from sglang_dsv4.kernels import moe_sorted as MS
from sglang_dsv4.kernels import moe_sorted_tiles as ST
from sglang_dsv4.perf.sm90_compile import build, resource_usage

WEIGHT = {"dense": "bf16", "fp8": "fp8e4nv", "mxfp4": "u8", "nvfp4": "u8"}


def expert_variants():
    for fmt, dt in WEIGHT.items():
        sdt = "bf16" if fmt == "dense" else "u8"
        fmt_ce = dict(FMT=ME.FORMATS[fmt], G=16 if fmt == "nvfp4" else 32, NV=fmt == "nvfp4")
        types = {a: f"*{dt}" for a in ("w_ptr", "w1_ptr", "w3_ptr")}
        types |= {a: f"*{sdt}" for a in ("s_ptr", "s1_ptr", "s3_ptr")}
        types |= {a: "*fp32" for a in ("gs_ptr", "gs1_ptr", "gs3_ptr", "weights_ptr")}
        types |= {a: "*bf16" for a in ("x_ptr", "h_ptr", "hb_ptr", "add_ptr", "out_ptr", "y_ptr")}
        types |= {"chosen_ptr": "*i32", "order_ptr": "*i32", "off_ptr": "*i32", "limit": "fp32"}
        # the tiles the wrapper picks: served dims at T 1 / 8, Flash at T 1; a one-row bank
        for t, topk, inter in ((1, 2, 1024), (8, 2, 1024), (1, 6, 2048), (1, 0, 2048)):
            tiles = ME.slot_tiles(fmt, t * (topk + 1), t, inter, 4096)
            kernels = ((ME._slot_w13_kernel, tiles.block_i, tiles.k_i),
                       (ME._slot_w2_kernel, tiles.block_d, tiles.k_d))  # fmt: skip
            for fn, block_n, block_k in kernels:
                ce = dict(TOPK=topk, SLOTS=topk + 1, SP=max(2, 1 << topk.bit_length()),
                          BLOCK_N=block_n, BLOCK_K=block_k, UNROLL=tiles.unroll)  # fmt: skip
                ce |= NO_SHARED_BANK | dict(BLOCK_N_B=block_n, BLOCK_K_B=block_k)
                ce = {k: v for k, v in ce.items() if k in fn.arg_names}
                yield f"{fmt} T{t} top-{topk} {tiles}", fn, types, ce | fmt_ce, None
        # FP4 banks run only today's tiles (never measured): the large-T one
        large = [(k, ST.GemmTiles(64)) for k in SORTED]
        for kernel, tile in sorted_variants() if fmt in ("dense", "fp8") else large:
            fn = SORTED[kernel]
            ce = {k: v for k, v in sorted_ce(tile, False).items() if k in fn.arg_names}
            yield f"{fmt} {tile}", fn, types, ce | fmt_ce, tile
        if fmt == "fp8":  # a shared bank of its own alone: the identity grouping
            for kernel, tile in [(k, ST.GemmTiles(16)) for k in SORTED] + large:
                fn = SORTED[kernel]
                ce = sorted_ce(tile, False) | {"IDENT": True, "SLOTS": 1}
                ce = {k: v for k, v in ce.items() if k in fn.arg_names}
                yield f"{fmt} IDENT {tile}", fn, types, ce | fmt_ce, tile
    yield from shared_bank_variants()
    fp32 = {a: "*fp32" for a in MS._sorted_w13_kernel.arg_names if a.endswith("_ptr")}
    fp32 |= {"order_ptr": "*i32", "off_ptr": "*i32", "limit": "fp32"}
    ce = sorted_ce(ST.GemmTiles(16), True) | dict(FMT=0, G=32, NV=False)  # w13: SLOTS too
    yield "fp32", MS._sorted_w13_kernel, fp32, ce, ST.GemmTiles(16)


# slot kernels without a shared bank of their own (and without add rows)
NO_SHARED_BANK = dict(TWO=False, FMT_B=0, G_B=32, NV_B=False, ADD=False, OUT_BF16=True)


def shared_bank_variants():
    """The served Flash-dims layer's slot kernels: MXFP4 / NVFP4 routed bank + the FP8 shared
    bank in the same launches (TWO), top-2, at the decode sizes of the slot form."""
    for fmt in ("mxfp4", "nvfp4"):
        types = {a: "*u8" for a in ("w_ptr", "w1_ptr", "w3_ptr", "s_ptr", "s1_ptr", "s3_ptr")}
        types |= {a: "*fp8e4nv" for a in ("b_ptr", "b1_ptr", "b3_ptr")}
        types |= {a: "*u8" for a in ("bs_ptr", "bs1_ptr", "bs3_ptr")}
        types |= {a: "*fp32" for a in ("gs_ptr", "gs1_ptr", "gs3_ptr", "bgs_ptr", "bgs1_ptr",
                                       "bgs3_ptr", "weights_ptr")}  # fmt: skip
        types |= {a: "*bf16" for a in ("x_ptr", "h_ptr", "hb_ptr", "add_ptr", "out_ptr")}
        types |= {"chosen_ptr": "*i32", "limit": "fp32"}
        fmt_ce = dict(FMT=ME.FORMATS[fmt], G=16 if fmt == "nvfp4" else 32, NV=fmt == "nvfp4")
        for t in (1, 2, 4):  # each bank's tiles as a call of its own picks them
            tiles = ME.slot_tiles(fmt, t * 2, t, 1024, 4096)
            tb = ME.slot_tiles("fp8", t, t, 1024, 4096)
            kernels = ((ME._slot_w13_kernel, tiles.block_i, tiles.k_i, tb.block_i, tb.k_i),
                       (ME._slot_w2_kernel, tiles.block_d, tiles.k_d, tb.block_d,
                        tb.k_d))  # fmt: skip
            for fn, block_n, block_k, block_n_b, block_k_b in kernels:
                ce = NO_SHARED_BANK | dict(TOPK=2, SLOTS=2, SP=2, BLOCK_N=block_n,
                                           BLOCK_K=block_k, UNROLL=tiles.unroll, TWO=True,
                                           FMT_B=1, G_B=32, NV_B=False, BLOCK_N_B=block_n_b,
                                           BLOCK_K_B=block_k_b)  # fmt: skip
                ce = {k: v for k, v in ce.items() if k in fn.arg_names}
                yield f"{fmt} + fp8 bank T{t} {tiles} {tb}", fn, types, ce | fmt_ce, None


SORTED = {"w13": MS._sorted_w13_kernel, "w2": MS._sorted_w2_kernel}
SMEM_SM90 = 232448  # bytes of shared memory one block may use on an H100
# multiples of 16 at every Flash-dims launch, as the launcher specializes them (perf.sm90_compile)
DIVISIBLE = ("D", "I", "stride_xt", "stride_we", "stride_wn", "stride_se", "stride_sn")


def sorted_ce(tile, ieee: bool) -> dict:
    """Constexprs of a sorted kernel launched with ``tile`` (served shape: 3 slots, 17 rows)."""
    return dict(SLOTS=3, BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, BLOCK_K=tile.block_k,
                BLOCK_R=32, IEEE=ieee, N_FAST=tile.n_fast, IDENT=False)  # fmt: skip


def sorted_variants() -> list:
    """(kernel, tiles) of every sorted tile a launch may use: defaults, candidates, measured."""
    out = [(k, t) for _, t in ST.DEFAULT for k in SORTED]
    out += [(k, t) for k, tiles in ST.CANDIDATES.items() for t in tiles]
    out += [(r[1], r[3]) for r in ST.MEASURED]
    return list(dict.fromkeys(out))


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
                tag = f"E16 dot={dot} hash={hashed} scoring={scoring}"
                yield tag, MR._route_kernel, types, ce, None
        for n_exp, bef in ((256, 256), (384, 512)):  # Flash, Pro
            ce = dict(D=7168, TOPK=8, BLOCK_K=8, TB=tb, BE=32, BEF=bef, BD=bd,
                      SB=max(1, 4096 // (tb * bef)), SCORING=0, HASH=False, FP32=False,
                      DOT=dot)  # fmt: skip
            yield f"E{n_exp} dot={dot}", MR._route_kernel, types, ce, None


def main(only_sorted: bool = False) -> None:
    """Print every variant's usage (``only_sorted``: the sorted kernels'); the sorted tiles
    that spill or overflow shared memory are listed last (drop them from
    ``moe_sorted_tiles.CANDIDATES``)."""
    spills = []
    for tag, fn, types, constexprs, tile in (*expert_variants(), *route_variants()):
        if only_sorted and tile is None:
            continue
        warps, stages = (tile.warps, tile.stages) if tile else (4, 3)  # as the wrappers launch
        divisible = DIVISIBLE if tile else ()
        kernel = build(fn, types, constexprs, warps, num_stages=stages, divisible=divisible)
        usage = f"{resource_usage(kernel)} dynamic shared {kernel.metadata.shared}"
        print(f"{fn.fn.__name__:22s} {tag}: {usage}", flush=True)
        if tile and ("STACK:0 " not in usage or kernel.metadata.shared > SMEM_SM90):
            spills.append(f"{fn.fn.__name__} {tag}: {usage}")
    print("sorted tiles that spill or do not fit:", *spills or ["none"], sep="\n  ")


if __name__ == "__main__":
    main(only_sorted="--sorted" in sys.argv)
