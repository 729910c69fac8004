"""``kernels.indexer.IndexerTopK`` against ``ref.indexer`` on the dequantized keys.

Keys are written by ``IndexKeyLayout.write`` (pure torch) into a paged cache addressed through a
shuffled block table; queries are bf16 (the kernel's input dtype), so the reference sees the
same values (FP8 keys: the kernel rounds them to e4m3 per head, as the extend indexer does, and
the reference through ``ref.indexer.fp8_queries``). Checked per query:

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
from topk_cases import exact_topk
from triton_cpu import interpreted

from sglang_dsv4.kernels import indexer, kv_store
from sglang_dsv4.ref.indexer import fp8_queries, index_scores, index_topk
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


def _scored_query(q: torch.Tensor, rotate: bool, fp8: bool) -> torch.Tensor:
    """The query the kernel scores, fp32. ``rotate``: ``q S`` (+-1 Sylvester matrix), rounded to
    bf16 on the GPU (the tensor-core dot's input; the interpreter's fp32 dots keep it fp32: its
    fp32 -> bf16 cast truncates), times ``Dh^-1/2`` (= ``hadamard(q)`` before the rounding).
    ``fp8`` (FP8 keys): ``q S`` / ``q`` rounded to e4m3 per head first (``fp8_queries``)."""
    dh = q.shape[-1]
    norm = 1.0
    if rotate:
        sylv = (hadamard(torch.eye(dh, device=q.device)) * dh**0.5).round()
        q = (q.float() @ sylv).to(torch.bfloat16 if q.is_cuda else torch.float32)
        norm = dh**-0.5
    return (fp8_queries(q) if fp8 else q).float() * norm


def _check(ix, layout, cache, bt, q, w, qreq, pos, topk, stride=1, rtol=1e-5):
    ids, rows, lengths = ix.run(q, w, cache, bt, qreq, pos)
    q_ref = _scored_query(q, ix.rotate, ix.q_fp8)
    assert ix.q_fp8 == (layout.fmt == "fp8")
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
    splits=None,
    inputs=None,
):
    """``inputs``: a previous case's (layout, cache, bt, q, w, qreq, pos), run again."""
    if inputs is None:
        layout, cache, bt = _setup(ks, fmt, seq_lens, device, zero_frac=zeros)
        qreq, pos = _queries(seq_lens, per_req, device)
        q = torch.randn(qreq.numel(), heads, 128, device=device).bfloat16()
        w = torch.randn(qreq.numel(), heads, device=device)
    else:
        layout, cache, bt, q, w, qreq, pos = inputs
    n_q = qreq.numel()
    ix = ix_mod.IndexerTopK(
        topk, heads, key_layout=layout, max_workspace_bytes=workspace, rotate=rotate,
        topk_splits=splits,
    )  # fmt: skip
    ix.plan(n_q, max(seq_lens) // RATIO, device)
    ix.ids.fill_(-7)
    ix.rows.fill_(-7)
    ix.lengths.fill_(-7)
    ix.logits.fill_(float("nan"))
    ix.hist.fill_(-7)
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


def _select_case(ix_mod, visible, topk, splits, values=None, nan_at=()):
    """Both selects over the same workspace: scores from ``values`` (ties) or random, the
    outputs and the split's histograms poisoned first. Returns (one-program, split) outputs."""
    n_q, ld = len(visible), max(16, max(visible))
    pos = torch.tensor([max(v * RATIO - 1, 0) for v in visible], dtype=torch.int32)
    qreq = torch.arange(n_q, dtype=torch.int32).flip(0)
    bt = (torch.randperm(n_q * 64)[: n_q * 64] + 1).view(n_q, 64).int()
    if values is None:
        scores = torch.randn(n_q, ld)
    else:
        scores = torch.tensor(values)[torch.randint(len(values), (n_q, ld))]
    for t, e in nan_at:
        scores[t, e] = float("nan")
    out = []
    for n in (1, splits):
        ix = ix_mod.IndexerTopK(topk, 16, topk_splits=n)
        ix.plan(n_q, ld, "cpu")
        assert ix.topk_splits == n
        ix.logits.fill_(float("nan"))  # past each query's visible entries: never read
        ix.logits[:, :ld].copy_(scores)
        for buf in (ix.ids, ix.rows, ix.lengths, ix.hist):
            buf.random_(-(2**20), 2**20)
        ix._select_topk(bt, qreq, pos, 0, n_q)
        out.append((ix.ids.clone(), ix.rows.clone(), ix.lengths.clone()))
    for t, v in enumerate(visible):
        k = min(topk, v)
        want = exact_topk(scores[t], v, k)
        for ids, rows, lengths in out:
            assert int(lengths[t]) == k
            assert ids[t, :k].tolist() == want and (ids[t, k:] == -1).all()
            sel = torch.tensor(want, dtype=torch.long)
            want_rows = bt[int(qreq[t]), sel // EPB].long() * EPB + sel % EPB
            assert rows[t, :k].long().tolist() == want_rows.tolist()
            assert (rows[t, k:] == -1).all()
    return out


@pytest.mark.parametrize("splits", [2, 3, 5])
def test_split_select_matches_one_program(mods, splits):
    """The split top-k picks what the one-program select picks, in the same order: visible
    counts below / at / above k, 0 and 1 visible, fewer visible entries than ranges."""
    _, ix = mods
    (one, split) = _select_case(ix, [0, 1, 3, 7, 8, 9, 40, 333, 1100], 8, splits)
    for a, b in zip(one, split, strict=True):
        assert torch.equal(a, b)


# 2.0 rare, 1.0 common: the ties at the k-th score (1.0) run out in the first range, larger
# scores (2.0) follow in every range, at offsets past those ties
_RARE_ABOVE_TIES = [2.0] + [1.0] * 8 + [0.0] * 7


@pytest.mark.parametrize("values", [[0.0, 1.0, -1.0, 2.5], [0.0, -0.0], [3.0], _RARE_ABOVE_TIES])
def test_split_select_ties_by_entry_order(mods, values):
    """Few distinct values: the k-th score is tied across ranges; the first tied entries in
    entry order are taken (-0.0 orders below +0.0 in both selects)."""
    _, ix = mods
    (one, split) = _select_case(ix, [5, 64, 65, 700], 64, 4, values=values)
    for a, b in zip(one, split, strict=True):
        assert torch.equal(a, b)


def test_select_takes_every_visible_entry_without_passes(mods):
    """Rows with at most k visible entries (``k == visible``: no radix pass runs) pick every
    visible entry in entry order, the NaN-poisoned scores past them unread; rows with more
    visible entries than k run the passes, over the same workspace."""
    _, ix = mods
    n_q, ld, topk = 4, 300, 8
    scores = torch.rand(n_q, ld) * 2 - 1
    scores[:, 3] = -0.0  # order keys: -0.0 below +0.0, both picks when visible
    scores[:, 4] = float("nan")  # ordered above every number
    obj = ix.IndexerTopK(topk, 16)
    visible = [8, 5, 1, 300]
    pos = torch.tensor([v * RATIO - 1 for v in visible], dtype=torch.int32)
    qreq = torch.zeros(n_q, dtype=torch.int32)
    bt = (torch.randperm(64) + 1).view(1, 64).int()
    obj.plan(n_q, ld, "cpu")
    obj.logits.fill_(float("nan"))
    obj.logits[:, :ld].copy_(scores)
    for t, v in enumerate(visible):
        obj.logits[t, v:] = float("nan")  # past the visible entries: must not be picked
    obj.ids.fill_(-7)
    obj.rows.fill_(-7)
    obj._select(bt, qreq, pos, 0, n_q)
    for t, v in enumerate(visible):
        want = list(range(v)) if v <= topk else exact_topk(scores[t], v, topk)
        assert obj.ids[t, : len(want)].tolist() == want
        assert (obj.ids[t, len(want) :] == -1).all() and int(obj.lengths[t]) == len(want)
        sel = torch.tensor(want, dtype=torch.long)
        assert (
            obj.rows[t, : len(want)].long().tolist()
            == (bt[0, sel // EPB].long() * EPB + sel % EPB).tolist()
        )


def test_split_select_nan_scores(mods):
    """NaN scores (a poisoned key) order above every number in both selects alike."""
    _, ix = mods
    (one, split) = _select_case(ix, [300, 40], 16, 3, nan_at=((0, 7), (0, 290), (1, 0)))
    for a, b in zip(one, split, strict=True):
        assert torch.equal(a, b)
    assert {7, 290} <= set(one[0][0].tolist()) and 0 in one[0][1].tolist()


def test_split_select_in_query_chunks(mods):
    """Queries in several workspace chunks: the split select's table rows follow the chunk."""
    ks, ix = mods
    ix_obj, _ = _run_case(ks, ix, "fp8", 16, 8, [70, 41], None, "cpu", workspace=4 * 32 * 40,
                          splits=2)  # fmt: skip
    assert ix_obj.q_chunk < 111 and ix_obj.topk_splits == 2


def test_split_count_by_shape(mods):
    """plan() picks the split select for few queries over many entries, the one-program select
    when the queries fill the SMs or the entries are few; run() uses what plan() picked."""
    _, ix = mods
    assert ix._split_count(1, 8192, 132) == 16
    assert ix._split_count(1, 2048, 132) == 4
    assert ix._split_count(32, 8192, 132) == 4
    assert ix._split_count(128, 32768, 132) == 1
    assert ix._split_count(1, 100, 132) == 1
    obj = ix.IndexerTopK(8, 16)
    obj.plan(1, 4096, "cpu")  # the CPU plan assumes 4 SMs
    assert obj.topk_splits == 4 and obj._select_topk == obj._select_split
    assert tuple(obj.hist.shape) == (1, 4, 4, 256)
    obj.plan(7, 4096, "cpu")
    assert obj.topk_splits == 1 and obj._select_topk == obj._select


def test_decode_split_select(mods):
    """The whole run (scores + split select) against the reference, ties at zero included."""
    ks, ix = mods
    ix_obj, _ = _run_case(ks, ix, "fp8", 16, 32, [700, 9, 401], 1, "cpu", zeros=0.6, splits=3)
    assert ix_obj.topk_splits == 3


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
@pytest.mark.parametrize("entries", [8192, 32768])
@pytest.mark.parametrize("batch", [1, 32])
def test_gpu_split_select_equals_one_program(entries, batch):
    """DSV4 shapes (64 heads x 128, top-k 512, FP8 keys, rotated) at 8K / 32K entries (32K /
    128K tokens): the select plan() picks for few queries (ranges per query) returns the ids,
    rows and counts of the one-program select exactly, and both pass the reference check."""
    seq_lens = [entries * RATIO + 3, *torch.randint(1, entries * RATIO, (batch - 1,)).tolist()]
    ix, inputs = _run_case(kv_store, indexer, "fp8", 64, 512, seq_lens, 1, "cuda", rotate=True)
    assert ix.topk_splits > 1  # plan() chose the split select at this shape
    split = [t.clone() for t in (ix.ids, ix.rows, ix.lengths)]
    one, _ = _run_case(kv_store, indexer, "fp8", 64, 512, seq_lens, 1, "cuda", rotate=True,
                       splits=1, inputs=inputs)  # fmt: skip
    assert one.topk_splits == 1
    for a, b in zip(split, (one.ids, one.rows, one.lengths), strict=True):
        assert torch.equal(a, b)


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
        self.q_fp8 = ix.q_fp8  # _check's reference scores quantize the queries as the kernel

    def run(self, *args):
        return self.ix.ids, self.ix.rows, self.ix.lengths
