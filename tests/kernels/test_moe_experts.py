"""``kernels.moe_experts`` (slot and sorted forms, dense and FP8 banks, shared expert as a bank
row) against :class:`~sglang_dsv4.ref.moe.DenseExperts` + :func:`~sglang_dsv4.ref.moe.swiglu`
over the same (dequantized) weights, in fp32.

CPU: interpreted, fp32, small and odd shapes (I not a multiple of 128: w3's FP8 scale rows start
mid-bank). GPU: Flash dims (d 4096, I 1024 / 2048, E 16 / 256, k 6 / 8) in bf16, and CUDA-graph
replay on new routing equals eager. Outputs are NaN-poisoned before every launch.
"""

import importlib

import pytest
import torch

from sglang_dsv4.ref.moe import DenseExperts, swiglu
from sglang_dsv4.ref.weight_quant import fp8_block_dequant, fp8_block_quant

K = importlib.import_module("sglang_dsv4.kernels.moe_experts")  # CPU: interpreted (conftest)
GPU = torch.cuda.is_available()
FORMS = {"slots": K.moe_experts_slots, "sorted": K.moe_experts_sorted}
LIMIT = 10.0


def rel_l2(out, ref) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm().clamp(min=1e-30)).item()


def make_bank(rows, d, inter, fp8, device, dtype, seed=0):
    """Random bank -> (ExpertWeights, fp32 dense (w1, w2, w3) [R, ...] of the same values)."""
    g = torch.Generator(device=device).manual_seed(seed)
    w1, w3 = (torch.randn(rows, inter, d, device=device, generator=g) * d**-0.5 for _ in "13")
    w2 = torch.randn(rows, d, inter, device=device, generator=g) * inter**-0.5
    if not fp8:
        bank = K.ExpertWeights(torch.cat([w1, w3], dim=1).to(dtype), w2.to(dtype))
        return bank, (w1.to(dtype).float(), w2.to(dtype).float(), w3.to(dtype).float())
    q, s, dense = {}, {}, {}
    for k, w in (("w1", w1), ("w2", w2), ("w3", w3)):
        pairs = [fp8_block_quant(w[e]) for e in range(rows)]
        q[k] = torch.stack([p[0] for p in pairs])
        s[k] = torch.stack([p[1] for p in pairs])
        dense[k] = torch.stack([fp8_block_dequant(*p, torch.float32) for p in pairs])
    bank = K.ExpertWeights(
        torch.cat([q["w1"], q["w3"]], dim=1), q["w2"], torch.cat([s["w1"], s["w3"]], dim=1), s["w2"]
    )
    return bank, (dense["w1"], dense["w2"], dense["w3"])


def routing(t, n_exp, topk, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    chosen = torch.stack([torch.randperm(n_exp, generator=g)[:topk] for _ in range(t)])
    if t > 2:
        chosen[: t // 2, 0] = 1  # a crowded expert; other ids absent from every row
    weights = torch.rand(t, topk, generator=g)
    return chosen.to(device, torch.int32), weights.to(device)


def reference(x, chosen, weights, dense, n_exp, shared):
    w1, w2, w3 = dense
    x = x.float()
    out = DenseExperts(w1[:n_exp], w2[:n_exp], w3[:n_exp])(x, chosen.long(), weights, LIMIT)
    if shared:
        out = out + swiglu(x, w1[n_exp], w2[n_exp], w3[n_exp], LIMIT)
    return out


def run(form, x, chosen, weights, bank, shared_row):
    out = torch.full_like(x, float("nan"))
    y = FORMS[form](x, chosen, weights, bank, LIMIT, shared_row, out=out)
    assert y is out or torch.equal(y, out)
    return out


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("fp8", [False, True], ids=["fp32", "fp8"])
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "routed"])
@pytest.mark.parametrize(("t", "topk"), [(1, 2), (7, 3)])
def test_experts_interpreted(form, fp8, shared, t, topk):
    if GPU:
        pytest.skip("interpreter shapes; the GPU tests cover real shapes")
    n_exp, d, inter = 6, 192, 160
    bank, dense = make_bank(n_exp + shared, d, inter, fp8, "cpu", torch.float32)
    x = torch.randn(t, d) * 3  # large enough for the clamp to bite
    chosen, weights = routing(t, n_exp, topk, "cpu")
    got = run(form, x, chosen, weights, bank, n_exp if shared else None)
    want = reference(x, chosen, weights, dense, n_exp, shared)
    assert not got.isnan().any() and rel_l2(got, want) <= 1e-5


def test_bank_shape_errors_are_clear():
    bank = K.ExpertWeights(torch.zeros(2, 64, 32), torch.zeros(2, 32, 16))
    with pytest.raises(ValueError, match="bank w13"):
        K.moe_experts_slots(torch.zeros(1, 32), torch.zeros(1, 1, dtype=torch.int32),
                            torch.ones(1, 1), bank, LIMIT)  # fmt: skip
    e4m3 = torch.float8_e4m3fn
    fp8 = K.ExpertWeights(torch.zeros(2, 64, 32).to(e4m3), torch.zeros(2, 32, 32).to(e4m3))
    with pytest.raises(ValueError, match="scales"):
        fp8.check(32)


# ---- GPU ---------------------------------------------------------------------------------

FLASH = [(16, 1024, 6), (256, 2048, 8)]  # (experts, inter, top-k)


@pytest.mark.gpu
@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
@pytest.mark.parametrize(("n_exp", "inter", "topk"), FLASH)
@pytest.mark.parametrize("t", [1, 32, 300])
def test_experts_gpu_flash_dims(form, fp8, n_exp, inter, topk, t):
    """bf16 activations against the fp32 twin on the same (bf16 / FP8) weights. E 256 x I 2048
    keeps 64 experts in the bank (+ shared) so the fp32 copies fit; ids cover all of them."""
    rows = min(n_exp, 64)
    bank, dense = make_bank(rows + 1, 4096, inter, fp8, "cuda", torch.bfloat16)
    x = torch.randn(t, 4096, device="cuda").bfloat16() * 2
    chosen, weights = routing(t, rows, topk, "cuda")
    got = run(form, x, chosen, weights, bank, rows)
    want = reference(x, chosen, weights, dense, rows, True)
    err = rel_l2(got, want)
    assert not got.isnan().any() and err <= 1e-2, f"rel L2 {err:.2e}"


@pytest.mark.gpu
@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
def test_experts_gpu_graph_replay_equals_eager(form, fp8):
    """Captured once (4 tokens, Flash dims, 16 experts + shared), replayed on new tokens and new
    routing (two tokens on the same experts) equals eager: no host sync, no shape from data."""
    t, n_exp, topk = 4, 16, 6
    bank, _ = make_bank(n_exp + 1, 4096, 1024, fp8, "cuda", torch.bfloat16)
    x = torch.randn(t, 4096, device="cuda").bfloat16()
    chosen, weights = routing(t, n_exp, topk, "cuda")
    fn = FORMS[form]
    fn(x, chosen, weights, bank, LIMIT, n_exp)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = fn(x, chosen, weights, bank, LIMIT, n_exp)
    for seed in range(3):
        x.copy_(torch.randn_like(x))
        new_c, new_w = routing(t, n_exp, topk, "cuda", seed=seed + 1)
        new_c[0] = new_c[1]
        chosen.copy_(new_c)
        weights.copy_(new_w)
        static.fill_(float("nan"))
        graph.replay()
        eager = fn(x, chosen, weights, bank, LIMIT, n_exp)
        assert not static.isnan().any() and torch.equal(static, eager)
