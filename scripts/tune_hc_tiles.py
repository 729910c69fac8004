"""Sweep the launch shape of mHC's tiled (prefill) pass (``kernels/mhc_gemm.py``) on one GPU:
tokens per tile, channels per step, warps and the program budget, at prefill token counts.

    python scripts/tune_hc_tiles.py [--tokens 300,8192] [--programs 264,528,1056]

Flash dims (hidden 4096, hc 4, bf16 streams, fp32 weights). Per point, each captured 20 times in
a CUDA graph, median of ``--reps`` replays (CUDA events), us per call and GB/s of the bytes it
must move: ``post+mix`` (``mix_partials`` with the previous block's post: read x, y, write the
new streams), ``boundary`` (``hc_fused`` with the post: + the maps launch re-reading the new
streams and writing h) and ``post`` (``hc_post`` alone, whose grid ignores ``--programs``: it
sweeps ``_POST_STEPS`` instead). Shapes that spill on sm_90 are left out
(``scripts/compile_ops_sm90.py``). Prints a table and writes ``tune_hc_tiles.json`` to
``--out`` (default ``$OUT`` or ``.``).
"""

import json
import os

import torch
from bench_ops import graph_time
from tune_hc_route import hc_boundary, hc_call, sweep_args

from sglang_dsv4.kernels import mhc_gemm

DEV = "cuda"
# (tokens per large tile, channels per step, warps); the first is the module's default. BD >= 16
# (tl.dot); 8 warps split the wgmma two ways (the accumulator changes layout once a step)
SHAPES = ((64, 16, 4), (32, 32, 4), (32, 16, 4), (64, 32, 8), (128, 16, 8))
POST_STEPS = (4, 1, 16)  # hc_post alone: steps per program (the first is the default)


def calls(n: int, programs: int, gen) -> dict:
    """name -> (closure, bytes it must move) at ``n`` tokens."""
    b = hc_boundary(n, gen)
    x, y, post, comb = b.x, b.y, b.post, b.comb
    streams, row = x.numel() * 2, y.numel() * 2
    return {
        "post+mix": (lambda: mhc_gemm.mix_partials(x, b.fn, programs, (y, post, comb)),
                     2 * streams + row),
        "boundary": (hc_call(n, programs, gen, b), 3 * streams + 3 * row),
        "post": (lambda: mhc_gemm.hc_post(y, x, post, comb), 2 * streams + row),
    }  # fmt: skip


def point(rows: list, name: str, fn, moved: int, reps: int, **where) -> None:
    """Time one closure, append its row and print it."""
    us = graph_time(fn, 20, reps) * 1e6
    rows.append({"op": name, **where, "us": us, "gbps": moved / us * 1e-3})
    print(f"{name:9s} " + " ".join(f"{k}={v}" for k, v in where.items())
          + f": {us:8.1f} us {rows[-1]['gbps']:7.1f} GB/s", flush=True)  # fmt: skip


def sweep(tokens: list[int], programs: list[int], reps: int) -> list[dict]:
    """Every shape x program budget for the mix (post+mix, boundary); ``_POST_STEPS`` for
    ``hc_post`` alone (default shape)."""
    gen = torch.Generator(device=DEV).manual_seed(0)
    default = (mhc_gemm._TM_LARGE, mhc_gemm._BD_LARGE, mhc_gemm._WARPS)
    rows = []
    for n in tokens:
        for progs in programs:
            for tm, bd, warps in SHAPES:
                mhc_gemm._TM_LARGE, mhc_gemm._BD_LARGE, mhc_gemm._WARPS = tm, bd, warps
                for name, (fn, moved) in calls(n, progs, gen).items():
                    if name != "post":
                        point(rows, name, fn, moved, reps, tokens=n, programs=progs, tm=tm,
                              bd=bd, warps=warps)  # fmt: skip
        mhc_gemm._TM_LARGE, mhc_gemm._BD_LARGE, mhc_gemm._WARPS = default
        for steps in POST_STEPS:
            mhc_gemm._POST_STEPS = steps
            fn, moved = calls(n, programs[0], gen)["post"]
            point(rows, "post", fn, moved, reps, tokens=n, post_steps=steps)
    return rows


def main() -> None:
    args = sweep_args("300,8192", "264,528,1056", 20)
    tokens = [int(v) for v in args.tokens.split(",")]
    rows = sweep(tokens, [int(v) for v in args.programs.split(",")], args.reps)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "tune_hc_tiles.json")
    with open(path, "w") as f:
        json.dump({"gpu": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)
    print(f"\n{torch.cuda.get_device_name()}; best per op and token count; {path}")
    for op in dict.fromkeys(r["op"] for r in rows):
        for n in tokens:
            best = min((r for r in rows if r["op"] == op and r["tokens"] == n),
                       key=lambda r: r["us"])  # fmt: skip
            where = " ".join(f"{k}={v}" for k, v in best.items() if k not in ("op", "us", "gbps"))
            print(f"{op:9s} {best['us']:8.1f} us {best['gbps']:7.1f} GB/s at {where}")


if __name__ == "__main__":
    main()
