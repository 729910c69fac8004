"""``kernels.moe_route`` (gate GEMM + scoring + biased top-k / hash + weights) against the
``ref.moe`` twins (``route_scores``, ``route_topk`` / ``route_hash``, ``route_weights``).

Chosen sets are compared as sets (top-k order is free: the experts' sum does not depend on it),
weights matched by expert id. CPU: interpreted, fp32, small and odd shapes, both kernel forms
and split counts, tickets left zero. GPU: Flash / Pro dims (d 4096 / 7168, E 16 / 256 / 384,
k 2 / 6 / 8, T 1 .. 4096) in bf16 against the fp32 twin on the same bf16 inputs; rows whose
k-th and (k+1)-th biased scores are closer than the accumulation-order noise may pick either.
"""

import importlib

import pytest
import torch
from poison import poisoned_allocations

from sglang_dsv4.ref.moe import route_hash, route_scores, route_topk, route_weights

K = importlib.import_module("sglang_dsv4.kernels.moe_route")  # CPU: interpreted (conftest)
GPU = torch.cuda.is_available()


def case(t, d, n_exp, topk, scoring, hashed, dtype, device, seed=0, programs=264):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, d, generator=g).to(device, dtype)
    gate = (torch.randn(n_exp, d, generator=g) * d**-0.5).to(device, dtype)
    bias = (torch.randn(n_exp, generator=g) * 0.1).to(device)
    tid2eid = torch.stack([torch.randperm(n_exp, generator=g)[:topk] for _ in range(50)])
    ids = torch.randint(0, 50, (t,), generator=g).to(device)
    scores = route_scores(x, gate, scoring)
    # poisoned outputs: every element must be written
    out = (
        torch.full((t, topk), -1, dtype=torch.int32, device=device),
        torch.full((t, topk), float("nan"), device=device),
    )
    tickets = torch.zeros(K.MAX_TILES, dtype=torch.int32, device=device)
    run = {"out": out, "tickets": tickets, "programs": programs}
    want = route_hash(ids, tid2eid.to(device)) if hashed else route_topk(scores, bias, topk)
    with poisoned_allocations():  # the partial-logit workspace too
        if hashed:
            tid = tid2eid.to(device)
            chosen, weights = K.moe_route(x, gate, None, tid, ids, topk, 1.5, scoring, **run)
        else:
            chosen, weights = K.moe_route(x, gate, bias, None, None, topk, 1.5, scoring, **run)
    assert chosen is out[0] and not weights.isnan().any() and chosen.min() >= 0
    assert not tickets.any(), "tickets must be left zero for the next launch"
    return chosen, weights, want, route_weights(scores, want, 1.5), scores + bias * (not hashed)


def by_expert(chosen, weights):
    order = chosen.long().argsort(dim=1)
    return chosen.long().gather(1, order), weights.gather(1, order)


@pytest.mark.parametrize("scoring", ["sqrtsoftplus", "sigmoid", "softmax"])
@pytest.mark.parametrize("hashed", [False, True], ids=["scored", "hash"])
@pytest.mark.parametrize(("t", "n_exp", "topk"), [(1, 16, 6), (19, 8, 2), (5, 80, 8)])
def test_route_interpreted(scoring, hashed, t, n_exp, topk):
    if GPU:
        pytest.skip("interpreter shapes; the GPU tests cover real shapes")
    got = case(t, 96, n_exp, topk, scoring, hashed, torch.float32, "cpu")
    chosen, weights, want, want_w, _ = got
    assert chosen.dtype == torch.int32 and weights.dtype == torch.float32
    got_c, got_w = by_expert(chosen, weights)
    ref_c, ref_w = by_expert(want, want_w)
    assert torch.equal(got_c, ref_c)
    assert (got_w - ref_w).abs().max() <= 1e-5


# one-token tiles (FMA form) up to K.FMA_MAX_TOKENS = 8, 16-token tiles (dot form) above; d 384
# is 3 FMA steps / 6 dot steps; E 80 spreads over 3 expert blocks of 32; programs 1 .. many; the
# last case's epilogue sums its 6 splits 2 at a time
@pytest.mark.parametrize(
    ("t", "n_exp", "topk", "programs"),
    [(1, 16, 2, 264), (3, 16, 6, 4), (8, 80, 8, 264), (9, 16, 2, 264), (19, 80, 6, 3),
     (33, 8, 2, 1), (9, 80, 6, 264)],
)  # fmt: skip
def test_route_split_interpreted(t, n_exp, topk, programs):
    if GPU:
        pytest.skip("interpreter shapes; the GPU tests cover real shapes")
    for hashed in (False, True):
        got = case(t, 384, n_exp, topk, "sqrtsoftplus", hashed, torch.float32, "cpu", t, programs)
        chosen, weights, want, want_w, _ = got
        got_c, got_w = by_expert(chosen, weights)
        ref_c, ref_w = by_expert(want, want_w)
        assert torch.equal(got_c, ref_c)
        assert (got_w - ref_w).abs().max() <= 1e-5


def test_route_rejects_mixed_layer_kinds():
    x, gate = torch.randn(2, 32), torch.randn(8, 32)
    with pytest.raises(ValueError, match="either bias"):
        K.moe_route(x, gate, torch.zeros(8), torch.zeros(10, 2, dtype=torch.long), None, 2, 1.0)
    with pytest.raises(ValueError, match="scoring_func"):
        K.moe_route(x, gate, torch.zeros(8), None, None, 2, 1.0, "relu")


def test_nan_row_stays_in_range():
    """A NaN token row picks nothing sensible, but ids stay in [0, E): the expert kernels never
    read outside the bank."""
    if GPU:
        pytest.skip("interpreter shapes")
    x, gate = torch.randn(3, 32), torch.randn(8, 32)
    x[1] = float("nan")
    chosen, _ = K.moe_route(x, gate, torch.zeros(8), None, None, 2, 1.0)
    assert chosen.min() >= 0 and chosen.max() < 8


@pytest.mark.gpu
@pytest.mark.parametrize("hashed", [False, True], ids=["scored", "hash"])
@pytest.mark.parametrize("d", [4096, 7168])
@pytest.mark.parametrize(
    ("t", "n_exp", "topk"),
    [(1, 16, 6), (1, 16, 2), (3, 16, 2), (9, 16, 2), (128, 16, 6), (129, 16, 2), (1, 256, 8),
     (32, 256, 8), (4096, 256, 8), (1, 384, 6), (33, 384, 6)],
)  # fmt: skip
def test_route_gpu_flash_dims(hashed, t, n_exp, topk, d):
    """Flash (d 4096, the test model's E 16 and the real 256) and Pro (d 7168) dims, both
    forms."""
    chosen, weights, want, want_w, biased = case(
        t, d, n_exp, topk, "sqrtsoftplus", hashed, torch.bfloat16, "cuda"
    )
    got_c, got_w = by_expert(chosen, weights)
    ref_c, ref_w = by_expert(want, want_w)
    same = (got_c == ref_c).all(dim=1)
    top = biased.sort(dim=1, descending=True).values
    near_tie = (top[:, topk - 1] - top[:, topk]) < 1e-4
    assert (same | near_tie).all() and same.float().mean() > 0.95
    assert (got_w - ref_w)[same].abs().max() <= 1e-4
