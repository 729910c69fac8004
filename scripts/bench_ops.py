"""Time the served model's op families (``sglang_dsv4.ops``) on one GPU: the Triton ops against
their torch twins (the ``ref`` math the model ran before), at decode batch sizes and one
prefill chunk: mHC boundaries, norm / RoPE, MoE routing (E 16 as the Flash-dims test model and
the config's E).

    python scripts/bench_ops.py [--config configs/dsv4-flash.json] [--tokens 1,32,128,4096]
                                [--out DIR] [--reps N] [--impls triton,torch] [--only hc.,moe.]

Each op is captured in a CUDA graph (as in a decode step) ``--calls`` times in a row and timed
by replaying the graph: median of ``--reps`` replays, CUDA events, per call. GPU kernels per call
come from one eager call under the torch profiler. GB/s: the bytes an op must move at least
(weights read once, activations read / written once) over its time. bf16 streams /
activations, fp32 mHC weights and maps, the config's dims (Flash: hidden 4096, 64 heads x 512,
q_lora 1024, indexer 64 x 128). "Layer" sums one layer's share: two mHC boundaries, q_norm,
q / kv norm + RoPE, indexer RoPE, the inverse RoPE of the output and the routing (E 16,
scored). Writes ``bench_ops.json`` to ``--out`` (default ``$OUT`` or ``.``) and prints a table.

``--rope-shapes`` instead times ``kernels.norm_rope.rms_rope_`` at every launch shape of
``kernels.norm_rope_shapes.CANDIDATES`` for the three served uses (q norm + RoPE [T, H, 512],
the output's inverse RoPE [T, H, 512], the indexer's RoPE [T, H_idx, 128]) at ``--tokens``,
checks each candidate's bits against the default shape's, writes ``bench_rope_shapes.json`` and
prints a table, then the rows to paste into ``norm_rope_shapes.MEASURED`` (the fastest candidate
with the default's bits per use and T):

    python scripts/bench_ops.py --rope-shapes --config configs/dsv4-flash-dims.json \
        --tokens 1,32,128,1024,8192
"""

import argparse
import datetime
import json
import os
from functools import partial
from types import SimpleNamespace

import torch

from sglang_dsv4.config import load_config
from sglang_dsv4.kernels.norm_rope import rms_rope_
from sglang_dsv4.kernels.norm_rope_shapes import CANDIDATES, default_shape
from sglang_dsv4.kernels.slot_sum import slot_sum, slot_sum_torch
from sglang_dsv4.ops import HcWeights, build_ops
from sglang_dsv4.perf.timing import graph_seconds, kernel_count
from sglang_dsv4.ref.rope import rope_inv_freq

DEV = "cuda"


def graph_time(fn, calls: int, reps: int) -> float:
    """Seconds per call of ``fn`` replayed from a CUDA graph of ``calls`` calls."""
    return graph_seconds([fn] * calls, reps)


def route_cases(cfg, ops, n: int, rnd) -> dict:
    """MoE routing (scored and hash layers) at E 16 and the config's E -> (closure, bytes)."""
    out = {}
    for n_exp in dict.fromkeys((16, cfg.n_routed_experts)):
        gate = SimpleNamespace(weight=rnd(n_exp, cfg.hidden_size, s=cfg.hidden_size**-0.5),
                               bias=rnd(n_exp, dtype=torch.float32, s=0.1),
                               tid2eid=torch.randint(0, n_exp, (1000, cfg.n_experts_per_tok),
                                                     device=DEV))  # fmt: skip
        x, ids = rnd(n, cfg.hidden_size), torch.randint(0, 1000, (n,), device=DEV)
        moved = (n_exp + n) * cfg.hidden_size * 2
        for kind in ("scored", "hash"):
            layer = SimpleNamespace(gate=gate, hash_moe=kind == "hash")
            out[f"moe.route E{n_exp} {kind}"] = (
                lambda layer=layer, x=x, ids=ids: ops.moe.route(layer, x, ids),
                moved,
            )
    return out


def cases(cfg, ops, n: int) -> dict:
    """name -> (closure of one op call at ``n`` tokens, bytes it must move); fresh random
    inputs, fixed per case."""
    g = torch.Generator(device=DEV).manual_seed(n)
    hc, d, bf = cfg.hc_mult, cfg.hidden_size, torch.bfloat16

    def rnd(*shape, dtype=bf, s=1.0):
        return (torch.randn(*shape, device=DEV, generator=g) * s).to(dtype)

    def site(m: int, k: int) -> HcWeights:
        return HcWeights(rnd(m, hc * d, dtype=torch.float32, s=(hc * d) ** -0.5),
                         rnd(m, dtype=torch.float32), rnd(k, dtype=torch.float32).abs(),
                         rnd(d).abs())  # fmt: skip

    mix, head = site(cfg.hc_mix_dim, 3), site(hc, 1)
    x, y = rnd(n, hc, d), rnd(n, d)
    _, post, comb = ops.hc.pre(x, mix)
    pos = torch.randint(0, 1 << 16, (n,), device=DEV, generator=g)
    inv_freq = rope_inv_freq(cfg.layers[-1].rope, cfg.rope_dim).to(DEV)
    qa, qa_w = rnd(n, cfg.q_lora_rank), rnd(cfg.q_lora_rank).abs()
    q, kv, kv_w = rnd(n, cfg.num_heads, cfg.head_dim), rnd(n, cfg.head_dim), rnd(cfg.head_dim)
    iq, o = rnd(n, cfg.index_n_heads, cfg.index_head_dim), rnd(n, cfg.num_heads, cfg.head_dim)
    norm = ops.norm
    size = x.element_size()
    streams, row = x.numel() * size, y.numel() * size  # [T, hc, d] / [T, d] once
    fn_mix, fn_head = mix.fn.numel() * 4, head.fn.numel() * 4

    def rw(t):  # read + write once
        return 2 * t.numel() * t.element_size()

    return {
        "hc.pre": (lambda: ops.hc.pre(x, mix), fn_mix + streams + row),
        # reads streams + y, writes new streams (alone: before the MTP draft's head)
        "hc.post": (lambda: ops.hc.post(y, x, post, comb), 2 * streams + row),
        # reads streams + y, writes new streams + h
        "hc.post_pre": (
            lambda: ops.hc.post_pre(y, x, post, comb, mix),
            fn_mix + 2 * streams + 2 * row,
        ),
        "hc.post_head": (
            lambda: ops.hc.post_head(y, x, post, comb, head),
            fn_head + streams + 2 * row,
        ),
        "norm.rms q_norm": (lambda: norm.rms(qa, qa_w), rw(qa)),
        "norm.rms_rope q": (lambda: norm.rms_rope(q, None, pos, inv_freq), rw(q)),
        "norm.rms_rope kv": (lambda: norm.rms_rope(kv, kv_w, pos, inv_freq), rw(kv)),
        "norm.rope indexer q": (lambda: norm.rope(iq, pos, inv_freq), n * cfg.index_n_heads * 256),
        "norm.rope o inverse": (
            lambda: norm.rope(o, pos, inv_freq, inverse=True),
            n * cfg.num_heads * 256,
        ),
    } | route_cases(cfg, ops, n, rnd)


LAYER = {"hc.post_pre": 2, "norm.rms q_norm": 1, "norm.rms_rope q": 1, "norm.rms_rope kv": 1,
         "norm.rope indexer q": 1, "norm.rope o inverse": 1, "moe.route E16 scored": 1}  # fmt: skip


def rope_uses(cfg, n: int) -> dict:
    """The served ``rms_rope_`` uses at ``n`` tokens: name -> (x, norm, inverse, bytes moved)."""
    g = torch.Generator(device=DEV).manual_seed(n)

    def rnd(*shape):
        return torch.randn(*shape, device=DEV, generator=g).to(torch.bfloat16)

    q = rnd(n, cfg.num_heads, cfg.head_dim)
    return {
        "q norm+rope": (q, True, False, 2 * q.numel() * 2),
        "o inverse rope": (rnd(n, cfg.num_heads, cfg.head_dim), False, True,
                           n * cfg.num_heads * 256),
        "indexer q rope": (rnd(n, cfg.index_n_heads, cfg.index_head_dim), False, False,
                           n * cfg.index_n_heads * 256),
    }  # fmt: skip


def rope_shape_rows(cfg, batches, calls: int, reps: int) -> list[dict]:
    """Every candidate launch shape of every served use at every T: us, GB/s, same bits as the
    default shape (one call each on a copy of the same input)."""
    inv_freq = rope_inv_freq(cfg.layers[-1].rope, cfg.rope_dim).to(DEV)
    rows = []
    for n in batches:
        pos = torch.randint(0, 1 << 16, (n,), device=DEV)
        for use, (x, norm, inverse, moved) in rope_uses(cfg, n).items():
            d = x.shape[-1]
            kw = dict(norm=norm, inverse=inverse)
            want = rms_rope_(x.clone(), pos, inv_freq, shape=default_shape(d, norm), **kw)
            for shape in CANDIDATES[(d, norm)]:
                got = rms_rope_(x.clone(), pos, inv_freq, shape=shape, **kw)
                same = torch.equal(got.view(torch.uint8), want.view(torch.uint8))
                work = x.clone()  # timed in place on a copy: x stays every candidate's input
                call = partial(rms_rope_, work, pos, inv_freq, shape=shape, **kw)
                us = graph_time(call, calls, reps) * 1e6
                del work
                rows.append({"tokens": n, "use": use, "d": d, "norm": norm,
                             "rows": n * x.shape[1], "shape": list(shape), "us": us,
                             "gbps": moved / us * 1e-3, "same_bits": same})  # fmt: skip
                print(f"{n:5d} {use:15s} {shape} {us:8.1f} us {rows[-1]['gbps']:7.1f} GB/s"
                      f"{'' if same else '  BITS DIFFER'}", flush=True)  # fmt: skip
    return rows


def print_rope_shapes(rows: list[dict], batches) -> None:
    """Per use and T: the default's us, the fastest same-bits candidate; then MEASURED rows."""
    print(f"\n{torch.cuda.get_device_name()}: rms_rope_ us per call, default -> fastest")
    paste = []
    for use in dict.fromkeys(r["use"] for r in rows):
        cells = []
        for n in batches:
            mine = [r for r in rows if r["use"] == use and r["tokens"] == n]
            best = min((r for r in mine if r["same_bits"]), key=lambda r: r["us"])
            base = mine[0]  # the default shape comes first in CANDIDATES
            cells.append(f"T={n}: {base['us']:.1f} -> {best['us']:.1f} {tuple(best['shape'])}")
            paste.append((best["d"], best["norm"], best["rows"], tuple(best["shape"]), best["us"]))
        print(f"{use:15s} " + " | ".join(cells))
    print(f"\n# {datetime.date.today()}, {torch.cuda.get_device_name()}: "
          "scripts/bench_ops.py --rope-shapes")  # fmt: skip
    for d, norm, n_rows, shape, us in sorted(set(paste)):
        print(f"({d}, {norm}, {n_rows}, RopeShape{shape}, {us:.1f}),")


def slot_sum_rows(cfg, batches, calls: int, reps: int) -> list[dict]:
    """The slot-sum kernel and torch's sum at every T and slot count: us, GB/s, same bits."""
    rows, d = [], cfg.hidden_size
    for n in batches:
        for s in dict.fromkeys((cfg.n_experts_per_tok + 1, 7)):
            y = torch.randn(n * s, d, device=DEV).to(torch.bfloat16)
            outs = {k: torch.empty(n, d, device=DEV, dtype=y.dtype) for k in ("triton", "torch")}
            fns = {"triton": partial(slot_sum, y, outs["triton"]),
                   "torch": partial(slot_sum_torch, y, outs["torch"])}  # fmt: skip
            us = {impl: graph_time(fn, calls, reps) * 1e6 for impl, fn in fns.items()}
            same = torch.equal(*(o.view(torch.uint8) for o in outs.values()))
            moved = (s + 1) * n * d * 2  # y read once, out written once
            for impl, t_us in us.items():
                rows.append({"tokens": n, "slots": s, "impl": impl, "us": t_us,
                             "same_bits": same, "gbps": moved / t_us * 1e-3})  # fmt: skip
                print(f"slot sum T={n:5d} S={s} {impl:6s} {t_us:8.1f} us "
                      f"{rows[-1]['gbps']:7.1f} GB/s same bits {same}", flush=True)  # fmt: skip
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/dsv4-flash.json")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--tokens", default="1,32,128,4096", help="token counts (batch at decode)")
    ap.add_argument("--impls", default="triton,torch", help="triton and / or torch (the twins)")
    ap.add_argument("--only", default="", help="comma-separated op-name prefixes (hc.,moe.)")
    ap.add_argument("--rope-shapes", action="store_true", help="rms_rope_ launch shapes")
    ap.add_argument("--slot-sum", action="store_true", help="the MoE slot sum vs torch's")
    args = ap.parse_args()
    batches = [int(n) for n in args.tokens.split(",")]
    cfg = load_config(args.config)
    if args.slot_sum:
        rows = slot_sum_rows(cfg, batches, args.calls, args.reps)
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "bench_slot_sum.json"), "w") as f:
            json.dump({"gpu": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)
        return
    if args.rope_shapes:
        rows = rope_shape_rows(cfg, batches, args.calls, args.reps)
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "bench_rope_shapes.json"), "w") as f:
            json.dump({"gpu": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)
        print_rope_shapes(rows, batches)
        return
    every = {
        "triton": lambda: build_ops(cfg, DEV),
        "torch": lambda: build_ops(cfg, DEV, kernels=False),
    }
    impls = {name: every[name]() for name in args.impls.split(",")}
    only = tuple(p for p in args.only.split(",") if p)
    rows = []
    for n in batches:
        for impl, ops in impls.items():
            for name, (fn, moved) in cases(cfg, ops, n).items():
                if only and not name.startswith(only):
                    continue
                us = graph_time(fn, args.calls, args.reps) * 1e6
                rows.append({"batch": n, "impl": impl, "op": name, "us": us, "bytes": moved,
                             "gbps": moved / us * 1e-3, "kernels": kernel_count(fn)})  # fmt: skip
                print(f"{n:4d} {impl:6s} {name:24s} {us:9.1f} us {rows[-1]['gbps']:7.1f} GB/s "
                      f"{rows[-1]['kernels']:4d} kernels")  # fmt: skip
    for n in batches:
        for impl in impls:
            mine = [r for r in rows if r["batch"] == n and r["impl"] == impl and r["op"] in LAYER]
            us = sum(LAYER[r["op"]] * r["us"] for r in mine)
            kernels = sum(LAYER[r["op"]] * r["kernels"] for r in mine)
            rows.append({"batch": n, "impl": impl, "op": "layer", "us": us, "kernels": kernels})
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "bench_ops.json")
    meta = {"gpu": torch.cuda.get_device_name(), "config": args.config, "reps": args.reps}
    with open(path, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    print(f"\n{meta['gpu']}, {args.config}; us per call (kernels per call) [GB/s]; "
          f"wrote {path}")  # fmt: skip
    ops = list(dict.fromkeys(r["op"] for r in rows))
    head = "".join(f" {i:>6s} (kern) [GB/s]" for i in impls)
    print(f"{'op':24s}" + "".join(f" | T={n:<4d}{head}" for n in batches))
    for op in ops:
        cells = []
        for n in batches:
            cell = " |      "
            for i in impls:
                r = next(x for x in rows if (x["batch"], x["impl"], x["op"]) == (n, i, op))
                gbps = f"{r['gbps']:6.0f}" if "gbps" in r else " " * 6
                cell += f" {r['us']:7.1f} ({r['kernels']:3d}) [{gbps}]"
            cells.append(cell)
        print(f"{op:24s}" + "".join(cells))


if __name__ == "__main__":
    main()
