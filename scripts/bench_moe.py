"""GPU benchmark of one MoE layer's routed (+ shared) experts: ours (slot and sorted forms,
:mod:`sglang_dsv4.kernels.moe_experts`, and the slot form's two kernels apart), SGLang 0.5.17's
Triton ``fused_experts`` (routed only: it has no shared-expert slot; its global server args are
published first, as 0.5.17 requires), ``fp4_moe`` for MXFP4 and, with ``--dense-max``, the old
graph-safe path (every expert on every token), for bf16, FP8 and MXFP4 banks, at two shapes:

* ``served``: the Flash-dims served model (d 4096, 16 experts of I 1024, top-2, + shared);
* ``flash``: the real DSV4-Flash layer (d 4096, 256 experts of I 2048, top-6, + shared).

Each cell is timed as a CUDA graph of ``--inner`` calls (median of ``--reps`` replays, per call),
inputs fixed, after an untimed warm-up; ``GB/s`` is the weight bytes of the distinct experts the
call needs (what one read of each costs) over its time: the HBM floor is ~3,000 (H100 SXM).

    python scripts/bench_moe.py                       # both shapes, T 1 ... 128, bf16 fp8 mxfp4
    python scripts/bench_moe.py --shapes served --formats bf16 --sweep --tokens 1,4
    python scripts/bench_moe.py --out docs/gpu/bench_moe.json

Prints a table (us per call and GB/s) and, per shape and format, the largest T at which the slot
form beats the sorted one: the values for ``sglang_dsv4.ops.moe.SLOT_MAX_TOKENS`` (served shape).

``--sorted`` instead times the sorted form at prefill sizes (served shape, T 4096 / 8192 / 16384,
bf16 and FP8; ~60-90 s on an H100): each kernel at every tile of
``kernels.moe_sorted_tiles.CANDIDATES`` (us and TFLOP/s), the slot sum three ways (fp32 sum +
copy, torch's sum into out, the ``kernels.slot_sum`` launch), whole calls with the table's tiles
and with this run's fastest tiles (with and without the shared slot) and SGLang's
``fused_experts`` (routed only). It prints the rows to
paste into ``moe_sorted_tiles.MEASURED``:

    python scripts/bench_moe.py --sorted --out bench_moe_sorted.json

``--group`` instead times the sorted form's grouping of (token, slot) pairs alone
(:mod:`sglang_dsv4.kernels.moe_group`) against the torch ops it replaced (``cat``, stable
``sort``, ``searchsorted``, casts), at the served shape (16 experts + shared row, top-2), Flash
(256 + shared, top-6) and Pro (384 + shared, top-6), T 1 / 32 / 128 / 8192 by default: us per
call, kernels per call and whether the bits equal the torch ops'; above ``ONE_PROGRAM_MAX``
pairs also each chunk size of ``moe_group.CHUNKS`` (the fastest per pair count printed last,
for ``moe_group.group_chunk``; ~20 s on an H100):

    python scripts/bench_moe.py --group --out bench_moe_group.json

``--count`` instead counts, per MoE forward of the served Flash-dims layer as the model holds it
on the GPU (``configs/dsv4-flash-dims.json``: MXFP4 routed bank, the FP8 shared expert a bank of
its own; layer 0 hashed, layer 1 scored), the Triton launches and torch ops of
``ops.moe.MoeTriton.ffn`` (:mod:`sglang_dsv4.perf.op_count`), at decode (T 1 / 32 / 128) and
extend (T 8192) sizes. It runs on CPU in seconds (kernels counted, not run: no launch depends on
data); on CUDA the kernels run, and the profiler's CUDA kernel count and the time of one call
(CUDA graph of ``--inner`` calls) are printed for it and for the path before the shared bank's
rows went into the routed slot sum (:func:`ffn_before`, same weights, same bits):

    python scripts/bench_moe.py --count [--tokens 1,32,128,8192] [--out moe_count.json]
"""

import argparse
import datetime
import functools
import itertools
import json
from importlib import resources

import torch

from sglang_dsv4.kernels import moe_group
from sglang_dsv4.kernels.moe_experts import (
    ExpertWeights,
    Proj,
    SlotTiles,
    _SlotLaunch,
    moe_experts_slots,
    slot_tiles,
)
from sglang_dsv4.kernels.moe_route import moe_route
from sglang_dsv4.kernels.moe_sorted import _SortedLaunch, moe_experts_sorted
from sglang_dsv4.kernels.moe_sorted_tiles import CANDIDATES, SortedTiles, sorted_tiles
from sglang_dsv4.kernels.mxfp4_moe import FP4Bank, fp4_moe
from sglang_dsv4.kernels.slot_sum import slot_sum_torch
from sglang_dsv4.model.experts import FP8Rows
from sglang_dsv4.perf.op_count import count_ops
from sglang_dsv4.perf.timing import graph_seconds, kernel_count, write_json
from sglang_dsv4.ref.moe import DenseExperts, route_scores, route_topk, route_weights, swiglu
from sglang_dsv4.ref.weight_quant import fp8_block_quant, mxfp4_quant

LIMIT = 10.0
SHAPES = {"served": (16, 2, 1024), "flash": (256, 6, 2048)}  # experts, top-k, moe_inter
BYTES_PER_WEIGHT = {"bf16": 2.0, "fp8": 1 + 1 / 128**2, "mxfp4": 0.5 + 1 / 32}


def time_graph(fn, inner: int, reps: int) -> float:
    """Median microseconds per call of ``fn`` captured ``inner`` times in one CUDA graph."""
    return graph_seconds([fn] * inner, reps) * 1e6


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


def _one_rank_tp_group() -> None:
    """A one-rank tensor-parallel group, as a tp-1 server sets up: fused_experts enters
    ``get_tp_group()``'s symmetric-memory context (H100, 2026-12-07: "tensor model parallel
    group is not initialized" without it, so SGLang's kernel was never timed)."""
    from sglang.srt.distributed import parallel_state as ps

    from sglang_dsv4.server_process import free_port

    if ps.model_parallel_is_initialized():
        return
    port = free_port()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    ps.init_distributed_environment(world_size=1, rank=0, local_rank=0, backend=backend,
                                    distributed_init_method=f"tcp://127.0.0.1:{port}")  # fmt: skip
    ps.initialize_model_parallel(tensor_model_parallel_size=1)


def sglang_fused(raw: dict, n_exp: int, topk: int):
    """SGLang's Triton fused_experts over the same bank (routed experts only; FP8 as its
    W8A8 block path, activations quantized per 128)."""
    from sglang.srt.layers.moe.moe_runner.base import MoeRunnerConfig
    from sglang.srt.layers.moe.moe_runner.triton_utils.fused_moe import fused_experts
    from sglang.srt.layers.moe.topk import StandardTopKOutput
    from sglang.srt.runtime_context import publish
    from sglang.srt.server_args import ServerArgs

    # 0.5.17's fused_moe reads the process config ("config namespace 'exec' not published"
    # without it): a default ServerArgs, as a server process publishes its own
    publish(ServerArgs(model_path="dummy"), role="test")
    _one_rank_tp_group()

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
        row = {"shape": args.shape, "fmt": fmt, "tokens": t, "case": "sglang_fused_routed"}
        results.append(row | {"error": repr(e)[:300]})
    return cases


def routing(t, n_exp, topk):
    """``topk`` distinct uniformly random experts per token (one launch at prefill sizes)."""
    chosen = torch.rand(t, n_exp, device="cuda").argsort(dim=1)[:, :topk]
    return chosen.to(torch.int32), torch.rand(t, topk, device="cuda")


def expert_bytes(fmt, args) -> float:
    return 3 * args.hidden * args.inter * BYTES_PER_WEIGHT[fmt]


def record(results, fmt, t, name, fn, args, experts: int, extra: dict | None = None):
    """Time ``fn`` and append its row (``experts``: distinct experts it reads, for GB/s;
    ``extra``: fields the row also carries)."""
    row = {"shape": args.shape, "fmt": fmt, "tokens": t, "case": name, **(extra or {})}
    try:
        row["us"] = round(time_graph(fn, args.inner, args.reps), 2)
        row["GBps"] = round(experts * args.part * expert_bytes(fmt, args) / row["us"] / 1e3)
    except Exception as e:  # report, keep benchmarking the rest
        row["error"] = repr(e)[:300]
    results.append(row)
    print(row, flush=True)


def bench_cell(fmt, t, args, bank, raw, results):
    """Every case at ``t`` tokens; returns the inputs (the sweep reuses them)."""
    n_exp, topk = args.experts, args.topk
    x = torch.randn(t, args.hidden, device="cuda", dtype=torch.bfloat16)
    chosen, weights = routing(t, n_exp, topk)
    routed = len(set(chosen.flatten().tolist()))
    cases = {
        "ours_slots": lambda: moe_experts_slots(x, chosen, weights, bank, LIMIT, n_exp),
        "ours_sorted": lambda: moe_experts_sorted(x, chosen, weights, bank, LIMIT, n_exp),
        "ours_slots_routed": lambda: moe_experts_slots(x, chosen, weights, bank, LIMIT),
        "ours_sorted_routed": lambda: moe_experts_sorted(x, chosen, weights, bank, LIMIT),
    }
    if t > args.slot_max:
        del cases["ours_slots"], cases["ours_slots_routed"]
    cases |= baselines(fmt, raw, args, x, chosen, weights, results)
    for name, fn in cases.items():
        record(results, fmt, t, name, fn, args, routed + ("routed" not in name))
    if t <= args.slot_max:  # the slot form's kernels apart (w13: 2/3 of the bytes, w2: 1/3)
        bench_slot_kernels(fmt, t, args, bank, (x, chosen, weights), routed + 1, results)
    return x, chosen, weights


def bench_slot_kernels(fmt, t, args, bank, inputs, experts, results, tiles=None, tag=""):
    x, chosen, weights = inputs
    slots = args.topk + 1
    key = (bank.fmt, t * slots, t, args.inter, args.hidden)  # slot_tiles' arguments
    tiles = tiles or slot_tiles(*key)
    extra = {"slot_key": list(key), "tiles": list(tiles)}
    launch = _SlotLaunch(x, chosen, weights, bank, args.experts, tiles)
    h = torch.randn(t * slots, args.inter, device="cuda", dtype=x.dtype)
    out = torch.empty_like(x)
    for name, part, fn in (("slots_w13", 2 / 3, lambda: launch.w13(h, LIMIT)),
                           ("slots_w2", 1 / 3, lambda: launch.w2(h, out))):  # fmt: skip
        args.part = part
        record(results, fmt, t, name + tag, fn, args, experts, extra)
    args.part = 1.0


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
        results.append({"shape": args.shape, "fmt": "-", "tokens": t, "case": name,
                        "us": round(us, 2)})  # fmt: skip
        print(results[-1], flush=True)


def sweep(fmt, t, args, bank, inputs, results):
    """The slot kernels per tile choice (N tile x weights per thread x warps x unroll), timed
    apart on the inputs of the default cell: the data for
    :func:`~sglang_dsv4.kernels.moe_experts.slot_tiles`."""
    experts = len(set(inputs[1].flatten().tolist())) + 1
    for block_n, per_thread, warps, unroll in itertools.product(
        (4, 8, 16, 32), (32, 64), (4, 8), (1, 2)
    ):
        k = per_thread * 32 * warps // block_n
        if 64 <= k <= 4096 and not (unroll > 1 and per_thread > 32):
            tiles = SlotTiles(block_n, min(k, args.hidden), block_n, min(k, args.inter), warps,
                              unroll)  # fmt: skip
            tag = f"_n{block_n}_k{k}_w{warps}_u{unroll}"
            bench_slot_kernels(fmt, t, args, bank, inputs, experts, results, tiles, tag)


def crossover(results, shape, fmt) -> int | None:
    """Largest token count up to which the slot form is faster than the sorted form."""
    us = {(r["tokens"], r["case"]): r["us"] for r in results
          if r["shape"] == shape and r["fmt"] == fmt and "us" in r}  # fmt: skip
    tokens = sorted({t for t, _ in us})
    best = None
    for t in tokens:
        if us.get((t, "ours_slots"), 1e30) >= us.get((t, "ours_sorted"), 1e30):
            break
        best = t
    return best


def measured_rows(results) -> list[str]:
    """``moe_slot_tiles.MEASURED`` rows from the sweep: per ``slot_tiles`` key the fastest w1/w3
    tile and w2 tile that share warps and unroll (one ``SlotTiles``), with their us against the
    default tiles' in a comment."""
    sweep = [r for r in results if "_n" in r["case"] and "us" in r and "slot_key" in r]
    default = {(tuple(r["slot_key"]), r["case"]): r["us"] for r in results
               if "_n" not in r["case"] and "us" in r and "slot_key" in r}  # fmt: skip
    rows = []
    for key in dict.fromkeys(tuple(r["slot_key"]) for r in sweep):
        best = None
        for wu in {tuple(r["tiles"][4:]) for r in sweep if tuple(r["slot_key"]) == key}:
            pick = {}
            for r in sweep:
                kernel = r["case"].split("_n")[0]
                mine = tuple(r["slot_key"]) == key and tuple(r["tiles"][4:]) == wu
                if mine and (kernel not in pick or r["us"] < pick[kernel]["us"]):
                    pick[kernel] = r
            if set(pick) == {"slots_w13", "slots_w2"}:
                us = pick["slots_w13"]["us"] + pick["slots_w2"]["us"]
                if best is None or us < best[0]:
                    best = (us, pick)
        if best is None:
            continue
        us, pick = best
        tiles = (*pick["slots_w13"]["tiles"][:2], *pick["slots_w2"]["tiles"][2:4],
                 *pick["slots_w13"]["tiles"][4:])  # fmt: skip
        was = default.get((key, "slots_w13"), 0) + default.get((key, "slots_w2"), 0)
        rows.append(f"    {key}: SlotTiles{tiles},  # {us:.1f} us (default tiles {was:.1f})")
    return rows


def print_sweep(results):
    """The fastest tile per (shape, format, T, kernel) against the default tiles, then the
    rows to paste into ``kernels.moe_slot_tiles.MEASURED``."""
    best = {}
    for r in results:
        if "_n" in r["case"] and "us" in r:
            kernel = r["case"].split("_n")[0]
            key = (r["shape"], r["fmt"], r["tokens"], kernel)
            if key not in best or r["us"] < best[key]["us"]:
                best[key] = r
    default = {(r["shape"], r["fmt"], r["tokens"], r["case"]): r for r in results if "us" in r}
    for key, r in best.items():
        d = default.get(key, {})
        print(f"sweep {key}: best {r['case']} {r['us']} us ({r['GBps']} GB/s); "
              f"default tiles {d.get('us')} us ({d.get('GBps')} GB/s)")  # fmt: skip
    print("moe_slot_tiles.MEASURED rows (this GPU):")
    print("\n".join(measured_rows(results)))


def print_table(results, shape, formats, tokens):
    rows = [r for r in results if r["shape"] == shape]
    cases = list(dict.fromkeys(r["case"] for r in rows if "_n" not in r["case"]))
    print(f"\n{shape}: us (GB/s)\n{'fmt':5} {'T':>5} " + " ".join(f"{c:>19}" for c in cases))
    for fmt in [*formats, "-"]:
        for t in tokens:
            row = {r["case"]: r for r in rows if r["fmt"] == fmt and r["tokens"] == t}
            cells = []
            for c in cases:
                r = row.get(c, {})
                cell = "err" if "error" in r else f"{r['us']}" if "us" in r else ""
                cell += f" ({r['GBps']})" if "GBps" in r else ""
                cells.append(f"{cell:>19}")
            if any(c.strip() for c in cells):
                print(f"{fmt:5} {t:>5} " + " ".join(cells))


def _tile(t) -> str:
    return f"GemmTiles({', '.join(map(str, t))})"


def sorted_cell(fmt, t, args, bank, raw, results):
    """The sorted form at ``t`` tokens: each kernel per candidate tile, the slot sum both ways,
    whole calls (table tiles, this run's fastest tiles) and SGLang's fused_experts."""
    n_exp, topk, d, inter = args.experts, args.topk, args.hidden, args.inter
    x = torch.randn(t, d, device="cuda", dtype=torch.bfloat16)
    chosen, weights = routing(t, n_exp, topk)
    launch = _SortedLaunch(x, chosen, weights, bank, n_exp)
    pairs = launch.pairs
    h = torch.empty(pairs, inter, device="cuda", dtype=x.dtype)
    y = torch.empty(pairs, d, device="cuda", dtype=x.dtype)
    out = torch.empty_like(x)
    launch.w13(h, LIMIT, sorted_tiles(pairs, fmt).w13)  # real activations for w2
    flops = 2 * pairs * d * inter * 2  # w1 and w3; w2 is half of it
    runs = {"w13": (lambda g: lambda: launch.w13(h, LIMIT, g), flops),
            "w2": (lambda g: lambda: launch.w2(h, y, g), flops / 2)}  # fmt: skip
    best = {}
    for kernel, (make, fl) in runs.items():
        for tile in CANDIDATES[kernel]:
            row = {"shape": "served", "fmt": fmt, "tokens": t, "pairs": pairs, "kernel": kernel,
                   "case": f"{kernel} {_tile(tile)}", "tile": list(tile)}  # fmt: skip
            try:
                row["us"] = round(time_graph(make(tile), args.inner, args.reps), 1)
                row["TFLOPs"] = round(fl / row["us"] / 1e6, 1)
                if kernel not in best or row["us"] < best[kernel][1]:
                    best[kernel] = (tile, row["us"])
            except Exception as e:  # e.g. out of shared memory: report, time the rest
                row["error"] = repr(e)[:300]
            results.append(row)
            print(row, flush=True)
    view = y.view(t, launch.slots, d)
    tuned = SortedTiles(*(best.get(k, CANDIDATES[k])[0] for k in ("w13", "w2")))
    cases = {
        "sum fp32+copy (before)": lambda: out.copy_(view.sum(dim=1, dtype=torch.float32)),
        "sum torch into out": lambda: slot_sum_torch(y, out),
        "sum triton (slot_sum)": lambda: launch.slot_sum(y, out),
        "ours table tiles": lambda: moe_experts_sorted(x, chosen, weights, bank, LIMIT, n_exp),
        "ours best tiles": lambda: moe_experts_sorted(x, chosen, weights, bank, LIMIT, n_exp,
                                                      tiles=tuned),
        "ours best routed": lambda: moe_experts_sorted(x, chosen, weights, bank, LIMIT,
                                                       tiles=tuned),
    }  # fmt: skip
    try:
        fused = sglang_fused(raw, n_exp, topk)
        cases["sglang fused routed"] = lambda: fused(x, chosen, weights)
    except Exception as e:  # report, keep ours
        results.append({"fmt": fmt, "tokens": t, "case": "sglang fused routed",
                        "error": repr(e)[:300]})  # fmt: skip
    for name, fn in cases.items():
        row = {"shape": "served", "fmt": fmt, "tokens": t, "pairs": pairs, "case": name}
        try:
            row["us"] = round(time_graph(fn, args.inner, args.reps), 1)
        except Exception as e:  # report, time the rest
            row["error"] = repr(e)[:300]
        results.append(row)
        print(row, flush=True)


def sorted_measured(results) -> list[tuple]:
    """The fastest tile per (format, kernel, pair count): rows of ``MEASURED``."""
    best = {}
    for r in results:
        if "kernel" in r and "us" in r:
            key = (r["fmt"], r["kernel"], r["pairs"])
            if key not in best or r["us"] < best[key][4]:
                best[key] = (*key, tuple(r["tile"]), r["us"])
    return [best[k] for k in sorted(best)]


def print_sorted(results) -> None:
    """Per format and T: each case's us (TFLOP/s), then the MEASURED rows to paste."""
    for fmt in dict.fromkeys(r["fmt"] for r in results):
        rows = [r for r in results if r["fmt"] == fmt]
        tokens = sorted({r["tokens"] for r in rows})
        cases = list(dict.fromkeys(r["case"] for r in rows))
        print(f"\n{fmt}: us (TFLOP/s) at T = {tokens}")
        for c in cases:
            cells = []
            for t in tokens:
                r = next((r for r in rows if r["case"] == c and r["tokens"] == t), {})
                cell = "err" if "error" in r else str(r.get("us", ""))
                cell += f" ({r['TFLOPs']})" if "TFLOPs" in r else ""
                cells.append(f"{cell:>18}")
            print(f"  {c:44s}" + "".join(cells))
    when = f"{datetime.date.today()} {torch.cuda.get_device_name()}"
    print(f"\nMEASURED rows (kernels/moe_sorted_tiles.py), {when}, bench_moe.py --sorted:")
    for fmt, kernel, pairs, tile, us in sorted_measured(results):
        print(f'    ("{fmt}", "{kernel}", {pairs}, {_tile(tile)}, {us}),')


def run_sorted(args) -> list:
    results = []
    args.experts, args.topk, args.inter = SHAPES["served"]
    for fmt in args.formats.split(","):
        bank, raw = make_bank(args.experts + 1, args.hidden, args.inter, fmt)
        for t in (int(t) for t in args.tokens.split(",")):
            sorted_cell(fmt, t, args, bank, raw, results)
        del bank, raw
        torch.cuda.empty_cache()
    print_sorted(results)
    return results


GROUP_SHAPES = {"served": (16, 2), "flash": (256, 6), "pro": (384, 6)}  # experts, top-k


def group_cell(shape, t, args, results) -> None:
    """The grouping at ``t`` tokens of ``shape`` (shared row E): the torch ops, the kernel's
    default launch and, above one program, each chunk size."""
    n_exp, topk = GROUP_SHAPES[shape]
    chosen, weights = routing(t, n_exp, topk)
    chosen[: t // 2, 0] = 1  # a crowded expert, as routers give at prefill
    pairs = t * (topk + 1)
    rows = n_exp + 1

    def group(chunk=None):
        return moe_group.group_pairs(chosen, weights, rows, n_exp, chunk)

    want = moe_group.group_pairs_torch(chosen, weights, rows, n_exp)
    cases = {"torch ops (before)": lambda: moe_group.group_pairs_torch(chosen, weights, rows,
                                                                       n_exp),
             "moe_group": group}  # fmt: skip
    if pairs > moe_group.ONE_PROGRAM_MAX:
        cases |= {f"moe_group chunk {c}": functools.partial(group, c) for c in moe_group.CHUNKS}
    for name, fn in cases.items():
        row = {"shape": shape, "tokens": t, "pairs": pairs, "case": name}
        try:
            got = fn()
            row["same_bits"] = all(torch.equal(a.view(torch.int32), b.view(torch.int32))
                                   for a, b in zip(got, want, strict=True))  # fmt: skip
            row["kernels"] = kernel_count(fn)
            row["us"] = round(time_graph(fn, args.inner, args.reps), 2)
        except Exception as e:  # report, time the rest
            row["error"] = repr(e)[:300]
        results.append(row)
        print(row, flush=True)


def run_group(args) -> list:
    results = []
    tokens = [int(t) for t in args.tokens.split(",")]
    for shape in GROUP_SHAPES:
        for t in tokens:
            group_cell(shape, t, args, results)
    print(f"\ngrouping: us (kernels, same bits) at T = {tokens}")
    for shape in GROUP_SHAPES:
        for case in dict.fromkeys(r["case"] for r in results if r["shape"] == shape):
            cells = []
            for t in tokens:
                r = next((r for r in results if (r["shape"], r["case"], r["tokens"]) ==
                          (shape, case, t)), {})  # fmt: skip
                cell = f"{r['us']} ({r['kernels']}, {r['same_bits']})" if "us" in r else ""
                cell = "err" if "error" in r else cell
                cells.append(f"{cell:>22}")
            print(f"  {shape:6} {case:24s}" + "".join(cells))
    best = {}
    for r in results:
        timed = r["case"].startswith("moe_group chunk") and "us" in r and r["same_bits"]
        if timed and (r["pairs"] not in best or r["us"] < best[r["pairs"]][1]):
            best[r["pairs"]] = (r["case"].split()[-1], r["us"])
    gpu = torch.cuda.get_device_name()
    print(f"fastest chunk (us) per pair count, {gpu}: {dict(sorted(best.items()))}")
    return results


def flash_layer(index: int, device: str):
    """(config, MoE block ``index`` of the Flash-dims served model, random weights) as the model
    holds it on the GPU (``KeptFormats`` on_gpu: the released formats kept)."""
    from sglang_dsv4.config import DSV4Config
    from sglang_dsv4.model.experts import MoE
    from sglang_dsv4.model.linears import KeptFormats

    path = resources.files("sglang_dsv4.configs").joinpath("dsv4-flash-dims.json")
    cfg = DSV4Config.from_dict(json.loads(path.read_text()))
    with torch.device(device):
        layer = MoE(cfg, cfg.layers[index], KeptFormats(cfg, None, on_gpu=True),
                    f"layers.{index}.ffn.")  # fmt: skip
    randomize(layer, cfg.n_routed_experts)
    return cfg, layer


@torch.no_grad()
def randomize(layer, n_exp: int) -> None:
    """Random weights in every format (finite: e4m3 from normals, e8m0 / scale bytes near 2^0)
    so that routing spreads tokens over the experts as a trained gate does."""
    for name, t in [*layer.named_parameters(), *layer.named_buffers()]:
        if "global_scale" in name:
            continue
        if t.dtype in (torch.uint8, torch.float8_e8m0fnu) and "scale" in name:
            t.view(torch.uint8).copy_(torch.randint(118, 128, t.shape, dtype=torch.uint8))
        elif t.dtype == torch.uint8:  # packed e2m1 codes
            t.copy_(torch.randint(0, 256, t.shape, dtype=torch.uint8))
        elif t.dtype == torch.float8_e4m3fn:
            t.copy_(torch.randn(t.shape).to(t.dtype))
        elif not t.is_floating_point():  # tid2eid
            t.copy_(torch.randint(0, n_exp, t.shape))
        else:
            t.copy_(torch.randn(t.shape) * t.shape[-1] ** -0.5)


def ffn_before(ops, layer, x, ids):
    """``MoeTriton.ffn`` of main before this change: the shared bank with top-k 0 (its own
    grouping launch and slot sum in the sorted form), then a torch add."""
    limit = ops.cfg.swiglu_limit
    chosen, weights = ops.route(layer, x, ids)
    form = ops.form(layer, x.shape[0])
    out = layer.experts.grouped(x, chosen, weights, limit, form, layer.shared_row)
    return out + layer.shared.grouped(x, chosen[:, :0], weights[:, :0], limit, form, 0)


def count_cell(index: int, t: int, cfg, layer, ops, device: str, args) -> dict:
    """Launches and torch ops of one ``ffn`` call at ``t`` tokens (``--count``)."""
    x = torch.randn(t, cfg.hidden_size, device=device, dtype=torch.bfloat16)
    ids = torch.randint(0, cfg.vocab_size, (t,), device=device)
    cuda = device == "cuda"
    fn = functools.partial(ops.ffn, layer, x, ids)
    count_ops(fn, dry=not cuda)  # warm-up: compiles, operands made once per bank
    counts, _ = count_ops(fn, dry=not cuda)
    row = {"layer": index, "hash": layer.hash_moe, "tokens": t, "form": ops.form(layer, t)}
    row |= counts.summary()
    if cuda:
        before = functools.partial(ffn_before, ops, layer, x, ids)
        row["same_bits"] = torch.equal(fn().view(torch.int16), before().view(torch.int16))
        row["cuda_kernels"], row["cuda_kernels_before"] = kernel_count(fn), kernel_count(before)
        row["us"] = round(time_graph(fn, args.inner, args.reps), 2)
        row["us_before"] = round(time_graph(before, args.inner, args.reps), 2)
    return row


def run_count(args) -> list:
    from sglang_dsv4.ops.moe import MoeTriton

    device = "cuda" if torch.cuda.is_available() else "cpu"
    results = []
    for index in (1, 0):  # scored, hashed
        cfg, layer = flash_layer(index, device)
        ops = MoeTriton(cfg, torch.device(device))
        for t in (int(t) for t in args.tokens.split(",")):
            results.append(count_cell(index, t, cfg, layer, ops, device, args))
            print(results[-1], flush=True)
    print(f"\nMoE forward, Flash-dims served layer ({device}): kernels = Triton launches + "
          "device torch ops; torch ops = device + view/alloc ops")  # fmt: skip
    print(f"{'layer':>6} {'T':>5} {'form':>7} {'kernels':>8} {'triton':>7} {'dev ops':>8} "
          f"{'torch ops':>10}  triton kernels / device ops")  # fmt: skip
    for r in results:
        names = " ".join(f"{k}x{v}" for k, v in {**r["triton_names"], **r["device_ops"]}.items())
        kind = "hash" if r["hash"] else "scored"
        print(f"{kind:>6} {r['tokens']:>5} {r['form']:>7} {r['kernels']:>8} {r['triton']:>7} "
              f"{r['torch_device_ops']:>8} {r['torch_ops']:>10}  {names}")  # fmt: skip
    if device == "cuda":
        print(
            f"\n{torch.cuda.get_device_name()}: CUDA kernels (profiler) and us per call, "
            "graph-replayed; before = the shared bank's own grouping + slot sum + torch add"
        )
        print(f"{'layer':>6} {'T':>5} {'kernels':>8} {'before':>7} {'us':>9} {'before':>9} "
              f"{'same bits':>9}")  # fmt: skip
        for r in results:
            kind = "hash" if r["hash"] else "scored"
            print(f"{kind:>6} {r['tokens']:>5} {r['cuda_kernels']:>8} "
                  f"{r['cuda_kernels_before']:>7} {r['us']:>9} {r['us_before']:>9} "
                  f"{r['same_bits']!s:>9}")  # fmt: skip
    return results


# --tokens / --formats / --inner / --reps unless given: decode sizes, or (--sorted) prefill sizes
MODE_DEFAULTS = {
    "decode": dict(tokens="1,2,4,8,16,32,128", formats="bf16,fp8,mxfp4", inner=10, reps=20),
    "sorted": dict(tokens="4096,8192,16384", formats="bf16,fp8", inner=3, reps=5),
    "group": dict(tokens="1,32,128,8192", formats="", inner=10, reps=20),
    "count": dict(tokens="1,32,128,8192", formats="", inner=10, reps=20),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="served,flash", help=f"of {list(SHAPES)}")
    ap.add_argument("--tokens", default=None, help="default: per mode (MODE_DEFAULTS)")
    ap.add_argument("--formats", default=None, help="default: per mode")
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--inner", type=int, default=None, help="default: per mode")
    ap.add_argument("--reps", type=int, default=None, help="default: per mode")
    ap.add_argument("--slot-max", type=int, default=128, help="skip the slot form above this T")
    ap.add_argument("--dense-max", type=int, default=0, help="old dense path up to this T")
    ap.add_argument("--sweep", action="store_true", help="also time the slot kernels per tile")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--sorted", action="store_true", help="the sorted form at prefill sizes")
    ap.add_argument("--group", action="store_true", help="the sorted form's grouping alone")
    ap.add_argument("--count", action="store_true", help="launches + torch ops per MoE call")
    args = ap.parse_args()
    args.part = 1.0
    mode = "count" if args.count else "group" if args.group else "sorted" if args.sorted else None
    for k, v in MODE_DEFAULTS[mode or "decode"].items():  # what was not given
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.count:
        results = run_count(args)
        if args.out:
            write_json(args.out, {"args": vars(args), "results": results})
        return
    if args.group:
        print(f"GPU: {torch.cuda.get_device_name()}")
        results = run_group(args)
        if args.out:
            write_json(args.out, {"gpu": torch.cuda.get_device_name(), "args": vars(args),
                                  "results": results})  # fmt: skip
        return
    if args.sorted:
        print(f"GPU: {torch.cuda.get_device_name()}")
        results = run_sorted(args)
        if args.out:
            rows = sorted_measured(results)
            write_json(args.out, {"gpu": torch.cuda.get_device_name(), "args": vars(args),
                                  "results": results, "measured": rows})  # fmt: skip
        return
    tokens, formats = [int(t) for t in args.tokens.split(",")], args.formats.split(",")
    results, tables = [], {}
    print(f"GPU: {torch.cuda.get_device_name()}")
    for shape in args.shapes.split(","):
        args.shape = shape
        args.experts, args.topk, args.inter = SHAPES[shape]
        for fmt in formats:
            bank, raw = make_bank(args.experts + 1, args.hidden, args.inter, fmt)
            for t in tokens:
                inputs = bench_cell(fmt, t, args, bank, raw, results)
                if args.sweep:
                    sweep(fmt, t, args, bank, inputs, results)
            del bank, raw
            torch.cuda.empty_cache()
        for t in tokens:
            bench_route(t, args, results)
        print_table(results, shape, formats, tokens)
        key = {"mxfp4": "fp4"}  # SLOT_MAX_TOKENS has one entry for both FP4 formats
        tables[shape] = {key.get(f, f): crossover(results, shape, f) for f in formats}
    if args.sweep:
        print_sweep(results)
    for shape, table in tables.items():
        print(f"\n{shape}: slot form faster up to T = {table}  (ops.moe.SLOT_MAX_TOKENS)")
    if "served" in tables:  # the table's source: paste into sglang_dsv4/ops/moe.py
        when = f"measured {datetime.date.today()} {torch.cuda.get_device_name()}, bench_moe.py"
        lines = [f'    "{k}": {v},  # {when}' for k, v in tables["served"].items() if v is not None]
        print("SLOT_MAX_TOKENS = {\n" + "\n".join(lines) + "\n}")
    if args.out:
        write_json(args.out, {"gpu": torch.cuda.get_device_name(), "args": vars(args),
                              "results": results, "slot_max_tokens": tables})  # fmt: skip


if __name__ == "__main__":
    main()
