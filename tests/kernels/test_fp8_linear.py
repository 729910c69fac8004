"""``kernels.fp8_linear.fp8_block_linear`` against ``ref.weight_quant.fp8_block_linear``.

Fresh random weights are quantized to the released layout (e4m3, 128x128 UE8M0 scales) and the
output is poisoned with NaN before each run (the kernel writes into a fresh ``empty``; the NaN
check below catches unwritten tiles). Without a GPU the kernel runs under ``TRITON_INTERPRET=1``
at small shapes (fp32, tight); on the GPU at DSV4 Flash shapes in bf16 (relative L2 1e-2: bf16
activations and output against the fp32 reference).
"""

import importlib

import pytest
import torch

from sglang_dsv4.ref.weight_quant import fp8_block_linear, fp8_block_quant

K = importlib.import_module("sglang_dsv4.kernels.fp8_linear")  # CPU: interpreted (conftest)


def rel_l2(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm().clamp(min=1e-30)).item()


def check(m, n, k, dtype, device, tol):
    w = torch.randn(n, k, device=device) * torch.logspace(-2, 1, n, device=device)[:, None]
    q, s = fp8_block_quant(w)
    x = torch.randn(m, k, device=device, dtype=dtype)
    y = K.fp8_block_linear(x, q, s)
    ref = fp8_block_linear(x, q, s)
    assert y.shape == (m, n) and y.dtype == dtype and not y.isnan().any()
    err = rel_l2(y, ref)
    assert err <= tol, f"[{m}, {k}] x [{n}, {k}]: rel L2 {err:.2e}"
    return err


@pytest.mark.parametrize(
    ("m", "n", "k"),
    # partial tiles everywhere; N tiles of 32 / 64 / 128 rows, M tiles of 16 to 64
    [
        (1, 128, 128),
        (5, 200, 300),
        (17, 64, 256),
        (33, 384, 130),
        (2, 512, 256),
        (1, 1024, 128),
        (65, 100, 128),
    ],
)
def test_matches_reference_interpreted(m, n, k):
    if torch.cuda.is_available():
        pytest.skip("interpreter shapes; the GPU test covers real shapes")
    check(m, n, k, torch.float32, "cpu", 1e-5)


def test_rejects_mismatched_scales():
    q, s = fp8_block_quant(torch.randn(256, 256))
    with pytest.raises(ValueError, match="does not tile"):
        K.fp8_block_linear(torch.randn(2, 256), q, s[:1])


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 7, 64, 515])
@pytest.mark.parametrize(
    ("n", "k"),
    [(1024, 4096), (32768, 1024), (512, 4096), (4096, 8192), (2048, 4096), (4096, 2048)],
    ids=["wq_a", "wq_b", "wkv", "wo_b", "shared_w1", "shared_w2"],
)
def test_matches_reference_gpu_flash_shapes(m, n, k):
    torch.manual_seed(m * 7 + n)
    check(m, n, k, torch.bfloat16, "cuda", 1e-2)


@pytest.mark.gpu
def test_fp32_activations_gpu():
    check(9, 1000, 700, torch.float32, "cuda", 1e-5)


@pytest.mark.gpu
def test_graph_replay_equals_eager_gpu():
    """Captured in a CUDA graph at a decode shape (Flash ``wq_b``, M = 4) and replayed on new
    activations: equals eager (no host tensor, no value-dependent branch in the launcher)."""
    q, s = fp8_block_quant(torch.randn(32768, 1024, device="cuda") * 0.02)
    x = torch.randn(4, 1024, device="cuda", dtype=torch.bfloat16)
    K.fp8_block_linear(x, q, s)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = K.fp8_block_linear(x, q, s)
    for _ in range(2):
        x.copy_(torch.randn_like(x))
        graph.replay()
        assert torch.equal(static, K.fp8_block_linear(x, q, s))
