"""``ops.proj``: the concatenated GEMM (``ProjCat``) gives the twin's outputs (``ProjTorch``: one
``ref.linear`` per weight), splits by views, holds each weight once, and keeps apart what cannot
share a GEMM. FP8 parts run the Triton kernel (interpreted on CPU, fp32)."""

import pytest
import torch

from sglang_dsv4.model.linears import FP8Linear
from sglang_dsv4.ops.proj import Fused, ProjCat, ProjTorch, proj_ops
from sglang_dsv4.ref.attention import grouped_output_proj
from sglang_dsv4.ref.weight_quant import fp8_block_quant
from sglang_dsv4.weights.layout import Fmt, StoredWeight


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def dense(ns, k, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(n, k, generator=g).to(device, dtype)) for n in ns]


def fp8(n, k, seed):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed))
    lin = FP8Linear(k, n)
    lin.load(StoredWeight(Fmt.FP8, *fp8_block_quant(w)))
    return lin


def test_choice():
    assert type(proj_ops(False)) is ProjTorch and type(proj_ops(True)) is ProjCat


@pytest.mark.parametrize("lead", [(1,), (5,), (2, 3)])
def test_dense_concat_equals_the_twin(lead):
    ns, k = (40, 24, 40, 40, 8), 36  # odd widths: the split is by views, not tiles
    want = ProjTorch().run(ProjTorch().fuse(dense(ns, k)), x := torch.randn(*lead, k))
    fused = ProjCat().fuse(dense(ns, k))
    assert len(fused.runs) == 1 and fused.runs[0][0].shape == (sum(ns), k)
    got = ProjCat().run(fused, x)
    assert [g.shape for g in got] == [(*lead, n) for n in ns]
    for g, w in zip(got, want, strict=True):
        assert rel(g, w) <= 1e-6
        assert g.untyped_storage().data_ptr() == got[0].untyped_storage().data_ptr()  # views


def test_parts_become_views_of_the_fused_weight():
    parts = dense((16, 8), 12)
    before = [p.detach().clone() for p in parts]
    cat = ProjCat().fuse(parts).runs[0][0]
    assert torch.equal(parts[0], before[0]) and torch.equal(parts[1], before[1])
    assert parts[1].data_ptr() == cat.data_ptr() + 16 * 12 * cat.element_size()
    parts[1].data.copy_(torch.ones(8, 12))  # a later load_weights writes through the part
    assert torch.equal(cat[16:], torch.ones(8, 12))


def test_fp8_concat_equals_the_twin():
    k = 256
    mk = [(128, 1), (256, 2), (64, 3)]  # the 64-row linear is off the 128-row scale tile
    fused = ProjCat().fuse([fp8(n, k, s) for n, s in mk])
    assert [widths for _, widths in fused.runs] == [(128, 256), (64,)]
    cat = fused.runs[0][0]
    assert cat.weight.shape == (384, k) and cat.scale.shape == (3, 2)
    x = torch.randn(3, k)
    want = ProjTorch().run(ProjTorch().fuse([fp8(n, k, s) for n, s in mk]), x)
    got = ProjCat().run(fused, x)
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape and not g.isnan().any()
        assert rel(g, w) <= 1e-6


def test_mixed_forms_split_into_runs():
    k = 128
    ws = [fp8(128, k, 1), *dense((32, 16), k), fp8(128, k, 2), *dense((8,), k, torch.float64)]
    fused = ProjCat().fuse(ws)
    assert [widths for _, widths in fused.runs] == [(128,), (32, 16), (128,), (8,)]
    runs = Fused(fused.runs[:3])  # the fp32 runs (the float64 one only shows the dtype split)
    x = torch.randn(2, k)
    want = ProjTorch().run(runs, x)
    got = ProjCat().run(runs, x)
    assert [g.shape[-1] for g in got] == [128, 32, 16, 128]
    assert all(rel(g, w) <= 1e-6 for g, w in zip(got, want, strict=True))


@pytest.mark.parametrize("t", [1, 3])
def test_grouped_output_projection_equals_the_reference(t):
    o, wo_a, wo_b = torch.randn(t, 8, 16), torch.randn(4 * 12, 2 * 16), torch.randn(20, 48)
    o.requires_grad_(), wo_a.requires_grad_()  # outside no_grad: still served
    want = grouped_output_proj(o, wo_a, wo_b)
    twin = ProjTorch()
    assert torch.equal(twin.grouped(o, twin.fuse_grouped(wo_a, wo_b, 4)), want)
    cat = ProjCat()
    g = cat.fuse_grouped(wo_a, wo_b, 4)  # [G, H/G*D, R], a view of wo_a: loads write through
    assert g.wo_a.shape == (4, 32, 12) and g.wo_a.data_ptr() == wo_a.data_ptr()
    got = cat.grouped(o, g)
    assert got.shape == (t, 20) and rel(got, want) <= 1e-6
    # the bmm of the former per-call view: the same kernel on the same operands
    x = o.reshape(t, 4, -1).transpose(0, 1)
    assert torch.equal(got, torch.bmm(x, wo_a.view(4, 12, 32).transpose(1, 2)).transpose(0, 1)
                       .reshape(t, -1) @ wo_b.T)  # fmt: skip


@pytest.mark.gpu
@pytest.mark.parametrize("t", [1, 32])
def test_gpu_grouped_output_projection_without_copies(t):
    """Flash dims (64 heads x 512, 8 groups of rank 1024): the bmm writes wo_b's input rows in
    place, so the only kernels are the two GEMMs (and cuBLAS split-K reduces)."""
    from torch.profiler import ProfilerActivity, profile

    dev, bf = "cuda", torch.bfloat16
    o = torch.randn(t, 64, 512, device=dev, dtype=bf)
    wo_a = torch.randn(8 * 1024, 8 * 512, device=dev, dtype=bf) * 0.02
    wo_b = torch.randn(4096, 8 * 1024, device=dev, dtype=bf) * 0.02
    want = grouped_output_proj(o.float(), wo_a.float(), wo_b.float())
    g = ProjCat().fuse_grouped(wo_a, wo_b, 8)
    ProjCat().grouped(o, g)  # cuBLAS warm-up
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        got = ProjCat().grouped(o, g)
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type.name == "CUDA"]
    assert not [n for n in names if "copy" in n.lower() or "elementwise" in n.lower()], names
    assert rel(got, want) <= 2e-2


@pytest.mark.gpu
@pytest.mark.parametrize("t", [1, 32])
def test_gpu_attention_input_group_at_flash_dims(t):
    """bf16, the c4 layer's ``x`` readers (wq_a, wkv, compressor wkv / wgate, indexer
    compressor wkv / wgate, weights_proj) and the ``q_lora`` readers (wq_b, indexer wq_b)."""
    for ns, k in (((1024, 512, 1024, 1024, 256, 256, 64), 4096), ((32768, 8192), 1024)):
        x = torch.randn(t, k, device="cuda", dtype=torch.bfloat16)
        ws = dense(ns, k, torch.bfloat16, "cuda")
        want = [(x.float() @ w.float().T) for w in ws]
        got = ProjCat().run(ProjCat().fuse(ws), x)
        for g, w in zip(got, want, strict=True):
            assert g.shape == w.shape and not g.isnan().any()
            assert rel(g, w) <= 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("t", [1, 32])
def test_gpu_fp8_group_at_flash_dims(t):
    """Released FP8 wq_a + wkv (1024 + 512 rows of 4096) on the GPU: one concatenated FP8 GEMM
    (bytes concatenated on the device) gives the separate linears' outputs."""
    ws = [fp8(n, 4096, s).cuda() for n, s in ((1024, 1), (512, 2))]
    x = torch.randn(t, 4096, device="cuda", dtype=torch.bfloat16)
    want = [w(x).float() for w in ws]
    fused = ProjCat().fuse(ws)
    assert len(fused.runs) == 1 and fused.runs[0][0].weight.is_cuda
    for g, w in zip(ProjCat().run(fused, x), want, strict=True):
        assert g.shape == w.shape and not g.isnan().any()
        assert rel(g, w) <= 1e-2
