"""Time the KV store, compressor flush and indexer + top-k kernels on one GPU (one command).

    python scripts/bench_kv_kernels.py [--out DIR] [--reps N]

Every call is captured in a CUDA graph (as a decode step would be) and timed by replaying it:
median of ``--reps`` replays, CUDA events. Inputs / caches are rotated across several copies in
one graph so the bytes of one call are not served from L2 (up to 64 copies or ~200 MB).
GB/s counts the bytes each call must move (listed per kernel below) and is compared with the
device-to-device copy ceiling measured in the same run. Writes ``bench_kv_kernels.json`` to
``--out`` (default ``$OUT`` or ``.``) and prints a short table last.
"""

import argparse
import functools
import math
import os
import time
import traceback
from pathlib import Path

import torch

from sglang_dsv4.kernels.compressor import CompressorFlush
from sglang_dsv4.kernels.indexer import IndexerTopK, logits_width
from sglang_dsv4.kernels.indexer_extend import IndexerExtend
from sglang_dsv4.kernels.kv_store import FP8RowLayout, IndexKeyLayout, store_kv
from sglang_dsv4.kernels.topk_shapes import candidates
from sglang_dsv4.perf.timing import gbps, write_json
from sglang_dsv4.perf.timing import graph_seconds as timed

ROTATE_BYTES = 200 << 20
MAX_COPIES = 64
BATCHES = (1, 32, 128)
CONTEXTS = (4096, 32768, 131072)
DEV = "cuda"


ERRORS: list[str] = []


def guarded(fn):
    """Run one case; a failure is recorded and the remaining cases still run."""
    try:
        return fn()
    except Exception:
        ERRORS.append(traceback.format_exc(limit=3))
        print(ERRORS[-1], flush=True)
        return None


def copies(bytes_per_call: int) -> int:
    return max(1, min(MAX_COPIES, math.ceil(ROTATE_BYTES / max(bytes_per_call, 1))))


def copy_ceiling(reps: int) -> float:
    a = torch.empty(1 << 30, dtype=torch.uint8, device=DEV)
    b = torch.empty_like(a)
    t = timed([lambda: b.copy_(a)], reps)
    return gbps(2 * a.numel(), t)


# ----------------------------------------------------------------------------- KV store


def bench_kv_store(reps):
    """Raw KV rows: bf16 kv [T, 512] + RMSNorm + RoPE -> FP8 rows (pages of 64), scattered.
    Bytes: T * (1024 in + 584 out + 16 row / position)."""
    res = []
    layout = FP8RowLayout.paged(64)
    inv = 1.0 / 10000 ** (torch.arange(0, 64, 2, device=DEV).float() / 64)
    w = torch.rand(512, device=DEV, dtype=torch.bfloat16) + 0.5
    for t in (1, 32, 128, 4096, 32768, 131072):
        nbytes = t * (1024 + 584 + 16)
        calls = []
        for _ in range(copies(nbytes)):
            kv = torch.randn(t, 512, device=DEV, dtype=torch.bfloat16)
            rows = torch.randperm(2 * t, device=DEV)[:t]
            pos = torch.randint(0, 1 << 20, (t,), device=DEV)
            cache = layout.empty(2 * t, DEV)
            calls.append(
                lambda kv=kv, cache=cache, rows=rows, pos=pos: store_kv(
                    kv, cache, rows, layout=layout, norm_weight=w, positions=pos, inv_freq=inv
                )
            )
        res.append(dict(kernel="kv_store", mode="tokens", batch=t, ctx=0, s=timed(calls, reps),
                        bytes=nbytes))  # fmt: skip
    return res


# ----------------------------------------------------------------------------- compressor

KINDS = {  # name: (ratio, head_dim, out)
    "c4": (4, 512, "fp8"),
    "c4_index": (4, 128, "index_fp8"),
    "c128": (128, 512, "fp8"),
}


def _flush_setup(kind, prefix, lens, in_dtype=torch.float32):
    ratio, d, out = KINDS[kind]
    coff = 2 if ratio == 4 else 1
    b = len(prefix)
    c, slots = coff * d, coff * ratio
    t = sum(lens)
    fl = CompressorFlush(ratio, d, out, layout=FP8RowLayout.paged(32 if ratio == 4 else 2, d)
                         if out == "fp8" else IndexKeyLayout("fp8", 32, d))  # fmt: skip
    kv = torch.randn(t, c, device=DEV, dtype=in_dtype)
    score = torch.randn(t, c, device=DEV, dtype=in_dtype)
    ape = torch.randn(ratio, c, device=DEV)
    norm = torch.rand(d, device=DEV) + 0.5
    inv = 1.0 / 160000 ** (torch.arange(0, 64, 2, device=DEV).float() / 64)
    tail_kv = torch.randn(b, slots, c, device=DEV)
    tail_score = torch.randn(b, slots, c, device=DEV)
    blocks = max(-(-(p + n) // 128) for p, n in zip(prefix, lens, strict=True))
    bt = torch.randperm(b * blocks, device=DEV).view(b, blocks).int()
    epb = 128 // ratio
    n_rows = b * blocks * epb
    cache = fl.layout.empty(n_rows, DEV)
    meta = (
        torch.arange(b, device=DEV, dtype=torch.int32),
        torch.tensor(prefix, device=DEV, dtype=torch.int32),
        torch.tensor([0, *lens], device=DEV).cumsum(0).int(),
        bt,
    )
    entries = sum((p + n) // ratio - p // ratio for p, n in zip(prefix, lens, strict=True))
    row_bytes = 584 if out == "fp8" else 132
    # bytes the flush moves: new tokens (kv, score) read; entries written; tail slots written
    # (all slots of requests that completed a window, else the new tokens' slots); pooled tail
    # slots read for windows that started before this batch
    done = [(p + n) // ratio > p // ratio for p, n in zip(prefix, lens, strict=True)]
    esz = kv.element_size()
    nbytes = t * c * 2 * esz + entries * row_bytes
    for (p, n), dn in zip(zip(prefix, lens, strict=True), done, strict=True):
        nbytes += (slots if dn else min(n, slots)) * c * 8
        if dn and p % ratio + (coff - 1) * ratio:
            nbytes += (p % ratio + (coff - 1) * ratio) * d * 8

    def call(kv=kv, score=score, cache=cache):
        fl.run(kv, score, ape, norm, inv, tail_kv, tail_score, *meta, cache)

    return fl, call, kv, score, nbytes, entries


def _flush_row(kind, mode, ctx, prefix, lens, reps) -> dict:
    """Time one flush over ``len(prefix)`` requests (decode: one new token each, planned for
    decode; prefill: ``lens`` new tokens after ``prefix``), inputs rotated across copies."""
    b = len(prefix)
    fl, call, kv, score, nbytes, entries = _flush_setup(kind, prefix, lens)
    if mode == "decode":
        fl.plan_decode(b)
    else:
        fl.plan(prefix, lens)
    calls = [call] + [
        functools.partial(call, torch.randn_like(kv), torch.randn_like(score))
        for _ in range(copies(nbytes) - 1)
    ]
    return dict(kernel=f"flush_{kind}", mode=mode, batch=b, ctx=ctx, s=timed(calls, reps),
                bytes=nbytes, entries=entries)  # fmt: skip


def bench_compressor_decode(reps):
    res = []
    gen = torch.Generator().manual_seed(0)
    for kind in KINDS:
        for b in BATCHES:
            for ctx in CONTEXTS:
                prefix = (ctx + torch.randint(0, 128, (b,), generator=gen)).tolist()
                case = functools.partial(_flush_row, kind, "decode", ctx, prefix, [1] * b, reps)
                res.append(guarded(case))
    return [r for r in res if r]


def bench_compressor_prefill(reps):
    res = []
    for kind in KINDS:
        for b, ctx in ((1, 4096), (1, 32768), (1, 131072), (32, 4096), (32, 32768), (128, 4096)):
            case = functools.partial(_flush_row, kind, "prefill", ctx, [0] * b, [ctx] * b, reps)
            res.append(guarded(case))
            torch.cuda.empty_cache()
    return [r for r in res if r]


# ----------------------------------------------------------------------------- indexer


def _index_keys(b, ctx, fmt="fp8", gen=None):
    """(layout, key cache, block table [b, blocks]) of ``b`` requests of ``ctx`` tokens."""
    layout = IndexKeyLayout(fmt, 32)
    blocks = -(-ctx // 128)
    cache = layout.empty(b * blocks * 32, DEV)
    cache.view(torch.uint8).random_(0, 120, generator=gen)  # finite e4m3 / e2m1 codes
    if fmt == "fp8":  # scales: a power of 2 as fp32
        cache[:, 32 * 128 :].view(torch.float32).fill_(0.5)
    bt = torch.randperm(b * blocks, device=DEV, generator=gen).view(b, blocks).int()
    return layout, cache, bt


def _index_setup(b, ctx, topk, fmt="fp8", queries_per_req=1):
    layout, cache, bt = _index_keys(b, ctx, fmt)
    t = b * queries_per_req
    qreq = torch.arange(b, device=DEV, dtype=torch.int32).repeat_interleave(queries_per_req)
    pos = (ctx - queries_per_req + torch.arange(t, device=DEV) % queries_per_req).int()
    q = torch.randn(t, 64, 128, device=DEV, dtype=torch.bfloat16)
    w = torch.randn(t, 64, device=DEV)
    ix = IndexerTopK(topk, 64, key_layout=layout, max_workspace_bytes=1 << 30)
    ix.plan(t, ctx // 4, DEV)
    return ix, layout, cache, bt, q, w, qreq, pos


def bench_indexer_decode(reps):
    """Bytes: keys (132 B fp8 / 68 B fp4 each) + q (64 x 128 bf16) + weights + picks (ids, rows)."""
    res = []
    cases = [(b, c, 512, "fp8") for b in BATCHES for c in CONTEXTS]
    cases += [(b, c, 1024, "fp8") for b in BATCHES for c in CONTEXTS]
    cases += [(128, 131072, 512, "fp4"), (1, 131072, 512, "fp4")]
    for b, ctx, topk, fmt in cases:
        ix, layout, cache, bt, q, w, qreq, pos = _index_setup(b, ctx, topk, fmt)
        key_bytes = layout.data_bytes + layout.scale_bytes
        nbytes = b * ((ctx // 4) * key_bytes + 64 * 128 * 2 + 64 * 4 + topk * 8 + 4)
        caches = [cache] + [cache.clone() for _ in range(copies(nbytes) - 1)]
        full = [functools.partial(ix.run, q, w, c, bt, qreq, pos) for c in caches]
        scores = [functools.partial(ix._scores, q, w, c, bt, qreq, pos, 0, b) for c in caches]
        # s_topk: the select plan() picked (split over topk_splits programs per query at small
        # batch); s_topk_one: the one-program select at the same shape
        select = [functools.partial(ix._select_topk, bt, qreq, pos, 0, b)]
        one = [functools.partial(ix._select, bt, qreq, pos, 0, b)]
        row = dict(kernel=f"indexer_top{topk}" + ("_fp4" if fmt == "fp4" else ""), mode="decode",
                   batch=b, ctx=ctx, s=timed(full, reps), bytes=nbytes,
                   s_scores=timed(scores, reps), s_topk=timed(select, reps),
                   s_topk_one=timed(one, reps), topk_splits=ix.topk_splits)  # fmt: skip
        row["flops"] = 2 * 64 * 128 * b * (ctx // 4)
        res.append(row)
        ix = caches = cache = full = scores = None
        torch.cuda.empty_cache()
    return res


def bench_indexer_prefill(reps):
    """The served extend indexer (``IndexerExtend``): one request's chunk of ``n`` new tokens at
    positions ``ctx - n .. ctx - 1`` (the last 8192-token chunk of a ``ctx`` prompt, as chunked
    prefill runs it) over its ``ctx // 4`` entries; FLOPs = 2 * 64 * 128 * sum_t (t + 1) // 4.
    ``s_topk`` times the select alone over the logits the full run left in the workspace."""
    res = []
    for ctx, n in EXTEND_CHUNKS:
        res.append(guarded(functools.partial(_extend_row, ctx, n, reps)))
        torch.cuda.empty_cache()
    return [r for r in res if r]


# (prompt tokens, queries) of the served extend's last chunk (chunked prefill of 8192 tokens)
EXTEND_CHUNKS = ((4096, 4096), (8192, 8192), (16384, 8192), (32768, 8192), (65536, 8192))


def _extend_setup(ctx, n, **shape):
    """One request's chunk of ``n`` queries at positions ``ctx - n .. ctx - 1`` over its FP8
    keys, planned; ``shape``: ``IndexerExtend``'s launch shape (query_rows, block_keys, warps,
    stages)."""
    gen = torch.Generator(device=DEV).manual_seed(ctx)  # the same inputs for every shape
    layout, cache, bt = _index_keys(1, ctx, gen=gen)
    qreq = torch.zeros(n, device=DEV, dtype=torch.int32)
    pos = torch.arange(ctx - n, ctx, device=DEV, dtype=torch.int32)
    q = torch.randn(n, 64, 128, device=DEV, generator=gen).bfloat16()
    w = torch.randn(n, 64, device=DEV, generator=gen)
    ix = IndexerExtend(512, 64, key_layout=layout, max_workspace_bytes=1 << 30, **shape)
    ix.plan([n], [ctx], DEV)
    if len(ix.chunks) != 1:
        raise RuntimeError(f"{len(ix.chunks)} workspace chunks: time one")
    return ix, (q, w, cache, bt, qreq, pos)


def _extend_times(ix, args, reps) -> dict:
    """The planned extend's whole run and its select alone (over the logits the run left),
    CUDA-graph replays: the row fields the table prints."""
    bt, qreq, pos = args[3:]
    reps = max(3, reps // 5)
    s = timed([functools.partial(ix.run, *args)], reps)
    s_topk = timed([functools.partial(ix._select, bt, qreq, pos, 0, ix.n_queries)], reps)
    return dict(s=s, s_scores=s - s_topk, s_topk=s_topk, s_topk_one=s_topk, topk_splits=1)


def _extend_row(ctx, n, reps):
    ix, args = _extend_setup(ctx, n)
    pairs = sum((t + 1) // 4 for t in range(ctx - n, ctx))
    nbytes = n * (64 * 128 * 2 + 64 * 4 + 512 * 8) + (ctx // 4) * 132
    return dict(kernel="indexer_top512", mode="extend", batch=n, ctx=ctx, bytes=nbytes,
                flops=2 * 64 * 128 * pairs, **_extend_times(ix, args, reps))  # fmt: skip


# (query_rows, block_keys, warps, stages) of the extend logits launch; the first is the default
# (sm_90 compile with e4m3 queries, 2026-12-07: all FP8 wgmma, no spills; 72-146 registers,
# 242 for (256, 128, 8, 2) and 232 for (512, 64, 8, 2); the default's 126 hold two programs per
# SM. With bf16 queries the default had 164: one program per SM)
EXTEND_SHAPES = ((256, 64, 8, 2), (256, 64, 8, 3), (256, 128, 8, 2), (128, 64, 8, 2),
                 (128, 64, 4, 2), (128, 64, 4, 3), (128, 128, 8, 2), (64, 64, 4, 2),
                 (64, 128, 4, 2), (512, 64, 8, 2))  # fmt: skip


def sweep_indexer_extend(reps):
    """The extend logits at the served 32K / 64K chunk for every :data:`EXTEND_SHAPES` entry:
    us of the whole run and of the logits alone (run minus the select), and whether the logits
    match the default shape's (max |diff| over the row's largest |logit|; the picks follow)."""
    res = []
    for ctx in (32768, 65536):
        base = None  # the first shape's logits (the default's)
        for shape in EXTEND_SHAPES:
            out = guarded(functools.partial(_sweep_row, ctx, shape, reps, base))
            if out is not None:
                res.append(out[0])
                base = out[1] if base is None else base
            torch.cuda.empty_cache()
    return res


def _sweep_row(ctx, shape, reps, base):
    """(table row, visible logits [n, ld]) of one launch shape."""
    n = 8192
    ix, args = _extend_setup(ctx, n, **dict(zip(("query_rows", "block_keys", "warps", "stages"),
                                               shape, strict=True)))  # fmt: skip
    row = _extend_times(ix, args, reps)
    ix.logits.fill_(float("nan"))
    ix.run(*args)
    pos = args[5]
    vis = ((pos.long() + 1) // 4)[:, None] > torch.arange(ix.ld, device=DEV)[None, :]
    logits = torch.where(vis, ix.logits[:n], 0.0)
    diff = 0.0 if base is None else float(((logits - base).abs().amax(1) /
                                           base.abs().amax(1).clamp(min=1e-30)).max())  # fmt: skip
    row |= dict(kernel=f"ix_extend {shape}", mode="sweep", batch=n, ctx=ctx, bytes=1,
                logits_rel_diff=diff)  # fmt: skip
    return row, logits


def sweep_topk(reps):
    """The extend select alone over the served logits (``_extend_setup``'s inputs, the last
    chunk of each :data:`EXTEND_CHUNKS` prompt) for every ``topk_shapes.candidates`` shape:
    us, and whether its ids / rows / counts equal the default shape's bit for bit. Prints the
    fastest equal shape per prompt as a ``topk_shapes.MEASURED`` row to paste."""
    res, paste = [], []
    for ctx, n in EXTEND_CHUNKS:
        rows = guarded(functools.partial(_tsweep_rows, ctx, n, reps)) or []
        res += rows
        best = min((r for r in rows if r["same"]), key=lambda r: r["s"], default=None)
        if best:
            kind, warps, chunk = best["shape"]
            paste.append(f'    ({best["ld"]}, 512, SelectShape("{kind}", {warps}, {chunk}), '
                         f'{best["s"] * 1e6:.1f}),  # ctx {ctx}')  # fmt: skip
        torch.cuda.empty_cache()
    print(f"# {time.strftime('%Y-%m-%d')}, {torch.cuda.get_device_name()}: "
          "scripts/bench_kv_kernels.py --only tsweep", *paste, sep="\n")  # fmt: skip
    return res


def _tsweep_rows(ctx, n, reps) -> list[dict]:
    """One prompt's rows: each candidate planned on the same inputs, whose logits launch (the
    same for all) leaves the same workspace; outputs poisoned before the checked select."""
    out, base = [], None
    ld = logits_width(ctx // 4)  # the plan's, before planning: the candidates at its width
    for shape in candidates(ld):
        ix, args = _extend_setup(ctx, n, select=shape)
        ix.run(*args)
        bt, qreq, pos = args[3:]
        select = functools.partial(ix._select, bt, qreq, pos, 0, ix.n_queries)
        row = dict(kernel=f"topk {shape.kind} w{shape.warps}" + (f" c{shape.chunk}" if
                   shape.kind == "radix" else ""), mode="tsweep", batch=n, ctx=ctx,
                   s=timed([select], max(3, reps // 3)), bytes=n * ld * 4, ld=ix.ld,
                   shape=tuple(shape))  # fmt: skip
        for buf in (ix.ids, ix.rows, ix.lengths):
            buf.fill_(-7)
        select()
        got = (ix.ids.clone(), ix.rows.clone(), ix.lengths.clone())
        base = base or got
        row["same"] = all(torch.equal(a, b) for a, b in zip(base, got, strict=True))
        out.append(row)
        ix = args = None
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--only", default="",
                    help="comma list: kv,cdec,cpre,idec,ipre,isweep,tsweep")  # fmt: skip
    args = ap.parse_args()
    torch.manual_seed(0)
    t0 = time.time()
    ceiling = copy_ceiling(args.reps)
    parts = {
        "kv": bench_kv_store,
        "cdec": bench_compressor_decode,
        "cpre": bench_compressor_prefill,
        "idec": bench_indexer_decode,
        "ipre": bench_indexer_prefill,
        "isweep": sweep_indexer_extend,
        "tsweep": sweep_topk,
    }
    rows, errors = [], []
    for name, fn in parts.items():
        if args.only and name not in args.only.split(","):
            continue
        t1 = time.time()
        try:
            rows += fn(args.reps)
        except Exception:  # keep the other parts' numbers
            errors.append(f"{name}: {traceback.format_exc()}")
            print(errors[-1], flush=True)
        print(f"[{name}] {time.time() - t1:.1f} s", flush=True)
    for r in rows:
        r["us"] = r["s"] * 1e6
        r["GBps"] = gbps(r["bytes"], r["s"])
        r["pct_copy"] = 100 * r["GBps"] / ceiling
        if "flops" in r:
            r["TFLOPs"] = r["flops"] / r["s"] / 1e12
    meta = dict(
        gpu=torch.cuda.get_device_name(),
        torch=torch.__version__,
        copy_ceiling_GBps=ceiling,
        date=time.strftime("%Y-%m-%d"),
        seconds=time.time() - t0,
    )
    write_json(Path(args.out, "bench_kv_kernels.json"),
               dict(meta=meta, rows=rows, errors=errors + ERRORS))  # fmt: skip
    print(f"\n{meta['gpu']}  copy ceiling {ceiling:.0f} GB/s  ({meta['seconds']:.0f} s)")
    print(f"{'kernel':<20}{'mode':<8}{'B':>7}{'ctx':>8}{'us':>10}{'GB/s':>8}{'%cp':>5}"
          f"{'TF/s':>7}{'  scores/topk us (one program, ranges)':>17}")  # fmt: skip
    for r in rows:
        split = ""
        if "s_topk" in r:
            split = (f"{r['s_scores'] * 1e6:7.1f}/{r['s_topk'] * 1e6:.1f} "
                     f"({r['s_topk_one'] * 1e6:.1f}, {r['topk_splits']})")  # fmt: skip
        tf = f"{r['TFLOPs']:7.1f}" if "TFLOPs" in r else " " * 7
        if "logits_rel_diff" in r:  # a sweep row: its logits against the default shape's
            split += f"  logits diff {r['logits_rel_diff']:.1e}"
        if "same" in r:  # a top-k sweep row: its picks against the default shape's
            split += "  picks == default" if r["same"] else "  PICKS DIFFER"
        print(f"{r['kernel']:<20}{r['mode']:<8}{r['batch']:>7}{r['ctx']:>8}{r['us']:>10.1f}"
              f"{r['GBps']:>8.0f}{r['pct_copy']:>5.0f}{tf}  {split}")  # fmt: skip
    if errors or ERRORS:
        print(f"{len(errors)} part(s) and {len(ERRORS)} case(s) failed")


if __name__ == "__main__":
    main()
