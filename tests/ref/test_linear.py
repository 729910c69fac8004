"""``ref.linear.linear``: the one weight product of the reference math. Dense tensors keep the
plain ``x @ w.T``; any other weight object is called, and ``RefDSV4`` reaches every linear
weight through it."""

import pytest
import torch

from sglang_dsv4.config import AttnKind
from sglang_dsv4.ref.linear import linear
from sglang_dsv4.ref.model import RefDSV4


class Counting:
    """A stand-in quantized linear: the dense product, counting calls."""

    def __init__(self, w: torch.Tensor):
        self.w, self.calls = w, 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return x @ self.w.T


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dense_weight_is_the_plain_product(dtype):
    x = torch.randn(2, 5, 48, dtype=dtype)
    w = torch.randn(33, 48, dtype=dtype)
    assert torch.equal(linear(x, w), x @ w.T)


def test_weight_object_is_called():
    seen = []
    out = torch.randn(3, 7)
    assert linear(torch.ones(3, 4), lambda x: seen.append(x) or out) is out
    assert len(seen) == 1 and torch.equal(seen[0], torch.ones(3, 4))


LINEARS = (
    "attn.wq_a",
    "attn.wq_b",
    "attn.wkv",
    "attn.wo_b",
    "attn.indexer.wq_b",
    "attn.indexer.weights_proj",
    "ffn.shared_experts.w1",
    "ffn.shared_experts.w2",
    "ffn.shared_experts.w3",
)


def test_reference_model_routes_every_linear_through_the_seam(tiny_cfg, tiny_weights):
    """Every linear weight replaced by a callable: the same logits bit for bit, and every
    callable used (a product that bypassed the seam would fail on the object)."""
    ids = torch.randint(2, 1024, (24,), generator=torch.Generator().manual_seed(5))
    want = RefDSV4(tiny_cfg, tiny_weights)(ids)
    wrapped = {}
    for name, t in tiny_weights.items():
        routed = ".ffn.experts." in name and name.endswith(".weight")
        if name == "head.weight" or routed or name.removesuffix(".weight").endswith(LINEARS):
            wrapped[name] = Counting(t)
    per_layer = [
        len(LINEARS) - 2 * (s.attn is not AttnKind.CSA) + 3 * tiny_cfg.n_routed_experts
        for s in tiny_cfg.layers
    ]
    assert len(wrapped) == 1 + sum(per_layer)  # + head
    got = RefDSV4(tiny_cfg, tiny_weights | wrapped)(ids)
    assert torch.equal(got, want)
    unused = [n for n, c in wrapped.items() if c.calls == 0 and ".ffn.experts." not in n]
    assert not unused
    # routed experts: those the tokens chose ran (at least k per MoE layer)
    assert sum(c.calls > 0 for n, c in wrapped.items() if ".ffn.experts." in n) >= 3 * 6
