import pytest
import torch
from conftest import EDGE_LENGTHS
from transformers.models.deepseek_v4.modeling_deepseek_v4 import (
    DeepseekV4RMSNorm,
    DeepseekV4UnweightedRMSNorm,
)

from sglang_dsv4.ref.norm import rms_norm


@pytest.mark.parametrize("n", EDGE_LENGTHS)
def test_weighted_rms_norm_matches_hf(n):
    hf = DeepseekV4RMSNorm(512, eps=1e-6)
    with torch.no_grad():
        hf.weight.copy_(1 + 0.1 * torch.randn(512))
    x = torch.randn(n, 512) * 3
    torch.testing.assert_close(rms_norm(x, hf.weight, 1e-6), hf(x), atol=1e-6, rtol=0)


@pytest.mark.parametrize("n", EDGE_LENGTHS)
def test_unweighted_rms_norm_matches_hf_and_formula(n):
    x = torch.randn(n, 4, 128)
    y = rms_norm(x, None, 1e-6)
    torch.testing.assert_close(y, DeepseekV4UnweightedRMSNorm(1e-6)(x), atol=1e-6, rtol=0)
    # independent formula: unit RMS per row
    torch.testing.assert_close(y.square().mean(-1), torch.ones(n, 4), atol=1e-4, rtol=0)
