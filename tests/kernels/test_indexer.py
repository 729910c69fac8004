"""``kernels.indexer.IndexerTopK`` against ``ref.indexer`` on the dequantized keys.

Keys are written by ``IndexKeyLayout.write`` (pure torch) into a paged cache addressed through a
shuffled block table; queries are bf16 (the kernel's input dtype), so the reference sees the
same values. Checked per query:

* the scores (the fp32 workspace) against ``index_scores``: within 1e-5 of the row's largest
  |score| (fp32 accumulation order);
* the picks: ``lengths = min(topk, visible)``, ids past it and their rows are -1, ids are
  distinct, visible, and equal to ``index_topk``'s set except for swaps among entries whose
  reference scores lie within 1e-5 (relative, as above) of the k-th best (ties: ReLU zeros, or
  fp32 noise; >= 16 heads make them rare);
* the rows: ``block_table[b, id // 32] * 32 + id % 32``.
"""

import pytest
import torch
from triton_cpu import interpreted

from sglang_dsv4.kernels import indexer, kv_store
from sglang_dsv4.ref.indexer import index_scores, index_topk
from sglang_dsv4.ref.quant import hadamard

BLOCK, RATIO, EPB = 128, 4, 32
# the interpreter turns 1-element arrays into loop bounds
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture
def mods():
    with interpreted(kv_store, indexer) as pair:
        yield pair


def _setup(ks, fmt, seq_lens, device, rows_per_page=32, head_dim=128, zero_frac=0.0):
    """A key cache holding every entry of requests with ``seq_lens`` tokens; block table.
    ``zero_frac`` of the keys are zero (their scores tie at exactly 0)."""
    b = len(seq_lens)
    blocks = max(1, -(-max(seq_lens) // BLOCK))
    pages = (torch.randperm(b * blocks + 2)[: b * blocks] + 1).view(b, blocks)
    bt = pages.int().to(device)
    layout = ks.IndexKeyLayout(fmt, rows_per_page, head_dim)
    cache = layout.empty((b * blocks + 3) * EPB, device).fill_(0xFF)
    rows = (bt.long()[:, :, None] * EPB + torch.arange(EPB, device=device)).flatten()
    keys = torch.randn(rows.numel(), head_dim, device=device)
    keys *= torch.exp2(torch.randint(-3, 3, (rows.numel(), 1), device=device).float())
    keys[torch.rand(rows.numel(), device=device) < zero_frac] = 0.0
    layout.write(cache, rows, keys)
    return layout, cache, bt


def _queries(seq_lens, per_req, device):
    """(query_req, positions): the last ``per_req`` positions of each request (all if None)."""
    qreq, pos = [], []
    for i, s in enumerate(seq_lens):
        n = s if per_req is None else min(per_req, s)
        qreq += [i] * n
        pos += list(range(s - n, s))
    return (torch.tensor(qreq, dtype=torch.int32, device=device),
            torch.tensor(pos, dtype=torch.int32, device=device))  # fmt: skip


def _rotated_query(q: torch.Tensor) -> torch.Tensor:
    """What ``IndexerTopK(rotate=True)`` scores: ``q S`` (+-1 Sylvester matrix) times
    ``Dh^-1/2`` = ``hadamard(q)``, rounded to bf16 on the GPU (the tensor-core dot's input);
    the interpreter's fp32 dots keep it fp32 (its fp32 -> bf16 cast truncates)."""
    dh = q.shape[-1]
    sylv = (hadamard(torch.eye(dh, device=q.device)) * dh**0.5).round()
    kept = torch.bfloat16 if q.is_cuda else torch.float32
    return (q.float() @ sylv).to(kept).float() * dh**-0.5


def _check(ix, layout, cache, bt, q, w, qreq, pos, topk, stride=1, rtol=1e-5):
    ids, rows, lengths = ix.run(q, w, cache, bt, qreq, pos)
    q_ref = _rotated_query(q) if ix.rotate else q.float()
    n_q = q.shape[0]
    for t in [*range(0, n_q - 1, stride), n_q - 1]:
        b, p = int(qreq[t]), int(pos[t])
        n_ent = max(1, (p + 1) // RATIO)
        ent = torch.arange(n_ent, device=q.device)
        keys = layout.read(cache, bt[b, ent // EPB].long() * EPB + ent % EPB)
        ref_scores = index_scores(q_ref[t : t + 1], w[t : t + 1], keys)  # [1, E]
        vis = (p + 1) // RATIO
        tol = rtol * ref_scores[0, :vis].abs().max().item() if vis else 0.0
        if ix.q_chunk >= n_q and vis:
            assert (ix.logits[t, :vis] - ref_scores[0, :vis]).abs().max().item() <= tol
        k = min(topk, vis)
        assert int(lengths[t]) == k
        got = ids[t]
        assert (got[k:] == -1).all() and (rows[t][k:] == -1).all()
        sel = got[:k].long()
        assert sel.unique().numel() == k and ((sel >= 0) & (sel < vis)).all()
        want_rows = bt[b, sel // EPB].long() * EPB + sel % EPB
        assert torch.equal(rows[t][:k].long(), want_rows)
        ref = index_topk(ref_scores, pos[t : t + 1].long(), RATIO, topk)[0]
        ref = set(ref[ref >= 0].tolist())
        diff = ref.symmetric_difference(sel.tolist())
        if diff:
            kth = ref_scores[0, list(ref)].min().item()
            near = [abs(ref_scores[0, i].item() - kth) <= tol for i in diff]
            assert all(near), f"query {t}: picks differ beyond ties at the k-th score"


def _run_case(
    ks,
    ix_mod,
    fmt,
    heads,
    topk,
    seq_lens,
    per_req,
    device,
    workspace=1 << 28,
    stride=1,
    zeros=0.0,
    rotate=False,
):
    layout, cache, bt = _setup(ks, fmt, seq_lens, device, zero_frac=zeros)
    qreq, pos = _queries(seq_lens, per_req, device)
    n_q = qreq.numel()
    q = torch.randn(n_q, heads, 128, device=device).bfloat16()
    w = torch.randn(n_q, heads, device=device)
    ix = ix_mod.IndexerTopK(
        topk, heads, key_layout=layout, max_workspace_bytes=workspace, rotate=rotate
    )
    ix.plan(n_q, max(seq_lens) // RATIO, device)
    ix.ids.fill_(-7)
    ix.rows.fill_(-7)
    ix.lengths.fill_(-7)
    ix.logits.fill_(float("nan"))
    # rotated: on the GPU the reference's q S may round one ulp off the kernel's (fp32 order)
    rtol = 1e-3 if rotate and q.is_cuda else 1e-5
    _check(ix, layout, cache, bt, q, w, qreq, pos, topk, stride, rtol)
    return ix, (layout, cache, bt, q, w, qreq, pos)


# ------------------------------------------------------------------ CPU (TRITON_INTERPRET=1)


@pytest.mark.parametrize("fmt", ["fp8", "fp4"])
def test_decode(mods, fmt):
    """One query per request (the newest position), visible counts around the k of 8."""
    ks, ix = mods
    _run_case(ks, ix, fmt, 16, 8, [1, 3, 4, 35, 36, 300, 129], 1, "cpu")


def test_decode_rotates_queries_in_the_kernel(mods):
    """``rotate``: unrotated queries against keys stored rotated (no rotation GEMM outside)."""
    ks, ix = mods
    _run_case(ks, ix, "fp8", 16, 8, [1, 3, 4, 35, 36, 300, 129], 1, "cpu", rotate=True)


def test_prefill_many_queries(mods):
    """Every position of two requests (causal bound per query), in workspace chunks."""
    ks, ix = mods
    ix_obj, _ = _run_case(ks, ix, "fp8", 16, 8, [70, 41], None, "cpu", workspace=4 * 32 * 40)
    assert ix_obj.q_chunk < 111  # the run really went through several launches


def test_topk_larger_than_a_tile(mods):
    ks, ix = mods
    _run_case(ks, ix, "fp8", 16, 64, [1100, 517], 2, "cpu")


def test_ties_at_zero(mods):
    """60% of the keys are zero: the k-th score sits inside a bucket of exact ties at 0."""
    ks, ix = mods
    _run_case(ks, ix, "fp8", 16, 32, [700, 401, 9], 2, "cpu", zeros=0.6)


def test_plan_required_and_shapes(mods):
    _, ix = mods
    obj = ix.IndexerTopK(8, 16)
    with pytest.raises(RuntimeError):
        obj.run(*([torch.zeros(1)] * 6))
    with pytest.raises(ValueError):
        ix.IndexerTopK(8, 12)


# ------------------------------------------------------------------ GPU, DSV4 shapes


@pytest.mark.gpu
@pytest.mark.parametrize("topk", [512, 1024])
@pytest.mark.parametrize("seq_lens", [[4097], [1, 3, 4097], "129"])
@pytest.mark.parametrize("fmt", ["fp8", "fp4"])
def test_gpu_decode(topk, seq_lens, fmt):
    if seq_lens == "129":
        seq_lens = torch.randint(1, 8000, (129,)).tolist()
    _run_case(kv_store, indexer, fmt, 64, topk, seq_lens, 1, "cuda")


@pytest.mark.gpu
def test_gpu_ties_at_zero():
    _run_case(kv_store, indexer, "fp8", 64, 512, torch.randint(1, 9000, (33,)).tolist(), 1,
              "cuda", zeros=0.6)  # fmt: skip


@pytest.mark.gpu
@pytest.mark.gpu
@pytest.mark.parametrize("seq_lens", [[4097], "129"])
def test_gpu_decode_rotated(seq_lens):
    if seq_lens == "129":
        seq_lens = torch.randint(1, 8000, (129,)).tolist()
    _run_case(kv_store, indexer, "fp8", 64, 512, seq_lens, 1, "cuda", rotate=True)


@pytest.mark.gpu
def test_gpu_long_context_decode():
    """128K tokens (32K entries) at batch 1: the query spread over many programs."""
    _run_case(kv_store, indexer, "fp8", 64, 512, [131073], 1, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("topk", [512, 1024])
def test_gpu_prefill(topk):
    """All 4097 + 3 positions of two requests (every 7th query and the last checked)."""
    _run_case(kv_store, indexer, "fp8", 64, topk, [4097, 3], None, "cuda", 1 << 30, 7)


@pytest.mark.gpu
def test_gpu_cuda_graph_replay():
    """Decode batch 3 captured once; replays follow new queries and positions."""
    seq_lens = [700, 4097, 9]
    ix, (layout, cache, bt, q, w, qreq, pos) = _run_case(
        kv_store, indexer, "fp8", 64, 512, seq_lens, 1, "cuda"
    )
    ix.plan(3, 4200 // RATIO, "cuda")
    ix.run(q, w, cache, bt, qreq, pos)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ix.run(q, w, cache, bt, qreq, pos)
    for step in range(3):
        q.copy_(torch.randn_like(q.float()).bfloat16())
        w.copy_(torch.randn_like(w))
        pos.copy_(torch.tensor([699 - step, 4096 - 7 * step, 8 - step], dtype=torch.int32))
        ix.ids.fill_(-7)
        graph.replay()
        _check(_Replayed(ix, graph), layout, cache, bt, q, w, qreq, pos, 512)


class _Replayed:
    """Presents a replayed graph's outputs through ``run`` (for ``_check``)."""

    def __init__(self, ix, graph):
        self.ix, self.logits, self.q_chunk, self.rotate = ix, ix.logits, ix.q_chunk, ix.rotate

    def run(self, *args):
        return self.ix.ids, self.ix.rows, self.ix.lengths
