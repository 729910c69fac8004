import pytest
import torch
from conftest import EDGE_LENGTHS

from sglang_dsv4.ref.mhc import hc_head, hc_post, hc_pre, sinkhorn


@pytest.mark.parametrize("n", EDGE_LENGTHS)
@pytest.mark.parametrize("site", ["attn_hc", "ffn_hc"])
def test_hc_pre_matches_hf(hf_model, tiny_cfg, n, site):
    hc = getattr(hf_model.model.layers[1], site)
    x = torch.randn(n, 4, tiny_cfg.hidden_size)
    with torch.no_grad():
        post_hf, comb_hf, collapsed_hf = hc(x[None])
    collapsed, post, comb = hc_pre(
        x, hc.fn, hc.base, hc.scale, 20, tiny_cfg.hc_eps, tiny_cfg.norm_eps
    )
    torch.testing.assert_close(collapsed, collapsed_hf[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(post, post_hf[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(comb, comb_hf[0], atol=1e-6, rtol=0)
    # HF decoder layer's expand step
    y = torch.randn(n, tiny_cfg.hidden_size)
    want = post_hf.unsqueeze(-1) * y[None].unsqueeze(-2) + comb_hf.transpose(-1, -2) @ x[None]
    torch.testing.assert_close(hc_post(y, x, post, comb), want[0], atol=1e-5, rtol=0)


def test_hc_post_sums_over_first_index():
    x, y = torch.randn(3, 4, 8), torch.randn(3, 8)
    post = torch.rand(3, 4)
    comb = torch.rand(3, 4, 4)
    assert not torch.allclose(comb, comb.transpose(-1, -2))
    out = hc_post(y, x, post, comb)
    for k in range(4):
        want = post[:, k, None] * y + sum(comb[:, j, k, None] * x[:, j] for j in range(4))
        torch.testing.assert_close(out[:, k], want, atol=1e-6, rtol=0)


def test_sinkhorn_is_nearly_doubly_stochastic():
    comb = sinkhorn(torch.softmax(torch.randn(50, 4, 4), -1) + 1e-6, 20, 1e-6)
    torch.testing.assert_close(comb.sum(-2), torch.ones(50, 4), atol=1e-5, rtol=0)
    torch.testing.assert_close(comb.sum(-1), torch.ones(50, 4), atol=1e-3, rtol=0)
    assert not torch.allclose(comb, comb.transpose(-1, -2), atol=1e-3)


@pytest.mark.parametrize("n", EDGE_LENGTHS)
def test_hc_head_matches_hf(hf_model, tiny_cfg, n):
    head = hf_model.model.hc_head
    x = torch.randn(n, 4, tiny_cfg.hidden_size)
    with torch.no_grad():
        want = head(x[None])[0]
    got = hc_head(x, head.hc_fn, head.hc_base, head.hc_scale, tiny_cfg.hc_eps, tiny_cfg.norm_eps)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
