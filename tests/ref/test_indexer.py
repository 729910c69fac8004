import pytest
import torch
from conftest import EDGE_LENGTHS

from sglang_dsv4.ref.indexer import fp8_queries, fp8_rotated_queries, index_scores, index_topk
from sglang_dsv4.ref.model import RefDSV4
from sglang_dsv4.ref.quant import hadamard

CSA = 2


def test_scores_match_formula():
    q, w, keys = torch.randn(5, 16, 128), torch.randn(5, 16), torch.randn(9, 128)
    want = torch.zeros(5, 9)
    for t in range(5):
        for s in range(9):
            for h in range(16):
                want[t, s] += w[t, h] / 4 * torch.relu(q[t, h] @ keys[s]) / 128**0.5
    torch.testing.assert_close(index_scores(q, w, keys), want, atol=1e-4, rtol=1e-5)


def test_fp8_queries_are_e4m3_per_head_with_a_power_of_2_scale():
    q = torch.randn(3, 4, 128) * torch.exp2(torch.randint(-6, 6, (3, 4, 1)).float())
    q[0, 0] = 0.0
    got = fp8_queries(q)
    amax = q.abs().amax(-1, keepdim=True)
    scale = torch.exp2(torch.ceil(torch.log2(amax.clamp(min=2.0**-126) / 448)))
    codes = got / scale
    assert (codes.abs() <= 448).all() and torch.equal(got[0, 0], q[0, 0])
    assert torch.equal(codes, codes.to(torch.float8_e4m3fn).float())  # e4m3 values
    assert ((codes.abs().amax(-1) > 224) | (amax[..., 0] == 0)).all()  # the smallest power of 2
    assert ((got - q).abs() <= 16 * scale).all()  # half the largest e4m3 step (2^5 at 256..448)
    assert not torch.equal(got, q)


def test_fp8_rotated_queries_score_like_the_rotated_e4m3_query():
    """Against unrotated keys ``k``, what an e4m3 rotated query scores against ``hadamard(k)``
    (the kernels' keys), with the rotation's n^-1/2 in the weights."""
    q, w, keys = torch.randn(5, 16, 128), torch.randn(5, 16), torch.randn(9, 128)
    sylv = (hadamard(torch.eye(128)) * 128**0.5).round()
    want = index_scores(fp8_queries(q @ sylv), w * 128**-0.5, hadamard(keys))
    got = index_scores(fp8_rotated_queries(q), w, keys)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)
    assert (got - index_scores(q, w, keys)).abs().max() > 1e-3  # the rounding shows


def test_topk_causal_and_masked_picks():
    scores = torch.randn(12, 3)
    positions = torch.arange(12)
    picks = index_topk(scores, positions, ratio=4, topk=2)
    for t in range(12):
        visible = (t + 1) // 4
        valid = picks[t][picks[t] >= 0]
        assert len(valid) == min(2, visible)
        assert torch.all(valid < visible)
        assert set(valid.tolist()) == set(
            scores[t, :visible].topk(min(2, visible)).indices.tolist()
        )


@pytest.mark.parametrize("n", EDGE_LENGTHS)
def test_indexer_matches_hf(hf_model, tiny_cfg, tiny_weights, n):
    ref = RefDSV4(tiny_cfg, tiny_weights)
    x = torch.randn(n, tiny_cfg.hidden_size)
    qr = torch.randn(n, tiny_cfg.q_lora_rank)
    positions = torch.arange(n)
    hf_indexer = hf_model.model.layers[CSA].self_attn.compressor.indexer
    with torch.no_grad():
        want = hf_indexer(x[None], qr[None], positions[None], None, CSA)[0]  # [S, k]
    got = ref.indexer(tiny_cfg.layers[CSA], x, qr, positions)
    assert got.shape == want.shape
    assert torch.equal(got.sort(-1).values, want.sort(-1).values)
    if n == 650:  # 162 entries > top-k 16: selection really happens
        assert (got >= 0).sum(-1).max() == tiny_cfg.index_topk
