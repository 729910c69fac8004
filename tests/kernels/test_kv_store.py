"""``kernels.kv_store`` against ``ref.kv_layout`` (+ ``ref.norm`` / ``ref.rope``).

Tolerances: packing given values is bit-exact (every byte of every written row; other rows
untouched). With the fused RMSNorm + RoPE the kernel's fp32 sums / rsqrt / cos differ from
torch's by an ulp, so an FP8 byte may land on the neighbouring e4m3 value: at most 1e-3 of the
bytes differ, each such value by at most one e4m3 step (2^-3 relative, or the subnormal step of
its block); plain rows within one ulp of the value plus one ulp of the row's largest value (RoPE
mixes pairs; bf16 ulp 2^-7, fp32 2^-22 relative).
"""

import pytest
import torch
from kv_tolerance import fp8_error
from triton_cpu import interpreted

from sglang_dsv4.kernels import kv_store
from sglang_dsv4.ref.kv_layout import pack_fp8_rows, unpack_fp8_rows
from sglang_dsv4.ref.norm import rms_norm
from sglang_dsv4.ref.rope import apply_rope, rope_cos_sin

POISON = 0xFF  # e4m3 NaN, bf16 NaN


@pytest.fixture
def ks():
    with interpreted(kv_store) as (mod,):
        yield mod


def _kv(n: int, d: int, device) -> torch.Tensor:
    """Rows of very different magnitudes, some blocks all zero, negative zeros."""
    kv = torch.randn(n, d, device=device) * torch.exp2(
        torch.randint(-20, 12, (n, 1), device=device)
    )
    kv[::5, :64] = 0.0
    kv[1::7, 64:128] = -0.0
    return kv


def _rows(n: int, n_rows: int, device) -> torch.Tensor:
    rows = torch.randperm(n_rows, device=device)[:n]
    rows[1::4] = -1  # skipped
    return rows


def _check_pack(mod, n, d, layout, device, dtype=torch.float32):
    kv = _kv(n, d, device).to(dtype)
    n_rows = 2 * n + 3
    rows = _rows(n, n_rows, device)
    cache = layout.empty(n_rows, device).fill_(POISON)
    mod.store_kv(kv, cache, rows, layout=layout)
    keep = rows >= 0
    got = layout.read(cache, rows[keep])
    assert torch.equal(got, pack_fp8_rows(kv[keep].float())), "bytes differ from the ref"
    others = torch.ones(n_rows, dtype=torch.bool, device=device)
    others[rows[keep]] = False
    untouched = layout.read(cache, others.nonzero().flatten())
    assert (untouched == POISON).all(), "a skipped / unrelated row was written"


def _ref_fused(kv, weight, pos, inv_freq):
    cos, sin = rope_cos_sin(pos, inv_freq)
    return apply_rope(rms_norm(kv, weight), cos, sin)


def _check_fused(mod, n, d, layout, device, dtype):
    kv = (torch.randn(n, d, device=device) * 3).to(dtype)
    weight = (torch.rand(d, device=device) + 0.5).to(dtype)
    pos = torch.randint(0, 1 << 20, (n,), device=device)
    inv_freq = 1.0 / 160000 ** (torch.arange(0, 64, 2, device=device).float() / 64)
    rows = _rows(n, 2 * n + 1, device)
    keep = rows >= 0
    ref = _ref_fused(kv, weight, pos, inv_freq)[keep]
    if layout is None:  # plain rows of the input dtype
        cache = torch.full((2 * n + 1, d), float("nan"), dtype=dtype, device=device)
        mod.store_kv(kv, cache, rows, norm_weight=weight, positions=pos, inv_freq=inv_freq)
        got, ref = cache[rows[keep]].float(), ref.float()
        # one ulp of the value + one ulp of the row's largest value (RoPE mixes pairs)
        ulp = 2.0**-7 if dtype == torch.bfloat16 else 2.0**-22
        bound = 2.0**-7 * ref.abs() + ulp * ref.abs().amax(1, keepdim=True)
        assert not got.isnan().any()
        assert ((got - ref).abs() <= bound).all()
        return
    cache = layout.empty(2 * n + 1, device).fill_(POISON)
    mod.store_kv(
        kv, cache, rows, layout=layout, norm_weight=weight, positions=pos, inv_freq=inv_freq
    )
    got = layout.read(cache, rows[keep])
    want = pack_fp8_rows(ref.float())
    assert (got != want).float().mean() <= 1e-3, "too many FP8 bytes differ"
    a, b = unpack_fp8_rows(got, d), unpack_fp8_rows(want, d)
    assert not a.isnan().any()
    assert (fp8_error(a[:, :-64], b[:, :-64]) <= 1).all()
    rope_ulp = 2.0**-7 * b[:, -64:].abs() + 2.0**-22 * b.abs().amax(1, keepdim=True)
    assert ((a[:, -64:] - b[:, -64:]).abs() <= rope_ulp).all()


# ------------------------------------------------------------------ CPU (TRITON_INTERPRET=1)


@pytest.mark.parametrize("n", [1, 3, 29])
@pytest.mark.parametrize("d", [128, 512])
@pytest.mark.parametrize("paged", [False, True])
def test_pack_bit_exact(ks, n, d, paged):
    layout = ks.FP8RowLayout.paged(3, d) if paged else ks.FP8RowLayout.rows(d)
    _check_pack(ks, n, d, layout, "cpu")


def test_pack_bf16_input(ks):
    _check_pack(ks, 9, 128, ks.FP8RowLayout.rows(128), "cpu", torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fmt", ["fp8", "plain"])
def test_fused_norm_rope(ks, dtype, fmt):
    layout = ks.FP8RowLayout.paged(4, 256) if fmt == "fp8" else None
    _check_fused(ks, 13, 256, layout, "cpu", dtype)


def test_rejects_bad_shapes(ks):
    cache = ks.FP8RowLayout.rows(128).empty(4, "cpu")
    with pytest.raises(ValueError):
        ks.store_kv(torch.zeros(2, 96), cache, torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError):
        ks.store_kv(torch.zeros(2, 128), cache, torch.zeros(2, dtype=torch.long), positions=cache)


# ------------------------------------------------------------------ GPU, DSV4 shapes


@pytest.mark.gpu
@pytest.mark.parametrize("n", [1, 3, 129, 4097])
@pytest.mark.parametrize("rows_per_page", [1, 64])
def test_gpu_pack_bit_exact(n, rows_per_page):
    layout = kv_store.FP8RowLayout.paged(rows_per_page)
    _check_pack(kv_store, n, 512, layout, "cuda")
    _check_pack(kv_store, n, 512, layout, "cuda", torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("n", [1, 129, 4097])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_fused_norm_rope(n, dtype):
    _check_fused(kv_store, n, 512, kv_store.FP8RowLayout.paged(256), "cuda", dtype)
    _check_fused(kv_store, n, 512, None, "cuda", dtype)


@pytest.mark.gpu
def test_gpu_cuda_graph_replay():
    """Captured once, replayed on new inputs: the cache follows the inputs."""
    n, d = 128, 512
    layout = kv_store.FP8RowLayout.paged(64)
    kv = torch.randn(n, d, device="cuda")
    rows = torch.randperm(4 * n, device="cuda")[:n]
    cache = layout.empty(4 * n, "cuda")
    kv_store.store_kv(kv, cache, rows, layout=layout)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        kv_store.store_kv(kv, cache, rows, layout=layout)
    for _ in range(2):
        kv.copy_(_kv(n, d, "cuda"))
        rows.copy_(torch.randperm(4 * n, device="cuda")[:n])
        cache.fill_(POISON)
        graph.replay()
        assert torch.equal(layout.read(cache, rows), pack_fp8_rows(kv))
