"""Sparse MQA test cases shared by the kernel tests (``tests/kernels/test_attention.py``,
``tests/kernels/test_cute_sparse_mqa.py``): fresh random FP8 caches, DSV4-shaped decode cases, the
FP8-simulating reference and the NaN-poisoned launch."""

import torch

from sglang_dsv4.kernels.attention import fp8_rows_to_pages
from sglang_dsv4.ref.attention import sparse_attention
from sglang_dsv4.ref.kv_layout import pack_fp8_rows, unpack_fp8_rows

__all__ = [
    "C4_PAGE",
    "C128_PAGE",
    "CSA_CASES",
    "DEV",
    "SWA_PAGE",
    "cut_lists",
    "dsv4_case",
    "fp8_cache",
    "graph_replay_matches_eager",
    "reference",
    "rel_l2",
    "run_checked",
]  # fmt: skip

DEV = "cuda" if torch.cuda.is_available() else "cpu"
# (heads, c4 top-k, query rows, context): Flash and Pro CSA decode at batches 1, 3, 129
CSA_CASES = [
    (64, 512, 1, 4097),
    (64, 512, 3, 32768),
    (64, 512, 129, 4097),
    (128, 1024, 1, 8192),
    (128, 1024, 3, 4097),
    (128, 1024, 129, 32768),
]


def rel_l2(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm().clamp(min=1e-30)).item()


def fp8_cache(n: int, d: int, page: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Fresh random rows -> (cache the kernel reads, fp32 rows the reference reads)."""
    rows = pack_fp8_rows(torch.randn(n, d, device=DEV))
    deq = unpack_fp8_rows(rows, d)
    cache = rows if page is None else fp8_rows_to_pages(rows, page, d)
    return cache, deq


def reference(q, rows, idx, sink, scale, xrows=None, xidx=None, lengths=None, xlengths=None):
    """One list over the concatenation of both caches, lengths applied as -1."""
    idx = cut_lists(idx, lengths)
    if xrows is not None:
        xidx = cut_lists(xidx, xlengths)
        idx = torch.cat([idx, torch.where(xidx >= 0, xidx + rows.shape[0], -1)], dim=1)
        rows = torch.cat([rows, xrows])
    return sparse_attention(q.float(), rows.float(), idx, sink, scale)


def cut_lists(idx, lengths):
    if lengths is None:
        return idx
    pos = torch.arange(idx.shape[1], device=idx.device)
    return torch.where(pos[None, :] < lengths[:, None], idx, -1)


def run_checked(attn, q, *args, **kw):
    """Launch into a NaN-poisoned output and require every element written."""
    out = torch.full_like(q, float("nan"))
    attn.run(q, *args, out=out, **kw)
    assert not out.isnan().any(), "unwritten output"
    return out


SWA_PAGE, C4_PAGE, C128_PAGE = 256, 64, 2


def dsv4_case(t: int, h: int, context: int, topk: int | None, lengths: bool = False):
    """SWA window rows (main, 256-row pages) + c4 top-k (``topk``) or all visible c128 entries
    (``topk=None``) in FlashMLA pages; per query its own rows."""
    swa, swa_rows = fp8_cache(t * SWA_PAGE, 512, SWA_PAGE)
    idx = torch.arange(t, device=DEV)[:, None] * SWA_PAGE + torch.arange(128, device=DEV)
    idx = idx.to(torch.int32)
    ratio, page = (4, C4_PAGE) if topk else (128, C128_PAGE)
    n_entries = context // ratio
    xcache, xrows = fp8_cache(t * n_entries, 512, page)
    base = torch.arange(t, device=DEV)[:, None] * n_entries
    if topk:
        picks = torch.rand(t, n_entries, device=DEV).topk(min(topk, n_entries), dim=1).indices
        xidx = torch.full((t, topk), -1, dtype=torch.int32, device=DEV)
        xidx[:, : picks.shape[1]] = (picks + base).to(torch.int32)
    else:
        width = -(-n_entries // 64) * 64
        ids = torch.arange(width, device=DEV).expand(t, -1)
        xidx = torch.where(ids < n_entries, ids + base, -1).to(torch.int32)
    xlen = None
    if lengths:
        xlen = torch.randint(0, xidx.shape[1] + 1, (t,), dtype=torch.int32, device=DEV)
        xlen[0] = xidx.shape[1]
    q = torch.randn(t, h, 512, device=DEV, dtype=torch.bfloat16)
    sink = torch.randn(h, device=DEV)
    return q, (swa, swa_rows, idx), (xcache, xrows, xidx, xlen), sink


def graph_replay_matches_eager(attn, t: int, replays: int, check=None) -> None:
    """``attn.run`` (a SparseMQA-like kernel, 64 heads) captured once in a CUDA graph over a CSA
    Flash case, replayed on new values written into the same tensors: equal to eager each time,
    and ``check()`` (optional) true after each replay."""
    q, (swa, _, idx), (xc, _, xidx, _), sink = dsv4_case(t, 64, 32768, 512)
    attn.plan(t, 128, 512)
    kw = dict(extra_kv=xc, extra_indices=xidx)
    attn.run(q, swa, idx, sink, 512**-0.5, **kw)  # compile outside the capture
    out = torch.empty_like(q)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        attn.run(q, swa, idx, sink, 512**-0.5, out=out, **kw)
    for _ in range(replays):
        q.copy_(torch.randn_like(q))
        xidx.copy_(xidx.roll(1, 0))
        rows = pack_fp8_rows(torch.randn(t * SWA_PAGE, 512, device=DEV))
        swa.copy_(fp8_rows_to_pages(rows, SWA_PAGE))
        out.fill_(float("nan"))
        graph.replay()
        eager = attn.run(q, swa, idx, sink, 512**-0.5, **kw)
        torch.cuda.synchronize()
        assert torch.equal(out, eager)
        assert check is None or check()
