"""Sweep the launch shapes of the mHC boundary kernels and the routing kernel on one GPU: both
forms (one-token FMA tiles with 4 or 8 warps / the tile form: mHC's post + tensor-core GEMM +
per-token maps, routing's 16-token ``tl.dot`` tiles) forced at every token count, and the
program budget, to set ``FMA_MAX_TOKENS``, ``FMA_WARPS`` and ``programs`` from measurements.

    python scripts/tune_hc_route.py [--tokens 1,2,4,8,9,16,32,128] [--programs 132,264,528]

Flash dims (hidden 4096, hc 4, bf16 streams, fp32 mHC weights; gate 16 x 4096 bf16, top-2,
sqrtsoftplus). Each point: ``hc_fused`` with the previous block's post (a decode boundary) and
``moe_route`` (scored), captured 20 times in a CUDA graph, median of ``--reps`` replays (CUDA
events), us per call. Prints a table (best per token count marked ``*``) and writes
``tune_hc_route.json`` to ``--out`` (default ``$OUT`` or ``.``).
"""

import argparse
import json
import os
from types import SimpleNamespace

import torch
from bench_ops import graph_time

from sglang_dsv4.kernels import mhc, moe_route

DEV, D, HC, E = "cuda", 4096, 4, 16
# (name, FMA_MAX_TOKENS forcing the form, FMA_WARPS)
FORMS = (("dot", 0, 4), ("fma4", 1 << 30, 4), ("fma8", 1 << 30, 8))


def hc_boundary(n: int, gen) -> SimpleNamespace:
    """One block boundary at ``n`` tokens: bf16 streams ``x``, the previous block's output ``y``
    and maps ``post`` / ``comb``, a site's ``fn`` / ``base`` / ``scale`` / ``norm``, tickets."""
    return SimpleNamespace(
        x=torch.randn(n, HC, D, device=DEV, generator=gen).bfloat16(),
        y=torch.randn(n, D, device=DEV, generator=gen).bfloat16(),
        post=torch.rand(n, HC, device=DEV, generator=gen) * 2,
        comb=torch.rand(n, HC, HC, device=DEV, generator=gen) / HC,
        fn=torch.randn(24, HC * D, device=DEV, generator=gen) * (HC * D) ** -0.5,
        base=torch.randn(24, device=DEV, generator=gen),
        scale=torch.ones(3, device=DEV),
        norm=torch.ones(D, device=DEV).bfloat16(),
        tickets=torch.zeros(mhc.MAX_TILES, dtype=torch.int32, device=DEV),
    )


def hc_call(n: int, programs: int, gen, b: SimpleNamespace | None = None):
    """``hc_fused`` with the previous block's post at boundary ``b`` (default: a fresh one)."""
    b = b or hc_boundary(n, gen)
    return lambda: mhc.hc_fused(
        b.x, b.fn, b.base, b.scale, b.norm, b.tickets, eps=1e-6, hc_eps=1e-6, iters=20,
        programs=programs, post_of=(b.y, b.post, b.comb),
    )  # fmt: skip


def route_call(n: int, programs: int, gen):
    x = torch.randn(n, D, device=DEV, generator=gen).bfloat16()
    gate = (torch.randn(E, D, device=DEV, generator=gen) * D**-0.5).bfloat16()
    bias = torch.randn(E, device=DEV, generator=gen) * 0.1
    tickets = torch.zeros(moe_route.MAX_TILES, dtype=torch.int32, device=DEV)
    return lambda: moe_route.moe_route(
        x, gate, bias, None, None, 2, 1.5, tickets=tickets, programs=programs
    )


KERNELS = (("hc", hc_call, mhc), ("route", route_call, moe_route))


def sweep_args(tokens: str, programs: str, reps: int) -> argparse.Namespace:
    """The sweeps' command line (``--tokens``, ``--programs``, ``--reps``, ``--out``)."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", default=tokens)
    ap.add_argument("--programs", default=programs)
    ap.add_argument("--reps", type=int, default=reps)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    return ap.parse_args()


def main() -> None:
    args = sweep_args("1,2,4,8,9,16,32,128", "132,264,528", 30)
    gen = torch.Generator(device=DEV).manual_seed(0)
    rows = []
    for n in (int(v) for v in args.tokens.split(",")):
        for progs in (int(v) for v in args.programs.split(",")):
            for form, fma_max, warps in FORMS:
                for kernel, make, module in KERNELS:
                    module.FMA_MAX_TOKENS, module.FMA_WARPS = fma_max, warps
                    us = graph_time(make(n, progs, gen), 20, args.reps) * 1e6
                    rows.append({"op": kernel, "tokens": n, "programs": progs, "form": form,
                                 "us": us})  # fmt: skip
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "tune_hc_route.json")
    with open(path, "w") as f:
        json.dump({"gpu": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)
    print(f"{torch.cuda.get_device_name()}; us per call; * best per op and token count; {path}")
    keys = list(dict.fromkeys((r["programs"], r["form"]) for r in rows))
    print(f"{'op':6s} {'T':>4s}" + "".join(f" {f'{f}/{p}':>9s}" for p, f in keys))
    for op in ("hc", "route"):
        for n in dict.fromkeys(r["tokens"] for r in rows):
            mine = {(r["programs"], r["form"]): r["us"] for r in rows
                    if r["op"] == op and r["tokens"] == n}  # fmt: skip
            best = min(mine.values())
            cells = "".join(f" {mine[k]:8.1f}{'*' if mine[k] == best else ' '}" for k in keys)
            print(f"{op:6s} {n:4d}" + cells)


if __name__ == "__main__":
    main()
