"""``kernels.mhc_gemm``: the GEMM form's one pass over the streams (the previous block's post and
the split-K mix) and ``hc_post`` alone.

The new streams must round exactly as ``kernels.mhc._post_tile`` (the GEMM form's post before
this module, and the one-token form's): against an in-order torch emulation of that rounding
(``post_in_order``) and, interpreted, against ``hc_fused`` forced into the one-token form
(``FMA_MAX_TOKENS``), with ``torch.equal``. The partial mix rows against ``x @ fn^T`` in fp64;
everything against the ``ref.mhc`` twin.

CPU: interpreted, fp32 and bf16, odd token counts (1, 7: one partial 16-token tile; 300: five
64-token tiles, the last partial), outputs and workspaces NaN-poisoned. GPU: the Flash hidden
size (4096) at prefill token counts (300, 8192) against the twin; bf16 streams bit-identical to
the emulation (every product exact: FMAs change nothing), ``hc_post`` alone to the fused pass.
On the GPU the one-token form sums ``j`` in another order (``mhc_gemm``'s docstring): only close.
"""

import pytest
import torch
from mhc_cases import (
    EPS,
    ITERS,
    check,
    check_device,
    max_abs,
    ref_maps,
    rel_l2,
    site,
    streams,
    want,
)
from poison import poisoned_allocations

from sglang_dsv4.kernels import mhc as K
from sglang_dsv4.kernels import mhc_gemm as G
from sglang_dsv4.ref import mhc as R

DTYPES = [torch.float32, torch.bfloat16]


def boundary(n: int, d: int, dtype, head: bool, device, gen):
    """Streams, site weights (bf16 norm weight with bf16 streams) and the previous block's
    ``(y, post, comb)`` of one block boundary."""
    x = streams(n, d, dtype, device, gen)
    w = site(d, head, device, gen)
    w = (*w[:3], w[3].to(dtype))
    y = torch.randn(n, d, device=device, generator=gen).to(dtype)
    return x, w, (y, *ref_maps(n, device, gen))


def post_in_order(y, x, post, comb) -> torch.Tensor:
    """``ref.mhc.hc_post`` as the kernels round it: maps in the streams' dtype, ``sum_j comb[j, k]
    x_j`` in fp32 for j = 0, 1, ... (each product rounded: exact for bf16 streams), bf16:
    ``round(round(post_k * y) + round(sum))``."""
    dt = x.dtype
    c, xf = comb.to(dt).float(), x.float()
    mixed = c[:, 0, :, None] * xf[:, :1]  # [T, k, d]
    for j in range(1, x.shape[1]):
        mixed = mixed + c[:, j, :, None] * xf[:, j : j + 1]
    lifted = post.to(dt).float()[:, :, None] * y.float()[:, None, :]
    if dt == torch.bfloat16:
        return (lifted.to(dt).float() + mixed.to(dt).float()).to(dt)
    return lifted + mixed


def forced(monkeypatch, form_max: int, x, w, prev, programs: int):
    """``hc_fused`` with ``FMA_MAX_TOKENS = form_max`` (0: the GEMM form, huge: the one-token
    form at any token count), outputs NaN-poisoned."""
    tickets = torch.zeros(K.MAX_TILES, dtype=torch.int32, device=x.device)
    with monkeypatch.context() as mp, poisoned_allocations():
        mp.setattr(K, "FMA_MAX_TOKENS", form_max)
        got = K.hc_fused(
            x, *w, tickets, eps=EPS, hc_eps=EPS, iters=ITERS, programs=programs, post_of=prev
        )
    assert not tickets.any(), "tickets must be left zero for the next launch"
    return got


def close_forms(tiled, one_token, dtype):
    """The forms' h / maps differ only by the mix's fp32 summation order."""
    for g, e in zip(tiled[2:], one_token[2:], strict=True):
        assert (g is None) == (e is None)
        assert g is None or max_abs(g, e) <= 1e-5
    if dtype == torch.float32:
        assert max_abs(tiled[1], one_token[1]) <= 1e-5
    else:  # a normed value may round to the neighbouring bf16
        assert rel_l2(tiled[1], one_token[1]) <= 4e-3


# 300 tokens (five 64-token tiles) take 1.5-2.7 min a case interpreted: fp32 only there
STREAM_CASES = [
    pytest.param(*shape, head, dtype, id=f"{shape[0]}-{shape[1]}-{shape[2]}-{hid}-{did}")
    for shape in ((1, 128, 4), (7, 256, 3), (300, 128, 20))
    for head, hid in ((False, "sinkhorn"), (True, "head"))
    for dtype, did in zip(DTYPES, ("fp32", "bf16"), strict=True)
    if shape[0] < 256 or dtype == torch.float32
]


@pytest.mark.parametrize(("n", "d", "programs", "head", "dtype"), STREAM_CASES)
def test_post_mix_streams_equal_one_token_form(monkeypatch, n, d, programs, head, dtype):
    gen = torch.Generator().manual_seed(n + d)
    x, w, prev = boundary(n, d, dtype, head, "cpu", gen)
    tiled = forced(monkeypatch, 0, x, w, prev, programs)
    assert torch.equal(tiled[0], post_in_order(*prev[:1], x, *prev[1:]))
    one_token = forced(monkeypatch, 1 << 30, x, w, prev, programs)
    assert torch.equal(tiled[0], one_token[0])
    with poisoned_allocations():
        alone = G.hc_post(*prev[:1], x, *prev[1:])
    assert torch.equal(alone, one_token[0])
    close_forms(tiled, one_token, dtype)
    exp = want(x, w, head, prev)
    if dtype == torch.float32:
        check(tiled, exp, 1e-5)
    else:
        assert rel_l2(tiled[0], exp[0]) <= 4e-3


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("fused", [False, True], ids=["mix", "post+mix"])
@pytest.mark.parametrize(("n", "d", "nm", "programs"), [(7, 256, 24, 8), (300, 128, 4, 9)])
def test_mix_partials_interpreted(n, d, nm, programs, fused, dtype):
    """Summed over the splits: ``streams @ fn^T`` (columns < nm), the sum of squares (column
    nm), zeros (the padding columns, written: poisoned otherwise)."""
    gen = torch.Generator().manual_seed(n * nm)
    x, w, prev = boundary(n, d, dtype, nm == 4, "cpu", gen)
    with poisoned_allocations():
        got, part, n_split, nmp = G.mix_partials(x, w[0], programs, prev if fused else None)
    assert got is not x if fused else got is x
    mix = part.view(n_split, n, nmp).sum(0)
    flat = got.double().flatten(1)
    scale = flat.abs().max().item() * w[0].abs().max().item() * flat.shape[1]
    assert max_abs(mix[:, :nm], flat @ w[0].double().T) <= 1e-6 * scale
    ss = (flat * flat).sum(1)
    assert max_abs(mix[:, nm], ss) <= 1e-6 * ss.max().item()
    assert not mix[:, nm + 1 :].any()


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("n", [1, 6, 300])
def test_hc_post_interpreted(n, dtype):
    gen = torch.Generator().manual_seed(n)
    x, _, (y, post, comb) = boundary(n, 384, dtype, False, "cpu", gen)  # 3 / 6 splits
    with poisoned_allocations():
        got = G.hc_post(y, x, post, comb)
    exp = R.hc_post(y, x, post, comb)
    assert got.dtype == dtype
    if dtype == torch.float32:
        assert max_abs(got, exp) <= 1e-5
    else:  # within bf16 rounding of the bf16 reference
        assert rel_l2(got, exp) <= 4e-3


def test_hc_post_bad_shapes_raise():
    x, y = torch.zeros(2, 4, 192), torch.zeros(2, 192)
    maps = (torch.zeros(2, 4), torch.zeros(2, 4, 4))
    with pytest.raises(ValueError, match="multiple of 128"):
        G.hc_post(y, x, *maps)
    x = torch.zeros(2, 256, 4).transpose(1, 2)
    with pytest.raises(ValueError, match="contiguous"):
        G.hc_post(torch.zeros(2, 256), x, *maps)


# ---- GPU ---------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("head", [False, True], ids=["sinkhorn", "head"])
@pytest.mark.parametrize("n", [300, 8192])
def test_gpu_prefill_shapes(monkeypatch, n, head, dtype):
    """Flash hidden size, 300 / 8192 tokens: the twin's tolerances of
    ``test_mhc.test_gpu_hc_fused``; bf16 streams as ``post_in_order`` rounds them, ``hc_post``
    alone equal to the fused pass; within the twin's tolerances of the one-token form."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    gen = torch.Generator(device="cuda").manual_seed(n)
    x, w, prev = boundary(n, 4096, dtype, head, "cuda", gen)
    programs = 2 * torch.cuda.get_device_properties(0).multi_processor_count
    got = forced(monkeypatch, K.FMA_MAX_TOKENS, x, w, prev, programs)  # n > 8: the GEMM form
    exp = want(x, w, head, prev)
    check_device(got, exp, dtype)
    if dtype == torch.bfloat16:
        assert torch.equal(got[0], post_in_order(*prev[:1], x, *prev[1:]))
    assert torch.equal(G.hc_post(*prev[:1], x, *prev[1:]), got[0])
    one_token = forced(monkeypatch, 1 << 30, x, w, prev, programs)
    assert rel_l2(got[0], one_token[0]) <= (1e-6 if dtype == torch.float32 else 1e-3)
    # only close on the device (module docstring): the twin's GPU tolerances, not the
    # interpreted 1e-5 (H100, 2026-12-07: h differed by 1.6e-5 at T = 300 in fp32, |h| ~ 4)
    check_device(got, one_token, dtype)
