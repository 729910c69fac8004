"""Time the quantized-weight kernels on the GPU against bf16 at DSV4 Flash shapes.

    python scripts/bench_quant_kernels.py

* FP8 linear (W8A16, 128x128 UE8M0 scales) vs ``x @ w.T`` on the dequantized bf16 weight;
* routed experts of one Flash layer (256 experts, d 4096, inter 2048, top-6), MXFP4 and NVFP4:
  the grouped kernel (``fp4_moe``), the reference MoE over banks that dequantize one expert at a
  time (what the served model runs today), and the reference MoE over dense bf16 experts.

Prints a markdown table (median of ``triton.testing.do_bench``) and the bytes each holds.
"""

import torch
from triton.testing import do_bench

from sglang_dsv4.kernels.fp8_linear import fp8_block_linear
from sglang_dsv4.kernels.mxfp4_moe import ExpertBank, fp4_moe
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


def bench_fp8() -> None:
    print("| FP8 linear | M | fp8 kernel us | bf16 matmul us | weight GB/s (fp8) |")
    print("|---|---|---|---|---|")
    for label, (n, k) in FP8_SHAPES.items():
        q, s = fp8_block_quant(torch.randn(n, k, device="cuda") * 0.02)
        wd = fp8_block_dequant(q, s, torch.bfloat16)
        for m in (1, 16, 128, 1024):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            t_k = do_bench(lambda x=x, q=q, s=s: fp8_block_linear(x, q, s)) * 1e3
            t_d = do_bench(lambda x=x, wd=wd: x @ wd.T) * 1e3
            print(f"| {label} [{n}x{k}] | {m} | {t_k:.1f} | {t_d:.1f} | {n * k / t_k / 1e3:.0f} |")


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


def bench_moe(e: int = 256, d: int = 4096, inter: int = 2048, topk: int = 6) -> None:
    print(
        "\n| experts | T | grouped fp4 kernel ms | ref moe, dequant per expert ms"
        " | ref moe, dense bf16 ms | fp4 GiB | bf16 GiB |"
    )
    print("|---|---|---|---|---|---|---|")
    for fmt in ("mxfp4", "nvfp4"):
        bench_moe_format(fmt, e, d, inter, topk)
        torch.cuda.empty_cache()


def bench_moe_format(fmt: str, e: int, d: int, inter: int, topk: int) -> None:
    bk, dense = banks(fmt, e, d, inter)
    fp4_gib = sum(b.packed.nbytes + b.scale.nbytes + b.global_scale.nbytes for b in bk) / 2**30
    bf16_gib = sum(t.nbytes for t in dense) / 2**30
    for t in (1, 8, 64, 512):
        x = torch.randn(t, d, device="cuda", dtype=torch.bfloat16)
        ex = torch.stack([torch.randperm(e, device="cuda")[:topk] for _ in range(t)])
        w = torch.rand(t, topk, device="cuda")
        ms = [
            do_bench(lambda x=x, ex=ex, w=w: fp4_moe(x, ex, w, *bk, 10.0)),
            do_bench(lambda x=x, ex=ex, w=w: moe(x, ex, w, *bk, None, 10.0)),
            do_bench(lambda x=x, ex=ex, w=w: moe(x, ex, w, *dense, None, 10.0)),
        ]
        cells = " | ".join(f"{v:.2f}" for v in ms)
        print(f"| {fmt} {e}x[{inter}x{d}] | {t} | {cells} | {fp4_gib:.2f} | {bf16_gib:.2f} |")


if __name__ == "__main__":
    print(torch.cuda.get_device_name())
    bench_fp8()
    bench_moe()
