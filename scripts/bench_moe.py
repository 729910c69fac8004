"""GPU benchmark of one MoE layer's routed (+ shared) experts at Flash dims: ours (slot and
sorted forms, :mod:`sglang_dsv4.kernels.moe_experts`), SGLang 0.5.17's Triton ``fused_experts``
(routed only: it has no shared-expert slot) and today's graph-safe path (bf16 / FP8: every expert
on every token, :class:`sglang_dsv4.ref.moe.DenseExperts` ``dense=True``; MXFP4: ``fp4_moe``,
routed only), bf16, FP8 and MXFP4 banks; plus the routing kernel vs the torch routing. Each cell
is timed as a CUDA graph of ``--inner`` calls (median of ``--reps`` replays, per call), inputs
fixed, after an untimed warm-up.

    python scripts/bench_moe.py                       # batch 1 / 32 / 128 / 4096, bf16 fp8 mxfp4
    python scripts/bench_moe.py --tokens 1,4,8,16 --out docs/gpu/bench_moe.json
    python scripts/bench_moe.py --sweep --formats bf16 --tokens 1,4,32   # tile sizes of ours

Prints a table (us per call) and the slot/sorted crossover per format, the value for
``sglang_dsv4.ops.moe.SLOT_MAX_TOKENS``.
"""

import argparse
import json
import statistics

import torch

import sglang_dsv4.kernels.moe_experts as moe_kernels
from sglang_dsv4.kernels.moe_experts import (
    ExpertWeights,
    Proj,
    moe_experts_slots,
    moe_experts_sorted,
)
from sglang_dsv4.kernels.moe_route import moe_route
from sglang_dsv4.kernels.mxfp4_moe import FP4Bank, fp4_moe
from sglang_dsv4.model.experts import FP8Rows
from sglang_dsv4.ref.moe import DenseExperts, route_scores, route_topk, route_weights, swiglu
from sglang_dsv4.ref.weight_quant import fp8_block_quant, mxfp4_quant

LIMIT = 10.0


def time_graph(fn, inner: int, reps: int) -> float:
    """Median microseconds per call of ``fn`` captured ``inner`` times in one CUDA graph."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()  # compile / autotune outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(inner):
            fn()
    graph.replay()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000 / inner)
    return statistics.median(times)


def make_bank(rows: int, d: int, inter: int, fmt: str) -> tuple[ExpertWeights, dict]:
    """(kernel operand, raw tensors: w13 / w2 (+ s13 / s2) for the baselines)."""
    w13 = torch.randn(rows, 2 * inter, d, device="cuda", dtype=torch.bfloat16) * d**-0.5
    w2 = torch.randn(rows, d, inter, device="cuda", dtype=torch.bfloat16) * inter**-0.5
    if fmt == "bf16":
        return ExpertWeights.stacked(w13, w2), dict(w13=w13, w2=w2, fp8=False)
    if fmt == "fp8":
        # w1 and w3 quantized as one [2I, d] matrix: with I % 128 == 0 the tiles are the same
        q13, s13 = (torch.stack(t) for t in zip(*map(fp8_block_quant, w13.float()), strict=True))
        q2, s2 = (torch.stack(t) for t in zip(*map(fp8_block_quant, w2.float()), strict=True))
        raw = dict(w13=q13, w2=q2, s13=s13, s2=s2, fp8=True)
        return ExpertWeights.stacked(q13, q2, s13, s2), raw
    projs = {}
    for k, w in (("w1", w13[:, :inter]), ("w3", w13[:, inter:]), ("w2", w2)):
        q, sc = (torch.stack(t) for t in zip(*map(mxfp4_quant, w.float()), strict=True))
        gs = torch.ones(rows, device="cuda")
        projs[k] = Proj(q.view(torch.uint8), sc.view(torch.uint8), gs)
    return ExpertWeights(projs["w1"], projs["w3"], projs["w2"], "mxfp4"), dict(projs=projs)


def dense_today(raw: dict, n_exp: int, inter: int):
    """Today's graph-safe path over per-expert views: every expert on every token."""

    def rows(e):
        w13, w2 = raw["w13"][e], raw["w2"][e]
        if not raw["fp8"]:
            return w13[:inter], w2, w13[inter:]
        t = inter // 128
        s13, s2 = raw["s13"][e], raw["s2"][e]
        return FP8Rows(w13[:inter], s13[:t]), FP8Rows(w2, s2), FP8Rows(w13[inter:], s13[t:])

    per = [rows(e) for e in range(n_exp + 1)]
    routed = DenseExperts(*(list(k) for k in zip(*per[:n_exp], strict=True)))
    return lambda x, c, w: routed(x, c, w, LIMIT, dense=True) + swiglu(x, *per[n_exp], LIMIT)


def sglang_fused(raw: dict, n_exp: int, topk: int):
    """SGLang's Triton fused_experts over the same bank (routed experts only; FP8 as its
    W8A8 block path, activations quantized per 128)."""
    from sglang.srt.layers.moe.moe_runner.base import MoeRunnerConfig
    from sglang.srt.layers.moe.moe_runner.triton_utils.fused_moe import fused_experts
    from sglang.srt.layers.moe.topk import StandardTopKOutput

    cfg = MoeRunnerConfig(num_experts=n_exp, num_local_experts=n_exp, top_k=topk, inplace=False,
                          swiglu_limit=LIMIT, gate_up_interleaved=False)  # fmt: skip
    w13, w2 = raw["w13"][:n_exp], raw["w2"][:n_exp]
    kw = {}
    if raw["fp8"]:
        s13, s2 = raw["s13"][:n_exp].float(), raw["s2"][:n_exp].float()
        kw = dict(use_fp8_w8a8=True, block_shape=[128, 128], w1_scale=s13, w2_scale=s2)

    def run(x, c, w):
        return fused_experts(x, w13, w2, StandardTopKOutput(w, c, None), cfg, **kw)

    return run


def baselines(fmt, raw, args, x, chosen, weights, results) -> dict:
    """The cells to compare ours with: today's path, SGLang's fused_experts, fp4_moe."""
    n_exp, topk, t = args.experts, args.topk, x.shape[0]
    cases = {}
    if fmt == "mxfp4":
        p = raw["projs"]
        banks = [FP4Bank(p[k].w[:n_exp], p[k].scale[:n_exp], p[k].global_scale, "mxfp4")
                 for k in ("w1", "w2", "w3")]  # fmt: skip
        cases["fp4_moe_routed"] = lambda: fp4_moe(x, chosen, weights, *banks, LIMIT)
        return cases
    if t <= args.dense_max:
        today = dense_today(raw, n_exp, args.inter)
        chosen_long = chosen.long()
        cases["today_dense"] = lambda: today(x, chosen_long, weights)
    try:
        fused = sglang_fused(raw, n_exp, topk)
        cases["sglang_fused_routed"] = lambda: fused(x, chosen, weights)
    except Exception as e:  # report, keep benchmarking ours
        results.append({"fmt": fmt, "tokens": t, "case": "sglang_fused_routed", "error": repr(e)})
    return cases


def bench_cell(fmt, t, args, bank, raw, results):
    d, n_exp, topk = args.hidden, args.experts, args.topk
    x = torch.randn(t, d, device="cuda", dtype=torch.bfloat16)
    chosen = torch.stack([torch.randperm(n_exp, device="cuda")[:topk] for _ in range(t)])
    chosen = chosen.to(torch.int32)
    weights = torch.rand(t, topk, device="cuda")
    cases = {
        "ours_slots": lambda: moe_experts_slots(x, chosen, weights, bank, LIMIT, n_exp),
        "ours_slots_routed": lambda: moe_experts_slots(x, chosen, weights, bank, LIMIT),
        "ours_sorted": lambda: moe_experts_sorted(x, chosen, weights, bank, LIMIT, n_exp),
        "ours_sorted_routed": lambda: moe_experts_sorted(x, chosen, weights, bank, LIMIT),
    }
    if t > args.slot_max:
        del cases["ours_slots"], cases["ours_slots_routed"]
    cases |= baselines(fmt, raw, args, x, chosen, weights, results)
    for name, fn in cases.items():
        try:
            us = time_graph(fn, args.inner, args.reps)
            results.append({"fmt": fmt, "tokens": t, "case": name, "us": round(us, 2)})
        except Exception as e:
            results.append({"fmt": fmt, "tokens": t, "case": name, "error": repr(e)[:300]})
        print(results[-1], flush=True)


def bench_route(t, args, results):
    d, n_exp, topk = args.hidden, args.experts, args.topk
    x = torch.randn(t, d, device="cuda", dtype=torch.bfloat16)
    gate = torch.randn(n_exp, d, device="cuda", dtype=torch.bfloat16) * d**-0.5
    bias = torch.randn(n_exp, device="cuda") * 0.1

    def torch_route():
        s = route_scores(x, gate)
        return route_weights(s, route_topk(s, bias, topk), 1.5)

    cases = {
        "route_kernel": lambda: moe_route(x, gate, bias, None, None, topk, 1.5),
        "route_torch": torch_route,
    }
    for name, fn in cases.items():
        us = time_graph(fn, args.inner, args.reps)
        results.append({"fmt": "-", "tokens": t, "case": name, "us": round(us, 2)})
        print(results[-1], flush=True)


def sweep(fmt, t, args, bank, results):
    """Ours with each tile choice (the kernels' ``_slot_tiles`` / ``_sorted_tiles`` patched)."""
    n_exp, topk = args.experts, args.topk
    x = torch.randn(t, args.hidden, device="cuda", dtype=torch.bfloat16)
    chosen = torch.stack([torch.randperm(n_exp, device="cuda")[:topk] for _ in range(t)])
    chosen, weights = chosen.to(torch.int32), torch.rand(t, topk, device="cuda")
    slot_tiles, sorted_tiles = moe_kernels._slot_tiles, moe_kernels._sorted_tiles
    try:
        for block_n in (16, 32, 64) if t <= args.slot_max else ():
            moe_kernels._slot_tiles = lambda _t, b=block_n: b
            us = time_graph(lambda: moe_experts_slots(x, chosen, weights, bank, LIMIT, n_exp),
                            args.inner, args.reps)  # fmt: skip
            results.append({"fmt": fmt, "tokens": t, "case": f"slots_n{block_n}", "us": us})
            print(results[-1], flush=True)
        for block_m in (16, 32, 64):
            moe_kernels._sorted_tiles = lambda _p, b=block_m: (b, 8)
            us = time_graph(lambda: moe_experts_sorted(x, chosen, weights, bank, LIMIT, n_exp),
                            args.inner, args.reps)  # fmt: skip
            results.append({"fmt": fmt, "tokens": t, "case": f"sorted_m{block_m}", "us": us})
            print(results[-1], flush=True)
    finally:
        moe_kernels._slot_tiles, moe_kernels._sorted_tiles = slot_tiles, sorted_tiles


def crossover(results, fmt) -> int | None:
    """Largest token count at which the slot form is faster than the sorted form."""
    us = {(r["tokens"], r["case"]): r["us"] for r in results if r["fmt"] == fmt and "us" in r}
    wins = [t for (t, c) in us if c == "ours_slots" and us[t, c] < us.get((t, "ours_sorted"), 1e30)]
    return max(wins, default=None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", default="1,32,128,4096")
    ap.add_argument("--formats", default="bf16,fp8,mxfp4")
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--inter", type=int, default=1024)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--topk", type=int, default=6)
    ap.add_argument("--inner", type=int, default=10)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--slot-max", type=int, default=256, help="skip the slot form above this T")
    ap.add_argument("--dense-max", type=int, default=4096, help="skip today's path above this T")
    ap.add_argument("--sweep", action="store_true", help="also time ours per tile size")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()
    tokens = [int(t) for t in args.tokens.split(",")]
    results = []
    print(f"GPU: {torch.cuda.get_device_name()}; d {args.hidden}, E {args.experts} (+1 shared), "
          f"I {args.inter}, top-{args.topk}")  # fmt: skip
    for fmt in args.formats.split(","):
        bank, raw = make_bank(args.experts + 1, args.hidden, args.inter, fmt)
        for t in tokens:
            bench_cell(fmt, t, args, bank, raw, results)
            if args.sweep:
                sweep(fmt, t, args, bank, results)
        del bank, raw
        torch.cuda.empty_cache()
    for t in tokens:
        bench_route(t, args, results)
    cases = list(dict.fromkeys(r["case"] for r in results))
    print(f"\n{'fmt':5} {'T':>5} " + " ".join(f"{c:>20}" for c in cases))
    for fmt in [*args.formats.split(","), "-"]:
        for t in tokens:
            row = {r["case"]: r for r in results if r["fmt"] == fmt and r["tokens"] == t}
            cells = [f"{row[c].get('us', 'err')!s:>20}" if c in row else f"{'':>20}" for c in cases]
            if any(c.strip() for c in cells):
                print(f"{fmt:5} {t:>5} " + " ".join(cells))
    key = {"mxfp4": "fp4"}  # SLOT_MAX_TOKENS has one entry for both FP4 formats
    table = {key.get(fmt, fmt): crossover(results, fmt) for fmt in args.formats.split(",")}
    print(f"\nslot form faster up to T = {table}  (ops.moe.SLOT_MAX_TOKENS)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"gpu": torch.cuda.get_device_name(), "args": vars(args),
                       "results": results, "slot_max_tokens": table}, f, indent=1)  # fmt: skip


if __name__ == "__main__":
    main()
