"""FlashMLA's extend workspace and index lists per c4 / c128 layer, main's path vs this tree's, on
one GPU at Flash dims (issue 14; ``scripts/gpu_xgather.sh`` runs it).

    python scripts/bench_xgather.py [--reps 50] [--out DIR]

Per case (one request's extend step: its entries and its window rows, 584-byte FP8 rows of 512
= 448 e4m3 + 64 RoPE channels, raw pages of 256 rows, entry pages of 256 / ratio):

* ``gather``: main's two ``dequantize_k_cache_paged`` calls (SGLang; entries, then raw rows,
  into slices of the workspace) vs one ``kv_gather.gather_fp8_rows``; outputs compared bit for
  bit;
* ``lists``: main's per-layer write of the c4 picks into FlashMLA's lists (``ids >= 0``,
  ``ids + base``, ``where``, a strided copy: T x 512 picks) vs none (the select writes them:
  ``IndexerExtend`` planned with ``ids_out``), and the whole indexer run both ways.

Each: CUDA-event median (``perf.timing.event_seconds``), CUDA kernels per call (the torch
profiler) and host microseconds per call (no sync: the launch overhead). Writes
``bench_xgather.json`` to ``--out`` (default ``$OUT`` or ``.``) and prints a table last.
"""

import argparse
import json
import os
import time
from pathlib import Path

import torch

from sglang_dsv4.kernels.indexer_extend import IndexerExtend
from sglang_dsv4.kernels.kv_gather import gather_fp8_rows
from sglang_dsv4.kernels.kv_store import FP8RowLayout, IndexKeyLayout
from sglang_dsv4.perf.timing import event_seconds, kernel_count

RAW_PAGE, TOPK = 256, 512
CASES = [  # (name, ratio, entries, raw rows): 8192 new tokens after a prefix
    ("c4 1x8192", 4, 2048, 8192),
    ("c128 1x8192", 128, 64, 8192),
    ("c4 1x8192+24576", 4, 8192, 8192 + 127),
]


def host_us(fn, n: int = 200) -> float:
    """Host microseconds per call, launches queued without a sync (after a warm-up)."""
    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    dt = time.perf_counter() - t
    torch.cuda.synchronize()
    return dt / n * 1e6


def measure(fn, reps: int) -> dict:
    return dict(us=event_seconds(fn, reps) * 1e6, kernels=kernel_count(fn), host_us=host_us(fn))


def gather_case(ratio: int, n_ent: int, n_raw: int, reps: int, gen) -> dict:
    from sglang.kernels.ops.attention.dsv4.dequant_k_cache import dequantize_k_cache_paged

    ent_page = RAW_PAGE // ratio
    ent_pages, raw_pages = -(-2 * n_ent // ent_page), -(-2 * n_raw // RAW_PAGE)
    ent = torch.randint(0, 256, (ent_pages, FP8RowLayout.paged(ent_page).page_bytes),
                        dtype=torch.uint8, generator=gen).cuda()  # fmt: skip
    raw = torch.randint(0, 256, (raw_pages, FP8RowLayout.paged(RAW_PAGE).page_bytes),
                        dtype=torch.uint8, generator=gen).cuda()  # fmt: skip
    er = torch.randperm(ent_pages * ent_page, generator=gen)[:n_ent].cuda()  # int64, as planned
    rr = torch.randperm(raw_pages * RAW_PAGE, generator=gen)[:n_raw].cuda()
    old_ws = torch.empty(n_ent + n_raw, 1, 512, dtype=torch.bfloat16, device="cuda")
    new_ws = torch.full_like(old_ws, float("nan"))

    def old():  # main's AttendFlashMLA._gather, twice
        dequantize_k_cache_paged(ent, er, page_size=ent_page, out=old_ws[:n_ent])
        dequantize_k_cache_paged(raw, rr, page_size=RAW_PAGE, out=old_ws[n_ent:])

    def new():
        gather_fp8_rows(ent_cache=ent, ent_rows=er, ent_page=ent_page, raw_cache=raw,
                        raw_rows=rr, raw_page=RAW_PAGE, out=new_ws)  # fmt: skip

    row = dict(old=measure(old, reps), new=measure(new, reps))
    row["bit_equal"] = torch.equal(old_ws.view(torch.int16), new_ws.view(torch.int16))
    return row


def lists_case(n_ent: int, reps: int, gen) -> dict:
    """The c4 picks into FlashMLA's lists: main's torch ops vs the select's in-list write (the
    indexer run at 8192 queries over ``n_ent`` entries, both ways; the same picks)."""
    t, heads, dh = 8192, 64, 128
    prefix = 4 * n_ent - t
    layout = IndexKeyLayout("fp8", 32, dh)
    blocks = -(-4 * n_ent // 128)
    keys = layout.empty(blocks * 32, "cuda")
    layout.write(keys, torch.arange(blocks * 32, device="cuda"),
                 torch.randn(blocks * 32, dh, generator=gen).cuda())  # fmt: skip
    bt = torch.arange(blocks, dtype=torch.int32, device="cuda").view(1, -1)
    q = torch.randn(t, heads, dh, generator=gen).cuda().bfloat16()
    w = torch.randn(t, heads, generator=gen).cuda()
    qreq = torch.zeros(t, dtype=torch.int32, device="cuda")
    pos = torch.arange(prefix, prefix + t, device="cuda")
    ix = IndexerExtend(TOPK, heads, dh, key_layout=layout)
    ix.plan([t], [prefix + t], "cuda")
    lists = torch.full((t, 1, 128 + TOPK), -1, dtype=torch.int32, device="cuda")
    base = torch.zeros(1, dtype=torch.int32, device="cuda")
    query_base = base[qreq.long()].unsqueeze(1)  # main's _query_base [T, 1]
    run = lambda: ix.run(q, w, keys, bt, qreq, pos)  # noqa: E731
    ids = run()[0]

    def old_write():  # main's AttendFlashMLA.run, per c4 layer
        lists[:, 0, 128 : 128 + TOPK] = torch.where(ids >= 0, ids + query_base, -1)

    row = dict(old_write=measure(old_write, reps), old_indexer=measure(run, reps))
    want = lists.clone()
    ix.plan([t], [prefix + t], "cuda", ids_out=lists[:, 0, 128:], id_base=base)
    lists.fill_(-7)
    lists[:, 0, :128] = -1
    row["new_indexer"] = measure(run, reps)
    row["same_lists"] = torch.equal(lists, want)
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    gen = torch.Generator().manual_seed(0)
    rows = []
    for name, ratio, n_ent, n_raw in CASES:
        row = dict(case=name, entries=n_ent, raw=n_raw, **gather_case(ratio, n_ent, n_raw,
                                                                       args.reps, gen))  # fmt: skip
        if ratio == 4:
            row["lists"] = lists_case(n_ent, args.reps, gen)
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = dict(device=torch.cuda.get_device_name(), date=time.strftime("%Y-%m-%d"), rows=rows)
    Path(args.out, "bench_xgather.json").write_text(json.dumps(result, indent=1))
    print(
        f"\n== FlashMLA extend prep per layer, {result['device']} (us: GPU median / host per "
        "call; k: CUDA kernels) =="
    )
    print(f"{'case':>17} {'gather main':>20} {'gather new':>20} {'equal':>5} "
          f"{'lists main':>18} {'indexer main':>20} {'indexer new':>20} {'same':>4}")  # fmt: skip

    def cell(m, w=20):
        return f"{m['us']:.1f}/{m['host_us']:.1f} {m['kernels']}k".rjust(w)

    for r in rows:
        li = r.get("lists")
        tail = (f" {cell(li['old_write'], 18)} {cell(li['old_indexer'])} "
                f"{cell(li['new_indexer'])} {li['same_lists']!s:>4}") if li else ""  # fmt: skip
        print(f"{r['case']:>17} {cell(r['old'])} {cell(r['new'])} {r['bit_equal']!s:>5}" + tail)


if __name__ == "__main__":
    main()
