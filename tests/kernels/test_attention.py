"""``kernels.attention.SparseMQA`` against ``ref.attention.sparse_attention``.

FP8 caches are checked against the FP8-simulating reference: ``sparse_attention`` over
``unpack_fp8_rows`` of the very bytes the kernel reads, in fp32 (so the only differences are the
kernel's bf16 operands and output). Without a GPU the kernels run under ``TRITON_INTERPRET=1``,
which triton reads when it decorates a function, its own library included: it is set below before
triton is first imported; if another test module imported triton earlier in this process, the CPU
tests run in a fresh interpreter process instead (``test_cpu_in_fresh_process``). The interpreter
gets fp32 dot operands, so CPU checks are tighter than GPU ones.

Tolerances (relative L2 of the output): CPU 5e-3 (bf16 output rounding); GPU 1e-2 for every
dequant mode and the bf16 cache (bf16 probabilities and keys in the MMAs), under the 2e-2 budget
for FP8 kernels against the FP8-simulating reference.
"""

import importlib
import os
import subprocess
import sys

import pytest
import torch

CPU = not torch.cuda.is_available()
# The interpreter works in this process only if triton's own jit functions were made under it.
IN_PROCESS = not CPU or "triton" not in sys.modules or os.environ.get("TRITON_INTERPRET") == "1"
if CPU:
    os.environ["TRITON_INTERPRET"] = "1"

from sglang_dsv4.ref.attention import window_indices  # noqa: E402
from sglang_dsv4.ref.kv_layout import pack_fp8_rows  # noqa: E402


def _kernels():
    kernels = importlib.import_module("sglang_dsv4.kernels.attention_kernels")
    mod = importlib.import_module("sglang_dsv4.kernels.attention")
    if CPU and IN_PROCESS:
        from triton.runtime.interpreter import InterpretedFunction

        if not isinstance(kernels.sparse_mqa_fwd, InterpretedFunction):
            importlib.reload(kernels)  # imported earlier (before triton was) without the flag
            mod = importlib.reload(mod)
    return mod


K = _kernels()


@pytest.fixture(autouse=True)
def _interpreter_in_this_process(request):
    if not IN_PROCESS and request.node.name != "test_cpu_in_fresh_process":
        pytest.skip("triton was imported without TRITON_INTERPRET: test_cpu_in_fresh_process")


from sparse_mqa_cases import (  # noqa: E402
    CSA_CASES,
    DEV,
    cut_lists,
    dsv4_case,
    fp8_cache,
    graph_replay_matches_eager,
    reference,
    rel_l2,
    run_checked,
)

TOL = 1e-2 if DEV == "cuda" else 5e-3


def random_lists(t: int, k: int, n: int, holes: float = 0.2) -> torch.Tensor:
    idx = torch.randint(0, n, (t, k), dtype=torch.int32, device=DEV)
    return torch.where(torch.rand(t, k, device=DEV) < holes, -1, idx).to(torch.int32)


# --- CPU (interpreter) and GPU: small shapes -------------------------------------------------


@pytest.mark.parametrize(
    ("d", "h", "t", "dequant", "page"),
    [
        (128, 4, 1, 0, None),
        (128, 4, 3, 1, 7),
        (128, 4, 129, 0, None),
        (512, 16, 3, 0, 64),
        (512, 16, 1, 1, None),
    ],
)
def test_fp8_single_list(d, h, t, dequant, page):
    cache, rows = fp8_cache(150, d, page)
    q = torch.randn(t, h, d, device=DEV, dtype=torch.bfloat16)
    k = 40 if t < 100 else 16  # the interpreter runs programs one by one
    idx = random_lists(t, k, 150)
    idx[-1] = -1  # a query with no key: the sink-only softmax gives zeros
    sink = torch.randn(h, device=DEV)
    attn = K.SparseMQA(h, d, device=DEV, config=K.TileConfig(block_n=16, dequant=dequant))
    attn.plan(t, k, num_splits=1)
    out = run_checked(attn, q, cache, idx, sink, d**-0.5)
    assert rel_l2(out, reference(q, rows, idx, sink, d**-0.5)) < TOL
    assert out[-1].abs().max() == 0


@pytest.mark.parametrize(("splits", "prefetch"), [(1, 0), (4, 0), (1, 2), (4, 1)])
def test_fp8_extra_cache_lengths_and_lse(splits, prefetch):
    d, h, t = 128, 4, 5
    cache, rows = fp8_cache(90, d, page=16)
    xcache, xrows = fp8_cache(70, d, page=3)
    q = torch.randn(t, h, d, device=DEV, dtype=torch.bfloat16)
    idx, xidx = random_lists(t, 20, 90), random_lists(t, 36, 70)
    lengths = torch.tensor([20, 7, 0, 13, 20], dtype=torch.int32, device=DEV)
    xlengths = torch.tensor([36, 0, 0, 17, 2], dtype=torch.int32, device=DEV)
    sink = torch.randn(h, device=DEV)
    attn = K.SparseMQA(h, d, device=DEV, config=K.TileConfig(block_n=16, prefetch=prefetch))
    attn.plan(t, 20, 36, num_splits=splits, return_lse=True)
    assert attn.num_splits == splits
    kw = dict(extra_kv=xcache, extra_indices=xidx, lengths=lengths, extra_lengths=xlengths)
    attn.lse.fill_(float("nan"))
    out = run_checked(attn, q, cache, idx, sink, 0.3, **kw)
    ref = reference(q, rows, idx, sink, 0.3, xrows, xidx, lengths, xlengths)
    assert rel_l2(out, ref) < TOL
    assert out[2].abs().max() == 0  # both lists cut to nothing
    # LSE of the logits without the sink.
    xcut = cut_lists(xidx, xlengths)
    all_idx = torch.cat([cut_lists(idx, lengths), torch.where(xcut >= 0, xcut + 90, -1)], 1)
    keys = torch.cat([rows, xrows])[all_idx.clamp(min=0).long()]  # [T, K, D]
    logits = torch.einsum("thd,tkd->thk", q.float(), keys) * 0.3
    logits = logits.masked_fill((all_idx < 0)[:, None, :], float("-inf"))
    ref_lse = torch.logsumexp(logits, -1)
    assert torch.equal(attn.lse[2], ref_lse[2])  # -inf for the empty row
    live = torch.tensor([0, 1, 3, 4])
    assert torch.allclose(attn.lse[live], ref_lse[live], atol=1e-4, rtol=1e-4)


def test_bf16_cache_paged():
    d, h, t = 64, 4, 3
    kv = torch.randn(12, 8, d, device=DEV).to(torch.bfloat16)  # 12 pages of 8 rows
    q = torch.randn(t, h, d, device=DEV, dtype=torch.bfloat16)
    idx = random_lists(t, 30, 96)
    sink = torch.randn(h, device=DEV)
    attn = K.SparseMQA(h, d, kv_fp8=False, device=DEV, config=K.TileConfig(block_n=16))
    attn.plan(t, 30, num_splits=2)
    out = run_checked(attn, q, kv, idx, sink, d**-0.5)
    assert rel_l2(out, reference(q, kv.view(-1, d), idx, sink, d**-0.5)) < TOL


@pytest.mark.parametrize("kind", ["swa", "c4", "c128"])
def test_extend_visibility(kind):
    """Prefill (extend) over a cached prefix: every new query carries its own causal lists, built
    the way the wrappers build them (window rows + visible / top-k entries)."""
    d, h, window, ratio = 128, 4, 16, {"swa": 1, "c4": 4, "c128": 32}[kind]
    prefix, new = 150, 9
    positions = torch.arange(prefix, prefix + new, device=DEV)
    cache, rows = fp8_cache(prefix + new, d, page=32)  # raw rows of the sequence
    idx = window_indices(positions, window).to(torch.int32)
    kw, xrows, xidx = {}, None, None
    if kind != "swa":
        n_entries = (prefix + new) // ratio
        xcache, xrows = fp8_cache(n_entries, d, page=None)
        visible = (positions + 1) // ratio  # entry i is visible iff i < (t+1)//ratio
        ids = torch.arange(n_entries, device=DEV).expand(new, -1)
        xidx = torch.where(ids < visible[:, None], ids, -1)
        if kind == "c4":  # a top-k pick among the visible entries, -1 where fewer exist
            score = torch.rand(new, n_entries, device=DEV).masked_fill(xidx < 0, -1.0)
            top = score.topk(24, dim=1)
            xidx = torch.where(top.values >= 0, top.indices, -1)
        xidx = xidx.to(torch.int32)
        kw = dict(extra_kv=xcache, extra_indices=xidx)
    q = torch.randn(new, h, d, device=DEV, dtype=torch.bfloat16)
    sink = torch.randn(h, device=DEV)
    attn = K.SparseMQA(h, d, device=DEV, config=K.TileConfig(block_n=16))
    attn.plan(new, window, 0 if xidx is None else xidx.shape[1])
    out = run_checked(attn, q, cache, idx, sink, d**-0.5, **kw)
    assert rel_l2(out, reference(q, rows, idx, sink, d**-0.5, xrows, xidx)) < TOL


def test_fp8_rows_to_pages_layout():
    rows = pack_fp8_rows(torch.randn(10, 512))
    pages = K.fp8_rows_to_pages(rows, 4)  # [3, 4, 1, 584] over 3 padded pages
    buf = pages.view(3, -1)
    assert pages.stride(0) == K.fp8_page_bytes(4) == 2880  # 4 * 584 = 2336 padded to 5 * 576
    assert torch.equal(buf[1, 2 * 576 : 3 * 576], rows[6, :576])  # row 6 = page 1, slot 2
    assert torch.equal(buf[1, 4 * 576 + 2 * 8 : 4 * 576 + 3 * 8], rows[6, 576:])


# --- GPU: DSV4 shapes ------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize(("h", "topk", "t", "context"), CSA_CASES)
@pytest.mark.parametrize(
    ("dequant", "prefetch", "block_n"),
    [(0, 0, 64), (1, 0, 64), (2, 0, 32), (3, 0, 64), (3, 1, 32), (3, 2, 32)],
)
def test_gpu_csa_decode(h, topk, t, context, dequant, prefetch, block_n):
    q, (swa, swa_rows, idx), (xc, xrows, xidx, _), sink = dsv4_case(t, h, context, topk)
    cfg = K.TileConfig(block_n=block_n, dequant=dequant, prefetch=prefetch)
    attn = K.SparseMQA(h, 512, config=cfg)
    attn.plan(t, 128, topk)
    out = run_checked(attn, q, swa, idx, sink, 512**-0.5, extra_kv=xc, extra_indices=xidx)
    assert rel_l2(out, reference(q, swa_rows, idx, sink, 512**-0.5, xrows, xidx)) < TOL


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("h", "t", "context", "lengths"),
    [
        (64, 1, 1 << 20, False),
        (64, 3, 131072, True),
        (128, 129, 4097, False),
        (128, 1, 1 << 20, True),
    ],
)
def test_gpu_hca_decode(h, t, context, lengths):
    q, (swa, swa_rows, idx), (xc, xrows, xidx, xlen), sink = dsv4_case(t, h, context, None, lengths)
    attn = K.SparseMQA(h, 512)
    attn.plan(t, 128, xidx.shape[1], return_lse=True)
    kw = dict(extra_kv=xc, extra_indices=xidx, extra_lengths=xlen)
    out = run_checked(attn, q, swa, idx, sink, 512**-0.5, **kw)
    ref = reference(q, swa_rows, idx, sink, 512**-0.5, xrows, xidx, None, xlen)
    assert rel_l2(out, ref) < TOL
    assert attn.lse.isfinite().all()


@pytest.mark.gpu
def test_gpu_bf16_cache():
    t, h = 129, 64
    kv = torch.randn(4096, 512, device=DEV).to(torch.bfloat16)
    q = torch.randn(t, h, 512, device=DEV, dtype=torch.bfloat16)
    idx = random_lists(t, 640, 4096)
    sink = torch.randn(h, device=DEV)
    attn = K.SparseMQA(h, 512, kv_fp8=False)
    attn.plan(t, 640)
    out = run_checked(attn, q, kv, idx, sink, 512**-0.5)
    assert rel_l2(out, reference(q, kv, idx, sink, 512**-0.5)) < TOL


@pytest.mark.gpu
@pytest.mark.parametrize("t", [1, 32])
def test_gpu_cuda_graph_replay(t):
    """run() captured once, replayed on new values written into the same tensors."""
    graph_replay_matches_eager(K.SparseMQA(64, 512), t, replays=2)


@pytest.mark.skipif(IN_PROCESS, reason="the CPU tests ran in this process")
def test_cpu_in_fresh_process():
    env = dict(os.environ, TRITON_INTERPRET="1")
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert " passed" in run.stdout
