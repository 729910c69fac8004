import pytest
import torch
from conftest import EDGE_LENGTHS

from sglang_dsv4.ref.moe import (
    moe,
    route_hash,
    route_scores,
    route_topk,
    route_weights,
    swiglu,
)

HASH, SCORED = 0, 1  # tiny-6l: layer 0 hash-routed, layer 1 score-routed


def stacked(tiny_weights, layer, n_experts):
    return tuple(
        torch.stack(
            [tiny_weights[f"layers.{layer}.ffn.experts.{e}.{k}.weight"] for e in range(n_experts)]
        )
        for k in ("w1", "w2", "w3")
    )


def test_routing_matches_hf(hf_model, tiny_cfg, tiny_weights):
    x = torch.randn(129, tiny_cfg.hidden_size)
    ids = torch.randint(0, tiny_cfg.vocab_size, (129,))
    for layer in (HASH, SCORED):
        gate = hf_model.model.layers[layer].mlp.gate
        p = f"layers.{layer}.ffn.gate."
        with torch.no_grad():
            _, w_hf, idx_hf = gate(x[None], ids) if layer == HASH else gate(x[None])
        scores = route_scores(x, tiny_weights[p + "weight"], "sqrtsoftplus")
        if layer == HASH:
            idx = route_hash(ids, tiny_weights[p + "tid2eid"])
        else:
            idx = route_topk(scores, tiny_weights[p + "bias"], tiny_cfg.n_experts_per_tok)
        order, order_hf = idx.argsort(-1), idx_hf.argsort(-1)
        assert torch.equal(idx.gather(1, order), idx_hf.gather(1, order_hf))
        w = route_weights(scores, idx, tiny_cfg.routed_scaling_factor)
        torch.testing.assert_close(w.gather(1, order), w_hf.gather(1, order_hf), atol=1e-6, rtol=0)
        torch.testing.assert_close(w.sum(-1), torch.full((129,), 1.5), atol=1e-5, rtol=0)


def test_bias_only_selects():
    scores = torch.tensor([[0.1, 0.2, 0.3]])
    idx = route_topk(scores, torch.tensor([10.0, 0.0, 0.0]), 1)
    assert idx.item() == 0
    torch.testing.assert_close(route_weights(scores, idx, 2.5), torch.tensor([[2.5]]))


@pytest.mark.parametrize("scale", [1.0, 60.0])  # 60: pre-activations far past swiglu_limit = 10
def test_shared_expert_with_clamp_matches_hf(hf_model, tiny_cfg, tiny_weights, scale):
    mlp = hf_model.model.layers[1].mlp.shared_experts
    x = torch.randn(33, tiny_cfg.hidden_size) * scale
    with torch.no_grad():
        want = mlp(x)
    p = "layers.1.ffn.shared_experts."
    got = swiglu(
        x, *(tiny_weights[p + f"{k}.weight"] for k in ("w1", "w2", "w3")), tiny_cfg.swiglu_limit
    )
    torch.testing.assert_close(got, want, atol=1e-5 * scale, rtol=1e-5)
    if scale > 1:
        assert (x @ mlp.gate_proj.weight.T).abs().max() > 10


@pytest.mark.parametrize("n", EDGE_LENGTHS)
@pytest.mark.parametrize("layer", [HASH, SCORED])
def test_moe_block_matches_hf(hf_model, tiny_cfg, tiny_weights, n, layer):
    block = hf_model.model.layers[layer].mlp
    x = torch.randn(n, tiny_cfg.hidden_size) * 8
    ids = torch.randint(0, tiny_cfg.vocab_size, (n,))
    with torch.no_grad():
        want = block(x[None], input_ids=ids[None])[0]
    p = f"layers.{layer}.ffn."
    scores = route_scores(x, tiny_weights[p + "gate.weight"])
    if layer == HASH:
        idx = route_hash(ids, tiny_weights[p + "gate.tid2eid"])
    else:
        idx = route_topk(scores, tiny_weights[p + "gate.bias"], tiny_cfg.n_experts_per_tok)
    w = route_weights(scores, idx, tiny_cfg.routed_scaling_factor)
    shared = tuple(tiny_weights[p + f"shared_experts.{k}.weight"] for k in ("w1", "w2", "w3"))
    experts = stacked(tiny_weights, layer, tiny_cfg.n_routed_experts)
    got = moe(x, idx, w, *experts, shared, 10.0)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # the graph-safe form (every expert on every token, weight 0 where not chosen)
    dense = moe(x, idx, w, *experts, shared, 10.0, dense=True)
    torch.testing.assert_close(dense, want, atol=1e-5, rtol=1e-5)
