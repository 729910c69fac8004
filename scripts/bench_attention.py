"""Sparse MQA decode (``kernels.attention``) vs FlashMLA's DSV4 kernel on the same FP8 caches.

On the GPU machine (sgl_kernel from the wheelhouse for FlashMLA):

    python scripts/bench_attention.py --out $OUT          # sweep, table, $OUT/bench_attention.json
    python scripts/bench_attention.py --plot J.json P.png  # roofline from a saved JSON (no GPU)
    python scripts/bench_attention.py --pages ours --quick --out $OUT  # the decode choice table
    python scripts/bench_attention.py --quick --cute --out $OUT  # + our CuTe DSL kernel's column

``--cute`` adds ``kernels.cute_sparse_mqa.CuteSparseMQA`` (needs nvidia-cutlass-dsl:
``scripts/install_cutlass_dsl.sh``) on the same caches: its time, GB/s, speedup over FlashMLA and
its output's relative L2 to ours; a case it fails on prints the error and keeps going.
``--batches`` / ``--contexts`` narrow the grid.

``--pages ours`` lays the caches out as our pools do (SWA pages of 128 rows, c4 32, c128 1:
``mem.pools``) instead of SGLang's, and prints the rows of ``attention/choice.py``'s ``MEASURED``
table (paste them there); ``--quick`` skips the tile / split sweeps (default ``TileConfig``).

Cases: CSA (SWA window 128 + c4 top-k 512 Flash / 1024 Pro) and HCA (window + every c128 entry),
batch {1, 32, 128} x context {4K, 32K, 128K}, HCA also 1M at batch 1. Caches are FlashMLA pages
(SWA 256 rows, c4 64, c128 2), as SGLang 0.5.17 lays them out; FlashMLA gets them as
``k_cache`` / ``extra_k_cache`` with ``indices`` / ``extra_indices_in_kvcache`` and ``attn_sink``,
ours the very same tensors. Each case rotates over enough disjoint request sets to touch >= 3x
L2 per pass, captures one CUDA graph per kernel over the rotation and reports the median per-call
time of 7 timed replays. GB/s counts key rows x 584 B + bf16 q and o, TFLOP/s 2*h*keys*1024 per
query (FlashMLA's test-harness convention). speedup = FlashMLA time / our time.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
from dataclasses import asdict
from pathlib import Path

import torch

from sglang_dsv4.kernels.attention import SparseMQA, TileConfig, fp8_page_bytes
from sglang_dsv4.perf.timing import gbps, graph_seconds, write_json

D, ROW, WINDOW = 512, 584, 128
SWA_PAGE, C4_PAGE, C128_PAGE = 256, 64, 2
MODELS = {"flash": (64, 512), "pro": (128, 1024)}  # heads, c4 top-k
SWEEP = [  # (block_h, block_n, num_warps, num_stages, dequant, prefetch); the first is the default
    TileConfig(64, 64, 8, 1, 3, 0),
    TileConfig(64, 64, 8, 1, 3, 1),
    TileConfig(64, 32, 8, 1, 3, 1),
    TileConfig(64, 32, 8, 1, 3, 2),
    TileConfig(64, 32, 8, 2, 3, 1),
    TileConfig(64, 64, 8, 1, 0, 0),
    TileConfig(64, 64, 8, 1, 0, 1),
]


def random_pages(n_pages: int, page: int, dev) -> torch.Tensor:
    """FlashMLA pages of valid random rows: e4m3 bytes without NaN, bf16 N(0,1) RoPE, scale
    bytes 2^-6 .. 2^-2. Viewed [pages, page, 1, 584]."""
    buf = torch.randint(0, 256, (n_pages, fp8_page_bytes(page)), dtype=torch.uint8, device=dev)
    data = buf[:, : page * 576].view(n_pages, page, 576)
    nope = data[..., :448]
    nope[(nope & 0x7F) == 0x7F] -= 1
    data[..., 448:].copy_(torch.randn(n_pages, page, 64, device=dev).bfloat16().view(torch.uint8))
    scales = buf[:, page * 576 : page * ROW].view(n_pages, page, 8)
    scales.copy_(torch.randint(121, 126, scales.shape, dtype=torch.uint8, device=dev))
    return buf[:, : page * ROW].view(n_pages, page, 1, ROW)


class Case:
    """Caches and per-rotation inputs of one (kind, model, batch, context)."""

    def __init__(self, kind: str, model: str, batch: int, context: int, l2: int, dev):
        self.kind, self.model, self.batch, self.context = kind, model, batch, context
        self.heads, topk = MODELS[model]
        ratio, page = (4, C4_PAGE) if kind == "csa" else (128, C128_PAGE)
        entries = context // ratio
        extra = min(topk, entries) if kind == "csa" else entries
        self.keys = WINDOW + extra
        per_call = batch * self.keys * ROW
        self.rot = max(1, min(256, math.ceil(3 * l2 / per_call)))
        reqs = self.rot * batch
        self.swa = random_pages(reqs, SWA_PAGE, dev)
        self.xcache = random_pages(-(-reqs * entries // page), page, dev)
        req = torch.arange(reqs, device=dev)[:, None]
        swa_idx = (req * SWA_PAGE + torch.arange(WINDOW, device=dev)).int()
        if kind == "csa":
            self.xk = topk
            xidx = torch.full((reqs, topk), -1, dtype=torch.int32, device=dev)
            for r0 in range(0, reqs, 512):  # bounded memory for the random picks
                r1 = min(reqs, r0 + 512)
                picks = torch.rand(r1 - r0, entries, device=dev).topk(extra, dim=1).indices
                xidx[r0:r1, :extra] = (picks + req[r0:r1] * entries).int()
        else:
            self.xk = -(-entries // 64) * 64
            ids = torch.arange(self.xk, device=dev)
            xidx = torch.where(ids < entries, ids + req * entries, -1).int()
        self.q = torch.randn(reqs, self.heads, D, device=dev).bfloat16()
        self.sink = torch.randn(self.heads, device=dev)
        self.idx = swa_idx.view(self.rot, batch, WINDOW)
        self.xidx = xidx.view(self.rot, batch, self.xk)
        self.qs = self.q.view(self.rot, batch, self.heads, D)

    def cost(self) -> tuple[float, float]:
        flops = 2.0 * self.batch * self.heads * self.keys * 2 * D
        return flops, float(self.batch * (self.keys * ROW + 2 * self.heads * D * 2))


def time_graph(calls, reps: int = 7) -> float:
    """Median µs per call of a CUDA graph replaying ``calls`` (one per rotation)."""
    return graph_seconds(calls, reps, replays=max(1, 200 // len(calls))) * 1e6


def ours_calls(case: Case, cfg: TileConfig, splits: int | None = None):
    return planned_calls(case, SparseMQA(case.heads, D, config=cfg), splits)


def planned_calls(case: Case, attn, splits: int | None = None):
    """``attn`` (SparseMQA or CuteSparseMQA) planned for the case, one call per rotation."""
    attn.plan(case.batch, WINDOW, case.xk, num_splits=splits)
    scale = D**-0.5
    calls = [
        lambda j=j: attn.run(
            case.qs[j], case.swa, case.idx[j], case.sink, scale,
            extra_kv=case.xcache, extra_indices=case.xidx[j],
        )
        for j in range(case.rot)
    ]  # fmt: skip
    return attn, calls


def flashmla_calls(case: Case):
    from sgl_kernel.flash_mla import flash_mla_with_kvcache, get_mla_metadata

    meta = get_mla_metadata()[0]
    swa, xc = case.swa.view(torch.float8_e4m3fn), case.xcache.view(torch.float8_e4m3fn)

    def call(j):
        return flash_mla_with_kvcache(
            q=case.qs[j].unsqueeze(1),
            k_cache=swa,
            block_table=None,
            cache_seqlens=None,
            head_dim_v=D,
            tile_scheduler_metadata=meta,
            softmax_scale=D**-0.5,
            is_fp8_kvcache=True,
            indices=case.idx[j].unsqueeze(1),
            attn_sink=case.sink,
            extra_k_cache=xc,
            extra_indices_in_kvcache=case.xidx[j].unsqueeze(1),
        )[0].squeeze(1)

    return [lambda j=j: call(j) for j in range(case.rot)]


def measure_cute(case: Case, row: dict, ours0: torch.Tensor, fm0: torch.Tensor | None) -> None:
    """The CuTe kernel's columns of ``row`` (an error is recorded, not raised)."""
    try:
        from sglang_dsv4.kernels.cute_sparse_mqa import CuteSparseMQA

        attn, calls = planned_calls(case, CuteSparseMQA(case.heads, D))
        got = calls[0]().clone()
        row["cute_splits"] = attn.num_splits
        row["cute_diff_vs_ours"] = rel_l2(got, ours0)
        if fm0 is not None:
            row["cute_diff_vs_flashmla"] = rel_l2(got, fm0)
        row["cute_us"] = time_graph(calls)
    except Exception as e:  # keep the sweep going: the table shows which case failed
        row["cute_error"] = f"{type(e).__name__}: {str(e)[:300]}"
        print(f"CuTe failed on {case.kind} {case.model} b{case.batch}: {row['cute_error']}")
        return
    if "flashmla_us" in row:
        row["cute_speedup"] = row["flashmla_us"] / row["cute_us"]


def rel_l2(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def measure(
    case: Case, cfg: TileConfig, flashmla: bool, splits: int | None = None, cute: bool = False
) -> dict:
    attn, calls = ours_calls(case, cfg, splits)
    flops, nbytes = case.cost()
    row = dict(
        kind=case.kind, model=case.model, heads=case.heads, batch=case.batch,
        context=case.context, keys=case.keys, rotations=case.rot, splits=attn.num_splits,
        config=asdict(attn.config), flops=flops, bytes=nbytes,
    )  # fmt: skip
    row["ours_us"] = time_graph(calls)
    ours0, fm0 = calls[0]().clone(), None
    if flashmla:
        fm = flashmla_calls(case)
        fm0 = fm[0]().clone()
        row["diff_vs_flashmla"] = rel_l2(ours0, fm0)
        row["flashmla_us"] = time_graph(fm)
        row["speedup"] = row["flashmla_us"] / row["ours_us"]
    if cute:
        measure_cute(case, row, ours0, fm0)
    for who in ("ours", "flashmla", "cute"):
        if f"{who}_us" in row:
            row[f"{who}_gbps"] = nbytes / row[f"{who}_us"] / 1e3
            row[f"{who}_tflops"] = flops / row[f"{who}_us"] / 1e6
    return row


def copy_ceiling_gbps(dev) -> float:
    x = torch.empty(1 << 30, dtype=torch.uint8, device=dev)
    y = torch.empty_like(x)
    y.copy_(x)
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        y.copy_(x)
    stop.record()
    torch.cuda.synchronize()
    return gbps(2 * 10 * x.numel(), start.elapsed_time(stop) * 1e-3)


def save(result: dict, out: str) -> None:
    write_json(Path(out) / "bench_attention.json", result)


def fmt_row(r: dict) -> str:
    fm = r.get("flashmla_us")
    fm_s = f"{fm:8.1f} {r['flashmla_gbps']:6.0f}" if fm else f"{'-':>8} {'-':>6}"
    sp = f"{r['speedup']:5.2f}x" if fm else "   -  "
    diff = f"{r['diff_vs_flashmla']:.1e}" if fm else "-"
    line = (
        f"{r['kind']:4} {r['model']:5} {r['batch']:4d} {r['context'] // 1024:5d}K {r['keys']:5d} "
        f"{r['splits']:3d} {r['ours_us']:8.1f} {r['ours_gbps']:6.0f} {r['ours_tflops']:6.1f} "
        f"{fm_s} {sp} {diff:>8}"
    )
    if "cute_us" in r:
        csp = f"{r['cute_speedup']:5.2f}x" if "cute_speedup" in r else "   -  "
        line += (
            f" {r['cute_us']:8.1f} {r['cute_gbps']:6.0f} {r['cute_splits']:3d} {csp} "
            f"{r['cute_diff_vs_ours']:8.1e}"
        )
    elif "cute_error" in r:
        line += "   CuTe failed: " + r["cute_error"][:60]
    return line


HEADER = (
    "kind model batch   ctx  keys spl  ours_us  GB/s  TF/s   fm_us   GB/s speedup  diff"
    "  cute_us   GB/s spl cu/fm  cu-ours\n" + "-" * 124
)


def use_our_pages() -> None:
    """Our pools' page sizes (``mem.pools``): one swa page per block, B/r entries per page."""
    global SWA_PAGE, C4_PAGE, C128_PAGE
    SWA_PAGE, C4_PAGE, C128_PAGE = 128, 32, 1


def choice_rows(cases: list[dict]) -> str:
    """``attention/choice.py`` ``MEASURED`` rows of the measured cases."""
    lines = []
    for r in cases:
        if "flashmla_us" in r:
            lines.append(
                f'    ("{r["kind"]}", {r["heads"]}, {r["batch"]}, {r["keys"]}, '
                f"{r['ours_us']:.1f}, {r['flashmla_us']:.1f}),"
            )
    cute = [r for r in cases if "cute_us" in r]
    if cute:
        lines.append("CUTE_MEASURED rows (same runs):")
        lines += [
            f'    ("{r["kind"]}", {r["heads"]}, {r["batch"]}, {r["keys"]}, {r["cute_us"]:.1f}),'
            for r in cute
        ]
    return "\n".join(lines)


def sweep(result: dict, l2: int, dev) -> dict:
    """Tile configs and split counts of ours; the best config per model."""
    best = {}
    for model in ("flash", "pro"):
        case = Case("csa", model, 128, 32768, l2, dev)
        for cfg in SWEEP:
            try:
                r = measure(case, cfg, flashmla=False)
            except Exception as e:
                print(f"sweep {model} {cfg}: failed {type(e).__name__}: {str(e)[:200]}")
                continue
            result["sweep"].append(r)
            print(f"sweep {model} {cfg}: {r['ours_us']:.1f} us", flush=True)
            if model not in best or r["ours_us"] < best[model][1]:
                best[model] = (cfg, r["ours_us"])
        del case
        torch.cuda.empty_cache()
    print({m: str(c) for m, (c, _) in best.items()}, flush=True)

    for kind, model, batch, splits in [("csa", "flash", 1, s) for s in (None, 5, 10)] + [
        ("hca", "flash", 1, s) for s in (None, 33, 66)
    ]:
        case = Case(kind, model, batch, 32768 if kind == "csa" else 1 << 20, l2, dev)
        r = measure(case, best[model][0], flashmla=False, splits=splits)
        result["sweep"].append(r)
        print(f"splits {kind} {model} b{batch}: {r['splits']} splits {r['ours_us']:.1f} us")
        del case
        torch.cuda.empty_cache()
    return best


def bench(args) -> None:
    if args.pages == "ours":
        use_our_pages()
    dev = torch.device("cuda")
    props = torch.cuda.get_device_properties(dev)
    l2 = props.L2_cache_size
    try:
        import sgl_kernel.flash_mla  # noqa: F401

        flashmla = True
    except Exception as e:
        print(f"FlashMLA unavailable: {e!r}")
        flashmla = False
    result = dict(
        date=datetime.date.today().isoformat(), device=props.name, sms=props.multi_processor_count,
        l2_bytes=l2, copy_gbps=copy_ceiling_gbps(dev), command=" ".join(sys.argv), sweep=[],
        cases=[], pages=[SWA_PAGE, C4_PAGE, C128_PAGE],
    )  # fmt: skip
    print(f"{props.name}: copy ceiling {result['copy_gbps']:.0f} GB/s", flush=True)
    best = {m: (TileConfig(), 0.0) for m in MODELS} if args.quick else sweep(result, l2, dev)

    for kind in ("csa", "hca"):
        for model in ("flash", "pro"):
            grid = [(b, c) for b in args.batches for c in args.contexts]
            if kind == "hca" and 1 in args.batches and args.million:
                grid.append((1, 1 << 20))
            for batch, context in grid:
                case = Case(kind, model, batch, context, l2, dev)
                r = measure(case, best[model][0], flashmla, cute=args.cute)
                result["cases"].append(r)
                print(fmt_row(r), flush=True)
                save(result, args.out)
                del case
                torch.cuda.empty_cache()

    save(result, args.out)
    print(f"\n{result['device']} {result['date']}, copy ceiling {result['copy_gbps']:.0f} GB/s")
    print(HEADER)
    for r in result["cases"]:
        print(fmt_row(r))
    print(f"\nattention/choice.py MEASURED rows (pages {result['pages']}):")
    print(choice_rows(result["cases"]))


def plot(json_path: str, png_path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = json.loads(Path(json_path).read_text())
    bw = res["copy_gbps"] / 1e3  # TB/s
    peak = 798.0  # measured bf16 GEMM TFLOP/s on this H100 (performance.md)
    fig, ax = plt.subplots(figsize=(8, 5.5))
    ridge = peak / bw
    roof = f"roof: {bw:.2f} TB/s copy, {peak:.0f} TF/s bf16"
    ax.plot([10, ridge, 1000], [bw * 10, peak, peak], "k-", lw=1.5, label=roof)
    styles = {
        ("csa", "flash"): "o",
        ("csa", "pro"): "s",
        ("hca", "flash"): "^",
        ("hca", "pro"): "D",
    }

    for who, color in (("ours", "tab:blue"), ("flashmla", "tab:orange"), ("cute", "tab:green")):
        for key, marker in styles.items():
            rows = [r for r in res["cases"] if (r["kind"], r["model"]) == key and f"{who}_us" in r]
            if not rows:
                continue
            ax.scatter(
                [r["flops"] / r["bytes"] for r in rows], [r[f"{who}_tflops"] for r in rows],
                c=color, marker=marker, s=[12 + 0.5 * r["batch"] for r in rows], alpha=0.75,
                label=f"{who} {key[0].upper()} {key[1]}",
            )  # fmt: skip
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (FLOP / byte of KV + q + o)")
    ax.set_ylabel("TFLOP/s")
    ax.set_title(f"DSV4 sparse MQA decode, {res['device']}, {res['date']} (marker size ~ batch)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", default=".", help="folder for bench_attention.json")
    ap.add_argument("--plot", nargs=2, metavar=("JSON", "PNG"), help="roofline from a saved JSON")
    ap.add_argument("--pages", choices=("sglang", "ours"), default="sglang", help="cache pages")
    ap.add_argument("--quick", action="store_true", help="no tile / split sweep")
    ap.add_argument("--cute", action="store_true", help="add our CuTe DSL kernel's column")
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    ap.add_argument("--batches", type=ints, default=[1, 32, 128], help="e.g. 1,32,128")
    ap.add_argument("--contexts", type=ints, default=[4096, 32768, 131072], help="tokens")
    ap.add_argument("--no-million", dest="million", action="store_false", help="no 1M HCA case")
    args = ap.parse_args()
    if args.plot:
        plot(*args.plot)
    else:
        bench(args)


if __name__ == "__main__":
    main()
