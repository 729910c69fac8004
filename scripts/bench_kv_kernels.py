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
from sglang_dsv4.kernels.indexer import IndexerTopK
from sglang_dsv4.kernels.indexer_extend import IndexerExtend
from sglang_dsv4.kernels.kv_store import FP8RowLayout, IndexKeyLayout, store_kv
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


def _index_setup(b, ctx, topk, fmt="fp8", queries_per_req=1):
    layout = IndexKeyLayout(fmt, 32)
    blocks = -(-ctx // 128)
    n_rows = b * blocks * 32
    cache = layout.empty(n_rows, DEV)
    cache.view(torch.uint8).random_(0, 120)  # finite e4m3 / e2m1 codes, small scales
    if fmt == "fp8":  # scales: a power of 2 as fp32
        cache[:, 32 * 128 :].view(torch.float32).fill_(0.5)
    bt = torch.randperm(b * blocks, device=DEV).view(b, blocks).int()
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
    for ctx, n in ((4096, 4096), (8192, 8192), (16384, 8192), (32768, 8192), (65536, 8192)):
        res.append(guarded(functools.partial(_extend_row, ctx, n, reps)))
        torch.cuda.empty_cache()
    return [r for r in res if r]


def _extend_row(ctx, n, reps):
    layout = IndexKeyLayout("fp8", 32)
    blocks = -(-ctx // 128)
    cache = layout.empty(blocks * 32, DEV)
    cache.view(torch.uint8).random_(0, 120)  # finite e4m3 codes
    cache[:, 32 * 128 :].view(torch.float32).fill_(0.5)  # power-of-2 scales
    bt = torch.randperm(blocks, device=DEV).view(1, blocks).int()
    qreq = torch.zeros(n, device=DEV, dtype=torch.int32)
    pos = torch.arange(ctx - n, ctx, device=DEV, dtype=torch.int32)
    q = torch.randn(n, 64, 128, device=DEV, dtype=torch.bfloat16)
    w = torch.randn(n, 64, device=DEV)
    ix = IndexerExtend(512, 64, key_layout=layout, max_workspace_bytes=1 << 30)
    ix.plan([n], [ctx], DEV)
    if len(ix.chunks) != 1:
        raise RuntimeError(f"{len(ix.chunks)} workspace chunks: time one")
    pairs = sum((t + 1) // 4 for t in range(ctx - n, ctx))
    nbytes = n * (64 * 128 * 2 + 64 * 4 + 512 * 8) + (ctx // 4) * 132
    reps = max(3, reps // 5)
    s = timed([functools.partial(ix.run, q, w, cache, bt, qreq, pos)], reps)
    s_topk = timed([functools.partial(ix._select, bt, qreq, pos, 0, n)], reps)
    return dict(kernel="indexer_top512", mode="extend", batch=n, ctx=ctx, s=s, bytes=nbytes,
                flops=2 * 64 * 128 * pairs, s_scores=s - s_topk, s_topk=s_topk,
                s_topk_one=s_topk, topk_splits=1)  # fmt: skip


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--only", default="", help="comma list: kv,cdec,cpre,idec,ipre")
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
        print(f"{r['kernel']:<20}{r['mode']:<8}{r['batch']:>7}{r['ctx']:>8}{r['us']:>10.1f}"
              f"{r['GBps']:>8.0f}{r['pct_copy']:>5.0f}{tf}  {split}")  # fmt: skip
    if errors or ERRORS:
        print(f"{len(errors)} part(s) and {len(ERRORS)} case(s) failed")


if __name__ == "__main__":
    main()
