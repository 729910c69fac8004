import pytest
import torch
from conftest import EDGE_LENGTHS
from transformers.models.deepseek_v4.modeling_deepseek_v4 import (
    DeepseekV4RotaryEmbedding,
    apply_rotary_pos_emb,
)

from sglang_dsv4.ref.rope import apply_rope, rope_cos_sin, rope_inv_freq


@pytest.fixture(scope="module")
def hf_rotary(hf_model):
    return DeepseekV4RotaryEmbedding(hf_model.config)


@pytest.mark.parametrize(("kind", "layer"), [("main", 0), ("compress", 2), ("compress", 3)])
@pytest.mark.parametrize("n", EDGE_LENGTHS)
def test_rope_matches_hf(hf_rotary, tiny_cfg, kind, layer, n):
    spec = tiny_cfg.layers[layer]
    assert (spec.rope.yarn is None) == (kind == "main")
    positions = torch.randint(0, 1 << 20, (n,))
    x = torch.randn(1, 4, n, 128)  # HF layout [B, H, S, D]
    cos_hf, sin_hf = hf_rotary(x, positions[None], layer_type=kind)
    want = apply_rotary_pos_emb(x, cos_hf, sin_hf)
    cos, sin = rope_cos_sin(positions, rope_inv_freq(spec.rope, tiny_cfg.rope_dim))
    got = apply_rope(x[0].transpose(0, 1), cos, sin).transpose(0, 1)[None]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    # inverse rotation at the query position (HF: sin -> -sin)
    want_inv = apply_rotary_pos_emb(x, cos_hf, -sin_hf)
    got_inv = apply_rope(x[0].transpose(0, 1), cos, sin, inverse=True).transpose(0, 1)[None]
    torch.testing.assert_close(got_inv, want_inv, atol=1e-5, rtol=0)


def test_rope_touches_only_trailing_dims_and_inverts(tiny_cfg):
    spec = tiny_cfg.layers[2]
    inv_freq = rope_inv_freq(spec.rope, 64)
    x = torch.randn(9, 3, 512)
    cos, sin = rope_cos_sin(torch.arange(9) * 1000, inv_freq)
    y = apply_rope(x, cos, sin)
    assert torch.equal(y[..., :448], x[..., :448])
    assert not torch.allclose(y[..., 448:], x[..., 448:])
    torch.testing.assert_close(apply_rope(y, cos, sin, inverse=True), x, atol=1e-5, rtol=0)


def test_rope_scores_depend_on_relative_position_only(tiny_cfg):
    inv_freq = rope_inv_freq(tiny_cfg.layers[3].rope, 64)
    q, k = torch.randn(1, 64), torch.randn(1, 64)

    def score(tq, tk):
        cq, sq = rope_cos_sin(torch.tensor([tq]), inv_freq)
        ck, sk = rope_cos_sin(torch.tensor([tk]), inv_freq)
        return (apply_rope(q, cq, sq) * apply_rope(k, ck, sk)).sum()

    torch.testing.assert_close(score(130, 2), score(1128, 1000), atol=1e-4, rtol=0)


def test_yarn_changes_only_low_frequencies(tiny_cfg):
    plain = rope_inv_freq(type(tiny_cfg.layers[2].rope)(160000.0, None), 64)
    yarn = rope_inv_freq(tiny_cfg.layers[2].rope, 64)
    assert torch.equal(plain[:4], yarn[:4])  # fast dims extrapolate
    torch.testing.assert_close(yarn[-1], plain[-1] / 16)  # slowest dim fully interpolated
