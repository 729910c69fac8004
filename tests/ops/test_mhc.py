"""``ops.mhc``: ``HcTriton`` (interpreted on CPU) equals the twin ``HcTorch`` through the
interface the model uses, over a chain of block boundaries (pre, post_pre x 3, post_head) that
shares one ticket buffer, and for the unfused ``post`` / ``head``."""

import pytest
import torch

from sglang_dsv4.ops.mhc import HcTorch, HcTriton, HcWeights


def weights(cfg, head: bool, gen) -> HcWeights:
    hc, d = cfg.hc_mult, cfg.hidden_size
    m = hc if head else cfg.hc_mix_dim
    return HcWeights(
        torch.randn(m, hc * d, generator=gen) * (hc * d) ** -0.5 * 3,
        torch.randn(m, generator=gen) * 0.5,
        torch.rand(1 if head else 3, generator=gen) + 0.5,
        torch.rand(d, generator=gen) + 0.5,
    )


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-5) -> bool:
    return a.shape == b.shape and (a - b).abs().max().item() <= tol * max(1.0, b.abs().max())


@pytest.mark.parametrize("n", [1, 19])
def test_chain_of_boundaries_equals_the_twin(tiny_cfg, n):
    gen = torch.Generator().manual_seed(n)
    twin, ours = HcTorch(tiny_cfg), HcTriton(tiny_cfg, "cpu")
    x = torch.randn(n, tiny_cfg.hc_mult, tiny_cfg.hidden_size, generator=gen)
    sites = [weights(tiny_cfg, False, gen) for _ in range(4)]
    state = {}
    for name, ops in (("twin", twin), ("ours", ours)):
        h, post, comb = ops.pre(x, sites[0])
        xs, outs = x, [h]
        for w in sites[1:]:
            y = torch.tanh(h) * 2  # a stand-in block: same outputs for both paths' inputs
            xs, h, post, comb = ops.post_pre(y, xs, post, comb, w)
            outs += [xs, h, post, comb]
        outs.append(ops.post_head(h, xs, post, comb, weights(tiny_cfg, True, gen.manual_seed(9))))
        state[name] = outs
    for i, (a, b) in enumerate(zip(state["ours"], state["twin"], strict=True)):
        assert close(a, b, 1e-4), f"output {i}: {(a - b).abs().max():.2e}"
    assert not ours.tickets.any()


def test_post_and_head_alone(tiny_cfg):
    gen = torch.Generator().manual_seed(5)
    twin, ours = HcTorch(tiny_cfg), HcTriton(tiny_cfg, "cpu")
    x = torch.randn(3, tiny_cfg.hc_mult, tiny_cfg.hidden_size, generator=gen)
    y = torch.randn(3, tiny_cfg.hidden_size, generator=gen)
    _, post, comb = twin.pre(x, weights(tiny_cfg, False, gen))
    assert close(ours.post(y, x, post, comb), twin.post(y, x, post, comb))
    head = weights(tiny_cfg, True, gen)
    assert close(ours.head(x, head), twin.head(x, head))
