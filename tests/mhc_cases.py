"""mHC test cases shared by ``tests/kernels/test_mhc.py`` and ``tests/kernels/test_mhc_gemm.py``:
random sites and streams with mixes of O(1), valid previous-block maps, the reference boundary
and the error measures."""

import torch

from sglang_dsv4.ref import mhc as R
from sglang_dsv4.ref.norm import rms_norm

__all__ = ["EPS", "HC", "ITERS", "check", "check_device", "max_abs", "ref_maps", "rel_l2", "site",
           "streams", "want"]  # fmt: skip

HC, ITERS, EPS = 4, 20, 1e-6


def site(d: int, head: bool, device, gen) -> tuple[torch.Tensor, ...]:
    """Random (fn, base, scale, norm weight) of one mHC site with mixes of O(1)."""
    nm = HC if head else (2 + HC) * HC
    fn = torch.randn(nm, HC * d, device=device, generator=gen) * (HC * d) ** -0.5 * 3
    base = torch.randn(nm, device=device, generator=gen) * 0.5
    scale = torch.rand(1 if head else 3, device=device, generator=gen) + 0.5
    norm = torch.rand(d, device=device, generator=gen) + 0.5
    return fn, base, scale, norm


def streams(n: int, d: int, dtype, device, gen) -> torch.Tensor:
    x = torch.randn(n, HC, d, device=device, generator=gen) * 2
    return x.to(dtype)


def ref_maps(n: int, device, gen) -> tuple[torch.Tensor, torch.Tensor]:
    """Valid previous-block maps (post in (0, 2), comb nearly doubly stochastic)."""
    post = 2 * torch.rand(n, HC, device=device, generator=gen)
    comb = R.sinkhorn(torch.rand(n, HC, HC, device=device, generator=gen) + 0.1, ITERS, EPS)
    return post, comb


def want(x, w, head: bool, prev=None):
    """The reference: [hc_post], then hc_pre / hc_head, then rms_norm."""
    fn, base, scale, norm = w
    if prev is not None:
        x = R.hc_post(*prev[:1], x, *prev[1:])
    if head:
        return x, rms_norm(R.hc_head(x, fn, base, scale, EPS, EPS), norm, EPS), None, None
    u, post, comb = R.hc_pre(x, fn, base, scale, ITERS, EPS, EPS)
    return x, rms_norm(u, norm, EPS), post, comb


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    assert not a.isnan().any(), "unwritten (poisoned) output"
    return (a.float() - b.float()).abs().max().item()


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def check(got, exp, tol: float):
    """(streams, h, post, comb) against the reference's: max error relative to max(1, |exp|)."""
    for name, g, e in zip(("streams", "h", "post", "comb"), got, exp, strict=True):
        if e is None:
            assert g is None, name
            continue
        assert g.shape == e.shape and g.dtype == e.dtype, name
        err = max_abs(g, e) / max(1.0, e.float().abs().max().item())
        assert err <= tol, f"{name}: {err:.2e}"


def check_device(got, exp, dtype):
    """The GPU tolerances. fp32: tight. bf16: streams / h within a bf16 ulp or two of the bf16
    reference (only the fp32 summation order differs), maps fp32 from the same bf16 inputs."""
    if dtype == torch.float32:
        check(got, exp, 1e-4)
        return
    for g, e in zip(got[:2], exp[:2], strict=True):
        assert rel_l2(g, e) <= 4e-3, rel_l2(g, e)
    for g, e in zip(got[2:], exp[2:], strict=True):
        assert e is None or max_abs(g, e) <= 2e-3
