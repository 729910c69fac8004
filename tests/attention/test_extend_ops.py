"""``attention.extend_ops`` helpers of the GPU path not covered through the wrappers
(tests/attention/test_wrappers.py runs every op against its twin)."""

import pytest
import torch

from sglang_dsv4.attention.extend_ops import _HADAMARD, _rotated
from sglang_dsv4.ref.quant import hadamard


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rotated_queries_are_the_matmul_by_the_sign_hadamard(dtype):
    """The indexer queries' rotation (one bmm with H broadcast over tokens) is ``q @ H`` bit for
    bit, on rows strided as the fused GEMM's split leaves them; scores against keys stored as
    ``hadamard(k)`` then equal ``q . k`` up to the returned weight factor n^-1/2."""
    gen = torch.Generator().manual_seed(0)
    t, heads, n = 5, 4, 128
    fused = torch.randn(t, heads * n + 64, generator=gen).to(dtype)
    q = fused[:, : heads * n].view(t, heads, n)  # row stride heads * n + 64
    got, factor = _rotated(q)
    h = _HADAMARD[(n, dtype, q.device)]
    assert torch.equal(got, q @ h)
    k = torch.randn(n, generator=gen)
    want = q.float() @ k
    assert torch.allclose((got.float() @ hadamard(k)) * factor, want, rtol=2e-2, atol=2e-2)
