"""``kernels.mxfp4_moe`` (FP4 grouped GEMM, dequantizing kernel, MoE) against the references.

Banks are fresh random weights quantized by ``ref.weight_quant`` (MXFP4: e8m0 per 32; NVFP4:
e4m3 per 16 + fp32 global scale); the references dequantize them and multiply in fp32.
Without a GPU the kernels run under ``TRITON_INTERPRET=1`` at small shapes (fp32); on the GPU
at DSV4 Flash expert shapes (d 4096, inter 2048, 256 experts, top-6) in bf16.
"""

import importlib

import pytest
import torch

from sglang_dsv4.ref.moe import moe
from sglang_dsv4.ref.weight_quant import (
    fp4_grouped_linear,
    mxfp4_dequant,
    mxfp4_quant,
    nvfp4_dequant,
    nvfp4_quant,
)

K = importlib.import_module("sglang_dsv4.kernels.mxfp4_moe")  # CPU: interpreted (conftest)
GPU = torch.cuda.is_available()
DEV = "cuda" if GPU else "cpu"


def rel_l2(out, ref) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm().clamp(min=1e-30)).item()


def bank(n_exp: int, n: int, k: int, fmt: str, device=DEV, scale=0.05):
    """Random FP4 bank -> (packed, scale bytes, global scales, fp32 dense weights [E, N, K])."""
    packed, scales, gss, dense = [], [], [], []
    for _ in range(n_exp):
        w = torch.randn(n, k, device=device) * scale
        if fmt == "mxfp4":
            p, s = mxfp4_quant(w)
            gs = torch.tensor(1.0, device=device)
            d = mxfp4_dequant(p, s)
        else:
            p, s, gs = nvfp4_quant(w)
            d = nvfp4_dequant(p, s, gs)
        packed.append(p.view(torch.uint8))
        scales.append(s.view(torch.uint8))
        gss.append(gs)
        dense.append(d)
    return torch.stack(packed), torch.stack(scales), torch.stack(gss).float(), torch.stack(dense)


def offsets_of(counts: list[int], device=DEV) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()], dtype=torch.int32).to(device)


@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4"])
def test_grouped_linear_interpreted(fmt):
    if GPU:
        pytest.skip("interpreter shapes; the GPU tests cover real shapes")
    p, s, gs, dense = bank(4, 80, 192, fmt)
    counts = [3, 0, 17, 1]  # an empty expert, groups crossing a 16-row tile
    x = torch.randn(sum(counts), 192)
    off = offsets_of(counts)
    y = K.fp4_grouped_linear(x, off, p, s, gs, fmt)
    ref = fp4_grouped_linear(x, off, p, s, gs, fmt)
    assert not y.isnan().any() and rel_l2(y, ref) <= 1e-5
    # the reference itself is the dense product
    rows = torch.repeat_interleave(torch.arange(4), torch.tensor(counts))
    dense_ref = torch.einsum("rk,rnk->rn", x, dense[rows])
    assert rel_l2(ref, dense_ref) <= 1e-5


@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4"])
def test_dequant_kernel_is_exact(fmt):
    n, k = (96, 192) if not GPU else (2048, 4096)
    p, s, gs, dense = bank(1, n, k, fmt)
    out = K.fp4_dequant(p[0], s[0], gs[0], fmt, torch.float32)
    assert torch.equal(out, dense[0].to(out.device))
    bank_ = K.ExpertBank(p, s, gs, fmt, torch.float32)
    assert len(bank_) == 1 and torch.equal(bank_[0], out)


def moe_case(t, d, inter, n_exp, topk, fmt, dtype, device):
    g = torch.Generator().manual_seed(t + n_exp)
    b1, b2, b3 = (bank(n_exp, n, k, fmt, device) for n, k in ((inter, d), (d, inter), (inter, d)))
    banks = [K.ExpertBank(b[0], b[1], b[2], fmt, dtype) for b in (b1, b2, b3)]
    x = torch.randn(t, d, generator=g).to(device, dtype)
    experts = torch.stack([torch.randperm(n_exp, generator=g)[:topk] for _ in range(t)]).to(device)
    weights = torch.rand(t, topk, generator=g).to(device)
    y = K.fp4_moe(x, experts, weights, *banks, limit=10.0)
    dense = [b[3].to(device) for b in (b1, b2, b3)]
    ref = moe(x.float(), experts, weights, *dense, None, 10.0)
    return y, ref


@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4"])
def test_moe_interpreted(fmt):
    if GPU:
        pytest.skip("interpreter shapes; the GPU tests cover real shapes")
    y, ref = moe_case(5, 128, 64, 6, 2, fmt, torch.float32, "cpu")
    assert not y.isnan().any() and rel_l2(y, ref) <= 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4"])
@pytest.mark.parametrize("t", [1, 9, 300])
def test_moe_gpu_flash_shapes(fmt, t):
    """Flash expert shapes (d 4096, inter 2048, top-6) over 64 experts (the dense fp32 copies
    the reference needs for all 256 would take 26 GB)."""
    y, ref = moe_case(t, 4096, 2048, 64, 6, fmt, torch.bfloat16, "cuda")
    assert not y.isnan().any()
    err = rel_l2(y, ref)
    assert err <= 2e-2, f"{fmt} T={t}: rel L2 {err:.2e}"


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4"])
def test_moe_gpu_graph_replay_equals_eager(fmt):
    """fp4_moe captured in a CUDA graph (decode: 4 tokens, Flash expert shapes over 64 experts)
    and replayed on new tokens and new routing equals eager: no host sync, no shape from data."""
    t, n_exp, topk = 4, 64, 6
    b1, b2, b3 = (
        bank(n_exp, n, k, fmt, "cuda") for n, k in ((2048, 4096), (4096, 2048), (2048, 4096))
    )
    banks = [K.FP4Bank(b[0], b[1], b[2], fmt) for b in (b1, b2, b3)]
    x = torch.randn(t, 4096, device="cuda", dtype=torch.bfloat16)
    experts = torch.stack([torch.randperm(n_exp, device="cuda")[:topk] for _ in range(t)])
    weights = torch.rand(t, topk, device="cuda")
    K.fp4_moe(x, experts, weights, *banks, limit=10.0)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = K.fp4_moe(x, experts, weights, *banks, limit=10.0)
    for _ in range(3):
        x.copy_(torch.randn_like(x))
        experts.copy_(torch.stack([torch.randperm(n_exp, device="cuda")[:topk] for _ in range(t)]))
        experts[0] = experts[1]  # two tokens on the same experts
        weights.copy_(torch.rand_like(weights))
        graph.replay()
        eager = K.fp4_moe(x, experts, weights, *banks, limit=10.0)
        assert not static.isnan().any() and rel_l2(static, eager) <= 1e-3


@pytest.mark.gpu
@pytest.mark.parametrize("path", ["per_expert", "grouped"])
@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4"])
def test_reference_model_runs_fp4_banks_gpu(tiny_cfg, fmt, path):
    """RefDSV4 with its routed experts replaced by FP4 banks (``per_expert``: ExpertBank
    dequantizing one expert at a time under DenseExperts; ``grouped``: fp4_moe, the served
    model's path) equals RefDSV4 over the dense dequantized experts, on the GPU, in fp32."""
    from sglang_dsv4.ref.model import RefDSV4
    from sglang_dsv4.ref.moe import DenseExperts
    from sglang_dsv4.weights.layout import logical_shapes

    g = torch.Generator(device="cuda").manual_seed(0)
    weights = {}
    for name, shape in logical_shapes(tiny_cfg, mtp=False).items():
        if name.endswith("tid2eid"):
            t = torch.randint(0, tiny_cfg.n_routed_experts, shape, device="cuda", generator=g)
        elif name.endswith(("norm.weight", "_scale")):
            t = 1 + 0.1 * torch.randn(shape, device="cuda", generator=g)
        else:
            t = 0.05 * torch.randn(shape, device="cuda", generator=g)
        weights[name] = t
    routed = {}
    for spec in tiny_cfg.layers:
        banks = []
        for proj in ("w1", "w2", "w3"):
            names = [f"layers.{spec.index}.ffn.experts.{e}.{proj}.weight" for e in range(8)]
            packed, scales, gss = [], [], []
            for n in names:
                if fmt == "mxfp4":
                    p, s = mxfp4_quant(weights[n])
                    gs, weights[n] = torch.ones((), device="cuda"), mxfp4_dequant(p, s)
                else:
                    p, s, gs = nvfp4_quant(weights[n])
                    weights[n] = nvfp4_dequant(p, s, gs)
                packed.append(p.view(torch.uint8))
                scales.append(s.view(torch.uint8))
                gss.append(gs)
            stacked = (torch.stack(packed), torch.stack(scales), torch.stack(gss).float())
            banks.append(K.ExpertBank(*stacked, fmt, torch.float32))
        if path == "per_expert":
            routed[spec.index] = DenseExperts(*banks)
        else:
            routed[spec.index] = lambda x, c, w, limit, dense=False, b=banks: K.fp4_moe(
                x, c, w, *b, limit
            )
    ids = torch.randint(2, 1024, (300,), device="cuda", generator=g)
    dense = RefDSV4(tiny_cfg, weights)(ids)
    got = RefDSV4(tiny_cfg, weights, experts=routed)(ids)
    assert dense.abs().max() > 0.1 and (got - dense).abs().max() <= 1e-4
