"""``model.experts.FP4Experts``: routed experts kept as FP4 banks (the CUDA path of the served
model) run by the grouped kernel. On CPU the kernel runs under ``TRITON_INTERPRET=1``
(tests/conftest.py), in fp32, against :class:`~sglang_dsv4.ref.moe.DenseExperts` over the
dequantized weights. The served model built on these banks: ``test_kept_quantized.py``."""

import pytest
import torch

from sglang_dsv4.model.experts import FP4Experts, GroupedFP4Experts
from sglang_dsv4.ref.moe import DenseExperts
from sglang_dsv4.ref.weight_quant import mxfp4_dequant, mxfp4_quant, nvfp4_dequant, nvfp4_from_mxfp4
from sglang_dsv4.weights.layout import Fmt, StoredWeight

E, D, INTER, TOPK = 5, 128, 64, 2


def banks(fmt: Fmt) -> tuple[FP4Experts, DenseExperts]:
    """FP4 banks of random experts and the same experts dequantized (fp32)."""
    experts = FP4Experts(E, D, INTER, fmt)
    dense = {"w1": [], "w2": [], "w3": []}
    for e in range(E):
        for proj, (n, k) in zip(dense, ((INTER, D), (D, INTER), (INTER, D)), strict=True):
            packed, scale = mxfp4_quant(torch.randn(n, k) * 0.1)
            if fmt is Fmt.NVFP4:
                packed, scale, gs = nvfp4_from_mxfp4(packed, scale)
                stored = StoredWeight(fmt, packed, scale, gs)
                dense[proj].append(nvfp4_dequant(packed, scale, gs))
            else:
                stored = StoredWeight(fmt, packed, scale)
                dense[proj].append(mxfp4_dequant(packed, scale))
            experts.store(e, proj, stored)
    return experts, DenseExperts(*dense.values())


@pytest.mark.parametrize("fmt", [Fmt.MXFP4, Fmt.NVFP4])
def test_grouped_banks_equal_dense_experts(fmt):
    experts, dense = banks(fmt)
    routed = experts.routed()
    assert isinstance(routed, GroupedFP4Experts)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(7, D, generator=g) * 4
    chosen = torch.stack([torch.randperm(E, generator=g)[:TOPK] for _ in range(7)])
    chosen[:, 0] = 3  # a crowded expert; expert ids absent from every row too
    weights = torch.rand(7, TOPK, generator=g)
    got = routed(x, chosen, weights, 10.0, dense=True)
    want = dense(x, chosen, weights, 10.0)
    assert not got.isnan().any() and (got - want).abs().max() <= 1e-5 * want.abs().max()


@pytest.mark.parametrize(("form", "t"), [("slots", 2), ("sorted", 7)])
def test_fp4_banks_through_the_grouped_kernels(form, t):
    """The served GPU path of an FP4 layer (``FP4Experts.grouped``, both kernel forms) equals
    the dense dequantized experts."""
    experts, dense = banks(Fmt.MXFP4)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(t, D, generator=g) * 4
    chosen = torch.stack([torch.randperm(E, generator=g)[:TOPK] for _ in range(t)])
    weights = torch.rand(t, TOPK, generator=g)
    got = experts.grouped(x, chosen.int(), weights, 10.0, form, None)
    want = dense(x, chosen, weights, 10.0)
    assert not got.isnan().any() and (got - want).abs().max() <= 1e-5 * want.abs().max()


def test_store_rejects_another_format():
    experts = FP4Experts(E, D, INTER, Fmt.NVFP4)
    packed, scale = mxfp4_quant(torch.randn(INTER, D))
    with pytest.raises(ValueError, match="expert weight in mxfp4, the bank holds nvfp4"):
        experts.store(0, "w1", StoredWeight(Fmt.MXFP4, packed, scale))
    with pytest.raises(ValueError, match="mxfp4 or nvfp4"):
        FP4Experts(E, D, INTER, Fmt.FP8)


# ---- dense / FP8 stacked banks -----------------------------------------------------------


def test_fp8_bank_rows_are_the_released_tensors():
    """FP8 experts stored into one bank keep their e4m3 bytes and e8m0 scales per row (w1 and
    w3 halves of w13, I not a multiple of 128: w3's scale rows start mid-bank); the reference
    views run them as the dequantized weights."""
    from sglang_dsv4.model.experts import FP8Rows, StackedExperts
    from sglang_dsv4.ref.weight_quant import fp8_block_dequant, fp8_block_quant

    inter = 160
    bank = StackedExperts(E, D, inter, Fmt.FP8, shared=True)
    want = {}
    for row in range(E + 1):
        for proj, shape in (("w1", (inter, D)), ("w2", (D, inter)), ("w3", (inter, D))):
            q, s = fp8_block_quant(torch.randn(shape) * 0.1)
            bank.store(row, proj, StoredWeight(Fmt.FP8, q, s))
            want[row, proj] = (q, s)
    released = bank.released("p.", shared_row=E)
    q, s = want[E, "w3"]
    assert torch.equal(
        released["p.shared_experts.w3.weight"].view(torch.uint8), q.view(torch.uint8)
    )
    assert torch.equal(released["p.shared_experts.w3.scale"].view(torch.uint8), s.view(torch.uint8))
    w3 = bank.linears(2)[2]
    assert isinstance(w3, FP8Rows)
    x = torch.randn(3, D)
    dense = fp8_block_dequant(*want[2, "w3"], torch.float32)
    assert (w3(x) - x @ dense.T).abs().max() <= 1e-4
    with pytest.raises(ValueError, match="bank holds fp8"):
        bank.store(0, "w1", StoredWeight(Fmt.BF16, torch.zeros(inter, D)))
    with pytest.raises(ValueError, match="expected"):
        q, s = fp8_block_quant(torch.randn(inter, D + 128))
        bank.store(0, "w1", StoredWeight(Fmt.FP8, q, s))


def test_dense_bank_twin_views_are_the_stored_experts():
    from sglang_dsv4.model.experts import StackedExperts

    bank = StackedExperts(E, D, INTER, None, shared=False)
    w = {
        (e, k): torch.randn(*((INTER, D) if k != "w2" else (D, INTER)))
        for e in range(E)
        for k in ("w1", "w2", "w3")
    }
    for (e, k), t in w.items():
        bank.store(e, k, StoredWeight(Fmt.BF16, t))
    routed = bank.dense()
    assert all(
        torch.equal(routed.w1[e], w[e, "w1"]) and routed.w3[e].is_contiguous() for e in range(E)
    )
    assert bank.w13.data_ptr() == routed.w1[0].data_ptr()  # views, no second copy
