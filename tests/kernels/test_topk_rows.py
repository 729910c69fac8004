"""``kernels.topk_rows``' select (the row in registers, bisection on the order keys) through
``IndexerExtend(select=...)``: exactly the radix select's picks in the same order (the oracle of
``tests/topk_cases.py``: ids in entry order, ties by entry, -0.0 below +0.0, NaNs ordered by
their bits, -1 past ``min(k, visible)``, rows through the block table, counts), bit for bit
against the radix kernel over the same workspace.

CPU: interpreted, small rows (several write steps of 256-1024 entries, ties across
them, every bit searched when the k-th key is tied). GPU: every ``topk_shapes.candidates``
shape at the served extend's last 8192-query chunk of 4K-64K prompts (top-512, real widths),
Gaussian, tied and NaN scores, against the default select bit for bit.
"""

import pytest
import torch
from topk_cases import extend_select
from triton_cpu import interpreted

from sglang_dsv4.kernels import indexer, indexer_extend, topk_rows
from sglang_dsv4.kernels.topk_shapes import MAX_ROW, SelectShape, candidates

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
RADIX = SelectShape("radix", 8, 256)
ROWS = [SelectShape("rows", w, 128 * w) for w in (2, 4, 8)]
# visible counts: none, below / at / above k (8), across write steps of 256-1024 entries
VISIBLE = [0, 1, 3, 7, 8, 9, 40, 333, 1000]
# 2.0 rare, 1.0 common: the k-th score tied, larger ones after the ties in entry order
_RARE_ABOVE_TIES = [2.0] + [1.0] * 8 + [0.0] * 7


@pytest.fixture
def ie():
    """``kernels.indexer_extend`` over interpreted kernels (its helpers' modules first)."""
    with interpreted(indexer, topk_rows, indexer_extend) as mods:
        yield mods[-1]


def _scores(n_q, ld, values=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    if values is None:
        return torch.randn(n_q, ld, generator=gen)
    return torch.tensor(values)[torch.randint(len(values), (n_q, ld), generator=gen)]


def _both(ie, scores, visible, topk, shapes):
    """Each shape's select checked against the oracle, and every output equal to the radix
    kernel's bit for bit."""
    base, _ = extend_select(ie, RADIX, scores, visible, topk)
    for shape in shapes:
        out, planned = extend_select(ie, shape, scores, visible, topk)
        assert planned == shape
        for a, b in zip(base, out, strict=True):
            assert torch.equal(a, b)


@pytest.mark.parametrize("shape", ROWS)
def test_rows_select_random(ie, shape):
    _both(ie, _scores(len(VISIBLE), 1008), VISIBLE, 8, [shape])


@pytest.mark.parametrize("values", [[0.0, 1.0, -1.0, 2.5], [0.0, -0.0], [3.0], _RARE_ABOVE_TIES])
def test_rows_select_ties_by_entry_order(ie, values):
    """Few distinct values: the k-th key tied across write steps; [3.0]: no candidate ever has
    exactly k keys at or above it (all 32 bits searched)."""
    _both(ie, _scores(5, 1000, values), [5, 64, 65, 700, 1000], 64, [ROWS[0], ROWS[2]])


def test_rows_select_nan_and_signed_zeros(ie):
    """NaNs order by their bits (positive above every number; all-ones below every number, at
    the order key the search also gives non-entries), -0.0 below +0.0."""
    scores = _scores(4, 300)
    scores[0, [7, 290]] = float("nan")
    scores.view(torch.int32)[1, :] = -1  # all-ones NaNs (order key INT_MIN) around 3 numbers:
    scores[1, [4, 11, 15]] = torch.tensor([-1.0, 0.5, -3.0])
    scores[2, ::3] = 0.0
    scores[2, 1::3] = -0.0
    (ids, _, _), _ = extend_select(ie, ROWS[1], scores, [300, 20, 299, 300], 8)
    assert {7, 290} <= set(ids[0].tolist())
    assert ids[1].tolist() == [0, 1, 2, 3, 4, 5, 11, 15]  # the numbers and the first 5 NaNs
    _both(ie, scores, [300, 20, 299, 300], 8, ROWS)


def test_rows_select_top512_rows(ie):
    """k 512 (the Flash top-k) over rows of 600-2000 entries: several pad chunks, many picks."""
    visible = [512, 513, 600, 1999, 2000, 1]
    _both(ie, _scores(len(visible), 2000, seed=3), visible, 512, [ROWS[1]])


def test_rows_shape_needs_rows_that_fit():
    ix = indexer_extend.IndexerExtend(16, 16, select=SelectShape("rows", 8))
    with pytest.raises(ValueError, match="cannot take rows"):
        ix.plan([4], [(MAX_ROW + 16) * 4], "cpu")
    ix.plan([4], [MAX_ROW * 4], "cpu")
    assert ix._select == ix._select_rows


# ------------------------------------------------------------------ GPU, served shapes


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("ctx", "kind"),
    [(c, "gauss") for c in (4096, 8192, 16384, 32768, 65536)]
    + [(c, k) for c in (8192, 65536) for k in ("ties", "nan")],
)
def test_gpu_candidates_equal_default(ctx, kind):
    """The last 8192-query chunk of a ``ctx`` prompt (4096 queries at 4K): each query sees its
    causal entries of ``ctx // 4``; every candidate's outputs are the default select's."""
    n = min(ctx, 8192)
    ld = ctx // 4
    visible = [(p + 1) // 4 for p in range(ctx - n, ctx)]
    gen = torch.Generator(device="cuda").manual_seed(ctx)
    scores = torch.randn(n, ld, device="cuda", generator=gen)
    if kind == "ties":
        scores = scores.mul(4).round().div(4)  # ~30 distinct values: the k-th key tied
    elif kind == "nan":
        scores.view(-1)[::997] = float("nan")
        scores.view(torch.int32).view(-1)[5::1009] = -1  # all-ones NaN: order key INT_MIN
        scores.view(-1)[7::13] = -0.0
    shapes = candidates(ld)
    base, _ = extend_select(indexer_extend, shapes[0], scores, visible, 512)
    for shape in shapes[1:]:
        out, _ = extend_select(indexer_extend, shape, scores, visible, 512)
        for a, b in zip(base, out, strict=True):
            assert torch.equal(a, b), shape
