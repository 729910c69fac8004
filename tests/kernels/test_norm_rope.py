"""``kernels.norm_rope`` against ``ref.norm`` / ``ref.rope``: the weighted RMSNorm of rows and the
in-place per-head RMSNorm + RoPE (forward / inverse, weighted / unweighted / RoPE only).

CPU: interpreted (tests/conftest.py), fp32 and bf16, small shapes, non-power-of-2 widths,
strided rows. Outputs of ``rms_norm`` NaN-poisoned; the in-place op must leave channels it does
not own (the non-RoPE channels without norm, heads of other rows) bit-identical. GPU: DSV4 shapes
(64 / 128 heads x 512, indexer 64 x 128, q_lora 1024 / 1536), positions up to 1M (YaRN).
"""

import pytest
import torch
from poison import poisoned_allocations

from sglang_dsv4.config import RopeSpec, YarnSpec
from sglang_dsv4.kernels import norm_rope as K
from sglang_dsv4.ref.norm import rms_norm
from sglang_dsv4.ref.quant import hadamard
from sglang_dsv4.ref.rope import apply_rope, rope_cos_sin, rope_inv_freq

EPS = 1e-6
YARN = RopeSpec(160000.0, YarnSpec(16.0, 65536, 32.0, 1.0))


def inv_freq(device) -> torch.Tensor:
    return rope_inv_freq(YARN, 64).to(device)


def tol(dtype) -> float:
    return 1e-5 if dtype == torch.float32 else 8e-3  # bf16: one ulp (2^-8 relative) + order


def rel_err(got: torch.Tensor, exp: torch.Tensor) -> float:
    assert got.dtype == exp.dtype and not got.isnan().any()
    return ((got.float() - exp.float()).abs().max() / exp.float().abs().max()).item()


def want(x, w, pos, norm: bool, inverse: bool):
    cos, sin = rope_cos_sin(pos, inv_freq(x.device))
    return apply_rope(rms_norm(x, w, EPS) if norm else x, cos, sin, inverse=inverse)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(("n", "width"), [(1, 64), (7, 96), (33, 1536)])
def test_rms_norm_interpreted(n, width, dtype):
    gen = torch.Generator().manual_seed(n)
    x = (torch.randn(n, width + 5, generator=gen) * 3).to(dtype)[:, 3 : 3 + width]  # strided
    w = (torch.rand(width, generator=gen) + 0.5).to(dtype)
    with poisoned_allocations():
        got = K.rms_norm(x, w, EPS)
    assert rel_err(got, rms_norm(x, w, EPS)) <= tol(dtype)


CASES = [  # (norm, weighted, inverse)
    (True, False, False),  # query after wq_b
    (True, True, False),  # raw KV (kv_norm)
    (False, False, False),  # indexer query
    (False, False, True),  # attention output, inverse
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(("norm", "weighted", "inverse"), CASES)
@pytest.mark.parametrize(("n", "heads", "d"), [(1, 1, 64), (5, 3, 128), (4, 20, 128), (2, 2, 512)])
def test_rms_rope_interpreted(n, heads, d, norm, weighted, inverse, dtype):
    gen = torch.Generator().manual_seed(n * heads + d)
    x = (torch.randn(n, heads, d, generator=gen) * 3).to(dtype)
    w = (torch.rand(d, generator=gen) + 0.5).to(dtype) if weighted else None
    pos = torch.randint(0, 1 << 20, (n,), generator=gen)
    exp = want(x, w, pos, norm, inverse)
    got = x.clone()
    out = K.rms_rope_(got, pos, inv_freq("cpu"), norm=norm, weight=w, inverse=inverse, eps=EPS)
    assert out is got  # in place
    assert rel_err(got, exp) <= tol(dtype)
    if not norm:
        assert torch.equal(got[..., :-64], x[..., :-64]), "a non-RoPE channel was written"


def test_rms_rope_rows_and_strided_heads():
    """[T, D] rows (the raw KV) and a head-strided view leave the other heads untouched."""
    gen = torch.Generator().manual_seed(3)
    pos = torch.arange(5) * 1000
    kv = torch.randn(5, 128, generator=gen)
    w = torch.rand(128, generator=gen)
    got = K.rms_rope_(kv.clone(), pos, inv_freq("cpu"), norm=True, weight=w, eps=EPS)
    assert rel_err(got, want(kv, w, pos, True, False)) <= 1e-5
    both = torch.randn(5, 4, 128, generator=gen)
    view = both.clone()
    K.rms_rope_(view[:, ::2], pos, inv_freq("cpu"), norm=True, eps=EPS)
    assert rel_err(view[:, ::2], want(both[:, ::2], None, pos, True, False)) <= 1e-5
    assert torch.equal(view[:, 1::2], both[:, 1::2])


def test_bad_inputs_raise():
    pos, f = torch.zeros(2, dtype=torch.long), inv_freq("cpu")
    with pytest.raises(ValueError, match="power of 2"):
        K.rms_rope_(torch.zeros(2, 3, 96), pos, f)
    with pytest.raises(ValueError, match="without norm"):
        K.rms_rope_(torch.zeros(2, 3, 128), pos, f, weight=torch.ones(128))
    with pytest.raises(ValueError, match="contiguous"):
        K.rms_norm(torch.zeros(4, 8).t(), torch.ones(4), EPS)


# ---- GPU ---------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("n", [1, 32, 128, 4096])
@pytest.mark.parametrize(("norm", "weighted", "inverse"), CASES)
@pytest.mark.parametrize(("heads", "d"), [(64, 512), (128, 512), (1, 512), (64, 128)])
def test_gpu_rms_rope(n, heads, d, norm, weighted, inverse, dtype):
    gen = torch.Generator(device="cuda").manual_seed(n + heads)
    x = (torch.randn(n, heads, d, device="cuda", generator=gen) * 3).to(dtype)
    w = (torch.rand(d, device="cuda", generator=gen) + 0.5).to(dtype) if weighted else None
    pos = torch.randint(0, 1 << 20, (n,), device="cuda", generator=gen)
    exp = want(x, w, pos, norm, inverse)
    got = K.rms_rope_(x.clone(), pos, inv_freq("cuda"), norm=norm, weight=w, inverse=inverse)
    assert rel_err(got, exp) <= tol(dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("width", [1024, 1536])
@pytest.mark.parametrize("n", [1, 128, 4096])
def test_gpu_rms_norm(n, width, dtype):
    gen = torch.Generator(device="cuda").manual_seed(n)
    x = (torch.randn(n, width, device="cuda", generator=gen) * 3).to(dtype)
    w = (torch.rand(width, device="cuda", generator=gen) + 0.5).to(dtype)
    with poisoned_allocations():
        got = K.rms_norm(x, w, EPS)
    assert rel_err(got, rms_norm(x, w, EPS)) <= tol(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("inverse", [False, True])
@pytest.mark.parametrize(("n", "heads", "d"), [(1, 1, 64), (3, 5, 128), (2, 2, 512)])
def test_rope_hadamard_interpreted(n, heads, d, inverse, dtype):
    gen = torch.Generator().manual_seed(n + heads + d)
    x = (torch.randn(n, heads, d, generator=gen) * 3).to(dtype)
    pos = torch.randint(0, 1 << 20, (n,), generator=gen)
    exp = hadamard(want(x, None, pos, False, inverse))
    got = K.rope_hadamard_(x.clone(), pos, inv_freq("cpu"), inverse=inverse)
    assert rel_err(got, exp) <= tol(dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("n", [1, 128, 4096])
def test_gpu_rope_hadamard(n):
    """The indexer query (64 heads x 128) in bf16."""
    gen = torch.Generator(device="cuda").manual_seed(n)
    x = (torch.randn(n, 64, 128, device="cuda", generator=gen) * 3).to(torch.bfloat16)
    pos = torch.randint(0, 1 << 20, (n,), device="cuda", generator=gen)
    exp = hadamard(want(x, None, pos, False, False))
    got = K.rope_hadamard_(x.clone(), pos, inv_freq("cuda"))
    assert rel_err(got, exp) <= tol(torch.bfloat16)
