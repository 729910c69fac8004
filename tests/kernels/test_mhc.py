"""``kernels.mhc`` against ``ref.mhc`` (+ ``ref.norm``): hc_pre / hc_head and the fused
boundary (previous block's hc_post + next block's hc_pre + RMSNorm) in one launch (decode) or
two. The GEMM form's first launch and ``hc_post`` alone: ``test_mhc_gemm.py``.

CPU: interpreted (tests/conftest.py), fp32, small shapes, both forms (one-token tiles up to
``FMA_MAX_TOKENS``, the GEMM form above) and every split count (1 program per tile up to one
split per step), outputs and workspaces NaN-poisoned. GPU: Flash / Pro
hidden sizes at decode and prefill token counts, fp32 (tight) and bf16 (against the bf16
reference, within bf16 rounding), and CUDA-graph replays (the tickets are reset in-kernel).
"""

import pytest
import torch
from mhc_cases import EPS, ITERS, check, check_device, ref_maps, site, streams, want
from poison import poisoned_allocations

from sglang_dsv4.kernels import mhc as K


def run(x, w, tickets, programs: int, prev=None):
    with poisoned_allocations():
        return K.hc_fused(
            x, *w, tickets, eps=EPS, hc_eps=EPS, iters=ITERS, programs=programs, post_of=prev
        )


# one-token form (one launch) up to K.FMA_MAX_TOKENS = 8: splits per token 1, 20, 1 (8 steps
# each), 4; then the GEMM form ([post +] split-K GEMM in one pass, maps per token): 16-token
# tiles (32-channel steps) with 3 splits of d (7, 7, 6 steps), 8 splits of one step, 1 split
# of 20 steps; 64-token tiles (from 256 tokens, 16-channel steps) with 4 splits of 2 steps
# (300 tokens interpreted take ~2.5 min a case: the 64-token tiles with post+pre only here; the
# pre form's 64-token tiles run in test_gpu_hc_fused at 1000 tokens)
SHAPES = [(1, 256, 1), (1, 640, 64), (5, 256, 3), (8, 128, 40), (9, 640, 3), (33, 256, 100),
          (17, 640, 1), (300, 128, 20)]  # fmt: skip
FUSED_CASES = [
    pytest.param(*shape, head, fused, id=f"{shape[0]}-{shape[1]}-{shape[2]}-{hid}-{fid}")
    for fused, fid in ((False, "pre"), (True, "post+pre"))
    for head, hid in ((False, "sinkhorn"), (True, "head"))
    for shape in SHAPES
    if fused or shape[0] < 256
]


@pytest.mark.parametrize(("n", "d", "programs", "head", "fused"), FUSED_CASES)
def test_hc_fused_interpreted(n, d, programs, head, fused):
    gen = torch.Generator().manual_seed(n * 7 + programs)
    x = streams(n, d, torch.float32, "cpu", gen)
    w = site(d, head, "cpu", gen)
    prev = (torch.randn(n, d, generator=gen), *ref_maps(n, "cpu", gen)) if fused else None
    tickets = torch.zeros(K.MAX_TILES, dtype=torch.int32)
    got = run(x, w, tickets, programs, prev)
    check(got, want(x, w, head, prev), 1e-5)
    assert not tickets.any(), "tickets must be left zero for the next launch"
    again = run(x, w, tickets, programs, prev)  # the same tickets again: same bits
    for a, b in zip(got, again, strict=True):
        assert a is None or torch.equal(a, b)


def test_bad_shapes_raise():
    tickets = torch.zeros(K.MAX_TILES, dtype=torch.int32)
    w = site(256, False, "cpu", None)
    with pytest.raises(ValueError, match="contiguous"):
        K.hc_fused(torch.zeros(2, 256, 4).transpose(1, 2), *w, tickets, eps=EPS, hc_eps=EPS,
                   iters=ITERS, programs=4)  # fmt: skip
    with pytest.raises(ValueError, match="multiple of 128"):
        K.hc_fused(torch.zeros(2, 4, 200), *w, tickets, eps=EPS, hc_eps=EPS, iters=ITERS,
                   programs=4)  # fmt: skip
    with pytest.raises(ValueError, match="fn must be contiguous fp32"):
        K.hc_fused(torch.zeros(2, 4, 256), w[0][:7], *w[1:], tickets, eps=EPS, hc_eps=EPS,
                   iters=ITERS, programs=4)  # fmt: skip


# ---- GPU ---------------------------------------------------------------------------------


@pytest.fixture
def no_tf32(monkeypatch):
    """The fp32 reference's matmuls in full fp32 (a library may have switched TF32 on)."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)


@pytest.mark.gpu
@pytest.mark.usefixtures("no_tf32")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("d", [4096, 7168])
@pytest.mark.parametrize("n", [1, 3, 8, 9, 32, 129, 1000])
@pytest.mark.parametrize("fused", [False, True], ids=["pre", "post+pre"])
@pytest.mark.parametrize("head", [False, True], ids=["sinkhorn", "head"])
def test_gpu_hc_fused(n, d, dtype, fused, head):
    """``mhc_cases.check_device``'s tolerances against the twin."""
    gen = torch.Generator(device="cuda").manual_seed(n + d)
    x = streams(n, d, dtype, "cuda", gen)
    w = site(d, head, "cuda", gen)
    if dtype == torch.bfloat16:
        w = (*w[:3], w[3].to(dtype))
    prev = None
    if fused:
        prev = (
            torch.randn(n, d, device="cuda", generator=gen).to(dtype),
            *ref_maps(n, "cuda", gen),
        )
    tickets = torch.zeros(K.MAX_TILES, dtype=torch.int32, device="cuda")
    programs = 2 * torch.cuda.get_device_properties(0).multi_processor_count
    got = run(x, w, tickets, programs, prev)
    exp = want(x, w, head, prev)
    check_device(got, exp, dtype)
    assert not tickets.any()


@pytest.mark.gpu
@pytest.mark.parametrize("n", [1, 3, 32])
def test_gpu_graph_replay_equals_eager(n):
    d = 4096
    gen = torch.Generator(device="cuda").manual_seed(n)
    x = streams(n, d, torch.bfloat16, "cuda", gen)
    y = torch.randn(n, d, device="cuda", generator=gen).to(torch.bfloat16)
    post, comb = ref_maps(n, "cuda", gen)
    w = site(d, False, "cuda", gen)
    tickets = torch.zeros(K.MAX_TILES, dtype=torch.int32, device="cuda")

    def step():
        return K.hc_fused(x, *w, tickets, eps=EPS, hc_eps=EPS, iters=ITERS, programs=264,
                          post_of=(y, post, comb))  # fmt: skip

    step()  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = step()
    for _ in range(3):
        x.copy_(streams(n, d, torch.bfloat16, "cuda", gen))
        y.copy_(torch.randn(n, d, device="cuda", generator=gen))
        graph.replay()
        for a, b in zip(static, step(), strict=True):
            assert torch.equal(a, b)
