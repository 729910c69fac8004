"""Time the quantized-weight kernels on the GPU against dequantize-then-matmul, DSV4 Flash shapes.

    python scripts/bench_quant_kernels.py [--quick]

* FP8 linear (W8A16, 128x128 UE8M0 scales): the kernel (the served model's GPU path), the same
  replayed from a CUDA graph, ``x @ w.T`` on a weight dequantized to bf16 once (the old load-time
  path: twice the weight memory), and dequantize-then-matmul on every call;
* routed experts of one Flash layer (256 experts, d 4096, inter 2048, top-6), MXFP4 and NVFP4:
  the grouped kernel ``fp4_moe`` (the served model's path), the same replayed from a CUDA graph
  (decode), the reference MoE over banks that dequantize one expert at a time (the old served
  path), and the reference MoE over experts dequantized to bf16 once.

``--quick``: one FP8 shape (``wo_b``) and MXFP4 only, fewer sizes. Prints markdown tables (median
of ``triton.testing.do_bench``, bf16 activations) and the bytes each holds.
"""

import argparse
import time

import torch
from triton.testing import do_bench

from sglang_dsv4.kernels.fp8_linear import fp8_block_linear
from sglang_dsv4.kernels.mxfp4_moe import ExpertBank, fp4_moe
from sglang_dsv4.perf.timing import capture
from sglang_dsv4.ref.moe import moe
from sglang_dsv4.ref.weight_quant import (
    fp8_block_dequant,
    fp8_block_quant,
    mxfp4_dequant,
    mxfp4_quant,
    nvfp4_dequant,
    nvfp4_quant,
)

FP8_SHAPES = {"wq_b": (32768, 1024), "wo_b": (4096, 8192), "shared w1": (2048, 4096)}


def warm_up(seconds: float = 2.0) -> None:
    """Raise the clocks before timing (an idle GPU sits at its lowest clock)."""
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        a @ a
        torch.cuda.synchronize()


def graph_time(fn) -> float:
    """Median ms of ``fn`` replayed from a CUDA graph (captured after one eager warm-up)."""
    return do_bench(capture([fn]).replay)


def bench_fp8(shapes: dict, ms: tuple[int, ...]) -> None:
    print(
        "| FP8 linear | M | fp8 kernel us | fp8 kernel, graph us | bf16 matmul (dequantized at"
        " load) us | torch dequantize + matmul per call us | weight GB/s (fp8 kernel) |"
    )
    print("|---|---|---|---|---|---|---|")
    for label, (n, k) in shapes.items():
        q, s = fp8_block_quant(torch.randn(n, k, device="cuda") * 0.02)
        wd = fp8_block_dequant(q, s, torch.bfloat16)
        for m in ms:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            us = [
                do_bench(lambda x=x, q=q, s=s: fp8_block_linear(x, q, s)) * 1e3,
                graph_time(lambda x=x, q=q, s=s: fp8_block_linear(x, q, s)) * 1e3,
                do_bench(lambda x=x, wd=wd: x @ wd.T) * 1e3,
                do_bench(lambda x=x, q=q, s=s: x @ fp8_block_dequant(q, s, torch.bfloat16).T) * 1e3,
            ]
            cells = " | ".join(f"{v:.1f}" for v in us)
            print(f"| {label} [{n}x{k}] | {m} | {cells} | {n * k / us[0] / 1e3:.0f} |")


def banks(fmt: str, e: int, d: int, inter: int):
    out, dense = [], []
    for n, k in ((inter, d), (d, inter), (inter, d)):
        packed, scales, gss, dn = [], [], [], []
        for _ in range(e):
            w = torch.randn(n, k, device="cuda") * 0.02
            if fmt == "mxfp4":
                p, sc = mxfp4_quant(w)
                gs = torch.ones((), device="cuda")
                dn.append(mxfp4_dequant(p, sc, torch.bfloat16))
            else:
                p, sc, gs = nvfp4_quant(w)
                dn.append(nvfp4_dequant(p, sc, gs, torch.bfloat16))
            packed.append(p.view(torch.uint8))
            scales.append(sc.view(torch.uint8))
            gss.append(gs)
        stacked = (torch.stack(packed), torch.stack(scales), torch.stack(gss).float())
        out.append(ExpertBank(*stacked, fmt, torch.bfloat16))
        dense.append(torch.stack(dn))
        del dn
    return out, dense


def bench_moe(fmts: tuple[str, ...], ts: tuple[int, ...]) -> None:
    print(
        "\n| experts | T | grouped fp4 kernel ms | grouped, graph ms | ref moe, dequant per"
        " expert ms | ref moe, bf16 (dequantized at load) ms | fp4 GiB | bf16 GiB |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for fmt in fmts:
        bench_moe_format(fmt, ts)
        torch.cuda.empty_cache()


def bench_moe_format(fmt: str, ts: tuple[int, ...], e=256, d=4096, inter=2048, topk=6) -> None:
    bk, dense = banks(fmt, e, d, inter)
    fp4_gib = sum(b.packed.nbytes + b.scale.nbytes + b.global_scale.nbytes for b in bk) / 2**30
    bf16_gib = sum(t.nbytes for t in dense) / 2**30
    for t in ts:
        x = torch.randn(t, d, device="cuda", dtype=torch.bfloat16)
        ex = torch.stack([torch.randperm(e, device="cuda")[:topk] for _ in range(t)])
        w = torch.rand(t, topk, device="cuda")
        ms = [
            do_bench(lambda x=x, ex=ex, w=w: fp4_moe(x, ex, w, *bk, 10.0)),
            graph_time(lambda x=x, ex=ex, w=w: fp4_moe(x, ex, w, *bk, 10.0)),
            do_bench(lambda x=x, ex=ex, w=w: moe(x, ex, w, *bk, None, 10.0)),
            do_bench(lambda x=x, ex=ex, w=w: moe(x, ex, w, *dense, None, 10.0)),
        ]
        cells = " | ".join(f"{v:.2f}" for v in ms)
        print(f"| {fmt} {e}x[{inter}x{d}] | {t} | {cells} | {fp4_gib:.2f} | {bf16_gib:.2f} |")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="one FP8 shape, MXFP4 only")
    args = ap.parse_args()
    print(torch.cuda.get_device_name())
    warm_up()
    if args.quick:
        bench_fp8({"wo_b": FP8_SHAPES["wo_b"]}, (1, 64, 1024))
        bench_moe(("mxfp4",), (1, 64, 512))
    else:
        bench_fp8(FP8_SHAPES, (1, 16, 128, 1024))
        bench_moe(("mxfp4", "nvfp4"), (1, 8, 64, 512))
