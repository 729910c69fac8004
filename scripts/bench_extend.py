"""Time the extend (prefill) path of each layer kind on one GPU, op by op (one command).

    python scripts/bench_extend.py [--cases 1x32768,32x4096,4x4096+28672] [--rows fp8|bf16]
                                   [--reps N] [--no-twin]
    python scripts/bench_extend.py --measure      # the served extend shapes, for MEASURED
    python scripts/paste_measured.py $OUT/bench_extend.json   # then, in the repo: the table

Flash dims (``configs/dsv4-flash-dims.json``: 64 heads x 512, indexer 64 x 128, top-k 512,
window 128) on real DSV4 pools (``mem.pools.DSV4KVPool``; ``--rows fp8``, the GPU default: FP8
rows and FP8 indexer keys; ``bf16``: bf16 rows, FP8 keys), driven the
way the backend drives them: ``plan_batch`` + ``wrapper.plan()`` once per batch, then per layer
kind the ops of ``attention.extend_ops`` (KV store, compressor flush, indexer top-k, sparse
attention) and the whole ``wrapper.run()``. A case ``BxN`` is B requests of N new tokens
(``BxN+P``: over a cached prefix of P tokens, tails kept). Timing: CUDA events around each call,
median of ``--reps`` (eager, as extend runs). With the twin (default) the torch twins of the
flush and the indexer (the previous per-request path) are timed once for comparison.

Where FlashMLA's sparse prefill can serve (sm90, FP8 / bf16 rows), the attention is also timed
both ways (ours over the pools, FlashMLA over its gathered workspace, gather included) and the
rows of ``attention.extend_choice.MEASURED`` are printed and kept in the JSON (``measured``);
``--measure`` runs the shapes extend batches have when served (chunks of at most 8192 new
tokens, after prefixes up to 128K): plan, the whole run and the attention both ways, 5 reps.

Writes ``bench_extend.json`` to ``--out`` (default ``$OUT`` or ``.``) and prints a table last.
"""

import argparse
import functools
import json
import os
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

import torch

from sglang_dsv4.attention.decode import KVNorm
from sglang_dsv4.attention.extend_choice import AttendChoice
from sglang_dsv4.attention.extend_ops import Picks, extend_ops
from sglang_dsv4.attention.plan import plan_batch
from sglang_dsv4.attention.plan_tables import tables_builder
from sglang_dsv4.attention.wrappers import (
    CompressedInputs,
    CSAWrapper,
    HCAWrapper,
    IndexerInputs,
    SWAWrapper,
)
from sglang_dsv4.config import AttnKind, load_config
from sglang_dsv4.mem.pools import DSV4KVPool
from sglang_dsv4.mem.schema import CacheSchema, EntryFormat
from sglang_dsv4.perf.measured import extend_rows, render
from sglang_dsv4.perf.timing import event_seconds as timed
from sglang_dsv4.perf.timing import host_seconds as host_timed
from sglang_dsv4.ref.compressor import CompressorWeights

DEV = "cuda"
# served extend shapes: one short / one 4K prompt, a full 8192-token chunk, many short prompts,
# and 8192-token chunks after 24K / 120K of prefix (long prompts under chunked prefill)
MEASURE_CASES = "1x512,16x512,1x4096,2x4096,1x8192+24576,1x8192+122880"
BLOCK = 128
CONFIG = Path(__file__).resolve().parents[1] / "configs" / "dsv4-flash-dims.json"
ERRORS: list[str] = []


class World:
    """Pools + SGLang-shaped bookkeeping for ``b`` requests of ``prefix + n`` tokens (full and
    swa slots identical, request ``i`` on pages ``1 + i * pages ..``)."""

    def __init__(self, cfg, b: int, prefix: int, n: int, rows: str):
        fmt = EntryFormat.FP8 if rows == "fp8" else EntryFormat.BF16
        schema = CacheSchema.from_config(cfg, fmt, EntryFormat.FP8)
        self.pages = -(-(prefix + n) // BLOCK)
        slots = b * self.pages * BLOCK
        self.pool = DSV4KVPool(schema, slots, slots, b, torch.bfloat16, DEV)
        self.pool.register_mapping(torch.arange(slots + BLOCK + 1, device=DEV))
        cols = torch.arange(self.pages * BLOCK, device=DEV)
        self.rtt = (BLOCK + torch.arange(b, device=DEV)[:, None] * self.pages * BLOCK + cols).int()
        self.rtp = SimpleNamespace(req_to_token=self.rtt, req_generation=torch.ones(b))
        self.b, self.prefix, self.n = b, prefix, n
        if prefix:  # the prefix was this request's own earlier chunk: its tail continues
            self.pool.tail_owner[:b] = [1] * b

    def plan(self):
        b, p, n = self.b, self.prefix, self.n
        fb = SimpleNamespace(
            forward_mode=SimpleNamespace(is_decode=lambda: False, is_target_verify=lambda: False),
            seq_lens_cpu=torch.tensor([p + n] * b),
            extend_prefix_lens=torch.tensor([p] * b),
            req_pool_indices=torch.arange(b),
            out_cache_loc=self.rtt[:, p : p + n].flatten().long(),
        )
        self.pool.tail_pos[:b] = p  # plan_batch records progress; rewind it for repeated plans
        # the served builder of the plan's device half (one launch on the GPU)
        tables = tables_builder(self.pool.tail_pos.device.type == "cuda")
        return plan_batch(fb, self.pool, self.rtp, tables=tables)


def make_wrapper(cfg, kind: AttnKind, lk, kernels: bool):
    ops = extend_ops(
        kind.value,
        lk,
        window=cfg.sliding_window,
        n_heads=cfg.num_heads,
        index_heads=cfg.index_n_heads,
        topk=cfg.index_topk,
        device=DEV,
        kernels=kernels,
        norm_eps=cfg.norm_eps,
    )
    if kind is AttnKind.CSA:
        return CSAWrapper(cfg.sliding_window, ops, topk=cfg.index_topk)
    return {AttnKind.SWA: SWAWrapper, AttnKind.HCA: HCAWrapper}[kind](cfg.sliding_window, ops)


def compressor(cfg, ratio: int, d: int, gen) -> CompressorWeights:
    coff = 2 if ratio == 4 else 1
    h = cfg.hidden_size

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(DEV, torch.bfloat16)

    return CompressorWeights(
        rnd(coff * d, h, scale=h**-0.5),
        rnd(coff * d, h, scale=h**-0.5),
        rnd(ratio, coff * d).float(),
        (torch.rand(d, generator=gen) + 0.5).to(DEV),
    )


def layer_inputs(cfg, kind: AttnKind, t: int, gen):
    bf = dict(device=DEV, dtype=torch.bfloat16)
    q = torch.randn(t, cfg.num_heads, cfg.head_dim, **bf)
    kv = torch.randn(t, cfg.head_dim, **bf)
    if kind is AttnKind.SWA:
        return q, kv, None
    inv = 1.0 / 160000 ** (torch.arange(0, 64, 2, device=DEV).float() / 64)
    x = torch.randn(t, cfg.hidden_size, **bf)
    ix = None
    if kind is AttnKind.CSA:
        iq = torch.randn(t, cfg.index_n_heads, cfg.index_head_dim, **bf)
        iw = torch.randn(t, cfg.index_n_heads, **bf)
        ix = IndexerInputs(iq, iw, compressor(cfg, 4, cfg.index_head_dim, gen), cfg.index_topk)
    comp = CompressedInputs(x, compressor(cfg, kind.value, cfg.head_dim, gen), inv, 1e-6, ix)
    return q, kv, comp


def kv_norm(cfg, positions, gen) -> KVNorm:
    weight = (torch.rand(cfg.head_dim, generator=gen) + 0.5).to(DEV, torch.bfloat16)
    inv = 1.0 / 10000 ** (torch.arange(0, 64, 2, device=DEV).float() / 64)
    return KVNorm(weight, inv, positions, 1e-6)


def op_calls(w, lk, q, kv, sink, scale, comp, kv_norm=None):
    """name -> closure, one per op of ``w.run`` (the same calls in the same order)."""
    ops, win = w.ops, w._window_rows
    calls = {"store": lambda: ops.store.run(lk, kv, kv_norm)}
    if comp is None:
        calls["attend"] = lambda: ops.attend.run(q, lk, win, sink, scale)
        return calls
    calls["flush"] = lambda: ops.flush.run(comp, lk)
    if comp.indexer is None:
        calls["attend"] = lambda: ops.attend.run(q, lk, win, sink, scale, w._visible)
        return calls
    ix = comp.indexer
    calls["index_flush"] = lambda: ops.index_flush.run(comp, lk)
    calls["picks"] = lambda: ops.picks.run(lk, ix.q, ix.weights)
    picks = ops.picks.run(lk, ix.q, ix.weights)
    calls["attend"] = lambda: ops.attend.run(q, lk, win, sink, scale, picks)
    return calls


def bench_case(
    cfg, b: int, n: int, prefix: int, rows: str, reps: int, twin: bool, ops: bool = True
) -> list[dict]:
    world = World(cfg, b, prefix, n, rows)
    case = f"{b}x{n}" + (f"+{prefix}" if prefix else "")
    rows = []
    for kind in (AttnKind.SWA, AttnKind.CSA, AttnKind.HCA):
        row = dict(case=case, kind=kind.name, tokens=b * n)
        row.update(bench_kind(cfg, world, kind, reps, twin, ops))
        rows.append(row)
        print(json.dumps(row), flush=True)
        torch.cuda.empty_cache()
    return rows


def bench_kind(cfg, world: World, kind: AttnKind, reps: int, twin: bool, ops: bool = True) -> dict:
    """Plan, each op (``ops``) and the whole run of one layer of ``kind`` over the world's
    batch."""
    gen = torch.Generator().manual_seed(0)
    sink = torch.randn(cfg.num_heads, generator=gen).to(DEV)
    scale = cfg.head_dim**-0.5
    lk = world.pool.layer(world.pool.schema.layers_of(kind)[0].layer)
    w = make_wrapper(cfg, kind, lk, kernels=True)
    q, kv, comp = layer_inputs(cfg, kind, world.b * world.n, gen)
    row = dict(plan_s=host_timed(lambda: w.plan(world.plan()), max(3, reps // 4)))
    norm = kv_norm(cfg, w._plan.tables.positions, gen)  # the served path: raw wkv(x) rows
    calls = op_calls(w, lk, q, kv, sink, scale, comp, norm)  # (CSA: runs the picks once)
    for name, fn in calls.items() if ops else ():
        row[f"{name}_s"] = timed(fn, reps)
    row["run_s"] = timed(lambda: w.run(lk, q, kv, sink, scale, comp, norm), reps)
    row["tok_per_s"] = world.b * world.n / row["run_s"]
    att = w.ops.attend
    if isinstance(att, AttendChoice):  # FlashMLA can serve this kind: time both
        for name, op in (("ours", att._ours), ("flashmla", att._flashmla)):
            op.plan(w._plan, w._max_entries(w._plan))
            extra = _extra(w, lk, comp, op)
            fn = functools.partial(op.run, q, lk, w._window_rows, sink, scale, extra)
            row[f"{name}_attend_s"] = timed(fn, reps)
        row["keys"] = cfg.sliding_window + w._max_entries(w._plan)
    if twin and comp is not None:
        tw = make_wrapper(cfg, kind, lk, kernels=False)
        tw.plan(world.plan())
        for name, fn in op_calls(tw, lk, q, kv, sink, scale, comp).items():
            if name in ("flush", "index_flush", "picks"):
                row[f"twin_{name}_s"] = timed(fn, 1)
    return row


def _extra(w, lk, comp, op):
    """The entry lists the planned attend op ``op`` reads (None for SWA): c4 the picks (planned
    into ``op``'s own lists where it has them, FlashMLA's, and run), c128 every visible entry's
    row, built here: the wrapper builds them only when ours serves the batch (FlashMLA plans its
    own c128 lists and ignores these)."""
    if comp is None:
        return None
    if comp.indexer is None:
        return Picks(w._visible_rows(w._plan))
    w.ops.picks.plan(w._plan, into=op.picks_into)
    return w.ops.picks.run(lk, comp.indexer.q, comp.indexer.weights)


def compare_attend(kind: str, rows: str, b: int, n: int, prefix: int):
    """(FlashMLA's output, ours) for one layer of ``kind`` after a full extend (GPU test)."""
    cfg = load_config(CONFIG)
    world = World(cfg, b, prefix, n, rows)
    k = {"swa": AttnKind.SWA, "csa": AttnKind.CSA, "hca": AttnKind.HCA}[kind]
    lk = world.pool.layer(world.pool.schema.layers_of(k)[0].layer)
    w = make_wrapper(cfg, k, lk, kernels=True)
    gen = torch.Generator().manual_seed(1)
    sink, scale = torch.randn(cfg.num_heads, generator=gen).to(DEV), cfg.head_dim**-0.5
    q, kv, comp = layer_inputs(cfg, k, b * n, gen)
    return attend_both(w, lk, world.plan(), q, kv, sink, scale, comp)


def attend_both(w, lk, batch, q, kv, sink, scale, comp):
    """(FlashMLA's output, ours) over ``batch`` after the wrapper ``w`` (attention an
    ``AttendChoice``) has run it, filling the pools; each op planned over the batch and given
    the entry lists it reads, whichever of the two the wrapper's plan chose."""
    w.plan(batch)
    w.run(lk, q, kv, sink, scale, comp)
    att = w.ops.attend
    assert isinstance(att, AttendChoice), "FlashMLA is not eligible on this device"
    outs = []
    for op in (att._flashmla, att._ours):
        op.plan(w._plan, w._max_entries(w._plan))
        extra = _extra(w, lk, comp, op)
        outs.append(op.run(q, lk, w._window_rows, sink, scale, extra).clone())
    return outs


def parse_case(s: str) -> tuple[int, int, int]:
    head, _, prefix = s.partition("+")
    b, n = head.split("x")
    return int(b), int(n), int(prefix or 0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default="1x32768,32x4096,4x4096,4x4096+28672")
    ap.add_argument("--rows", choices=["fp8", "bf16"], default="fp8")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--no-twin", action="store_true")
    ap.add_argument("--measure", action="store_true", help=f"--cases {MEASURE_CASES} --no-twin")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    if args.measure:  # the attention both ways and the whole run; fewer reps (one GPU minute)
        args.cases, args.no_twin, args.reps = MEASURE_CASES, True, min(args.reps, 5)
    cfg = load_config(CONFIG)
    rows = []
    for case in args.cases.split(","):
        b, n, p = parse_case(case)
        try:
            twin = not args.no_twin and b * n <= 32768
            rows += bench_case(cfg, b, n, p, args.rows, args.reps, twin, ops=not args.measure)
        except Exception:
            ERRORS.append(traceback.format_exc(limit=4))
            print(ERRORS[-1], flush=True)
        torch.cuda.empty_cache()
    result = dict(device=torch.cuda.get_device_name(), date=time.strftime("%Y-%m-%d"),
                  pool_rows=args.rows, rows=rows, errors=ERRORS)  # fmt: skip
    result["measured"] = extend_rows(result, cfg.num_heads)
    Path(args.out, "bench_extend.json").write_text(json.dumps(result, indent=2))
    cols = ["plan", "store", "flush", "index_flush", "picks", "attend", "run"]
    print(f"\n== extend per layer kind, {result['device']} (ms; Flash dims, {args.rows} rows) ==")
    print(f"{'case':>14} {'kind':>4} " + " ".join(f"{c:>11}" for c in cols) + "   tok/s")
    for r in rows:
        cells = [r.get(f"{c}_s") for c in cols]
        txt = " ".join(f"{1e3 * v:>11.3f}" if v is not None else f"{'-':>11}" for v in cells)
        print(f"{r['case']:>14} {r['kind']:>4} {txt} {r['tok_per_s']:>8.0f}")
    twins = [r for r in rows if any(k.startswith("twin_") for k in r)]
    for r in twins:
        parts = [f"{k[5:-2]} {1e3 * v:.1f} ms" for k, v in r.items() if k.startswith("twin_")]
        print(f"twin (old per-request path) {r['case']} {r['kind']}: " + ", ".join(parts))
    if result["measured"]:
        note = f"{result['date']}, {result['device']}, {args.rows} rows: scripts/bench_extend.py"
        print("extend_choice.MEASURED (paste: python scripts/paste_measured.py bench_extend.json):")
        print(render("MEASURED", result["measured"], note))
    if ERRORS:
        print(f"{len(ERRORS)} case(s) failed (see above)")


if __name__ == "__main__":
    main()
