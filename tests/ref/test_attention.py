import pytest
import torch
from conftest import EDGE_LENGTHS
from transformers.models.deepseek_v4.modeling_deepseek_v4 import (
    DeepseekV4GroupedLinear,
    eager_attention_forward,
)

from sglang_dsv4.ref.attention import grouped_output_proj, sparse_attention, window_indices


def dense_reference(q, kv, indices, sink, scale):
    """Independent formula: dense attention over key multiplicities (a row listed twice counts
    twice) with the sink as an extra logit."""
    t, h, _ = q.shape
    counts = torch.zeros(t, kv.shape[0])
    for i in range(t):
        for j in indices[i].tolist():
            if j >= 0:
                counts[i, j] += 1
    logits = torch.einsum("thd,nd->thn", q, kv) * scale
    m = torch.maximum(logits.amax(-1), sink.view(1, h))
    e = torch.exp(logits - m[..., None]) * counts[:, None]
    den = e.sum(-1) + torch.exp(sink.view(1, h) - m)
    return torch.einsum("thn,nd->thd", e / den[..., None], kv)


@pytest.mark.parametrize("n", [1, 3, 5, 129])
def test_sparse_attention_matches_dense_formula(n):
    kv = torch.randn(300, 64)
    q = torch.randn(n, 8, 64)
    indices = torch.randint(-1, 300, (n, 40))
    indices[:, 0] = torch.randint(0, 300, (n,))  # at least one key per query
    sink = torch.randn(8)
    got = sparse_attention(q, kv, indices, sink, 64**-0.5)
    torch.testing.assert_close(
        got, dense_reference(q, kv, indices, sink, 64**-0.5), atol=1e-5, rtol=1e-5
    )


def test_sink_only_row_is_zero_and_duplicates_count_twice():
    kv, q, sink = torch.randn(4, 16), torch.randn(2, 2, 16), torch.zeros(2)
    out = sparse_attention(q, kv, torch.tensor([[-1, -1], [1, 1]]), sink, 1.0)
    assert torch.equal(out[0], torch.zeros(2, 16))
    # two copies of the same key: weight 2e^l / (2e^l + 1); entries and window rows never dedupe
    logit = q[1] @ kv[1]
    want = (2 * logit.exp() / (2 * logit.exp() + 1)).unsqueeze(-1) * kv[1]
    torch.testing.assert_close(out[1], want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("n", EDGE_LENGTHS)
def test_window_attention_matches_hf_eager(n):
    """SWA rows via window_indices == HF eager attention with its sliding-window causal mask."""
    heads, d = 4, 128
    q, kv, sink = torch.randn(n, heads, d), torch.randn(n, d), torch.randn(heads)
    pos = torch.arange(n)
    allowed = (pos[None] <= pos[:, None]) & (pos[None] > pos[:, None] - 128)
    mask = torch.zeros(n, n).masked_fill(~allowed, float("-inf"))
    module = type("M", (), {"num_key_value_groups": heads, "sinks": sink, "training": False})()
    want, _ = eager_attention_forward(
        module, q.transpose(0, 1)[None], kv[None, None], kv[None, None], mask[None, None], d**-0.5
    )
    got = sparse_attention(q, kv, window_indices(pos, 128), sink, d**-0.5)
    torch.testing.assert_close(got, want[0], atol=1e-5, rtol=1e-5)


def test_window_indices_edges():
    idx = window_indices(torch.tensor([0, 5, 200]), 128, row_of_pos0=10)
    assert idx.shape == (3, 128)
    assert idx[0, -1] == 10 and (idx[0, :-1] == -1).all()
    assert idx[1, -6:].tolist() == list(range(10, 16)) and (idx[1, :-6] == -1).all()
    assert idx[2].tolist() == list(range(10 + 73, 10 + 201))


@pytest.mark.parametrize(("heads", "groups"), [(4, 2), (64, 8), (16, 16)])
def test_grouped_output_proj_matches_hf(heads, groups):
    d, rank, hidden = 32, 24, 40
    hf = DeepseekV4GroupedLinear(heads * d // groups, groups * rank, groups)
    wo_b = torch.randn(hidden, groups * rank)
    o = torch.randn(7, heads, d)
    with torch.no_grad():
        want = hf(o.reshape(7, groups, -1)).flatten(1) @ wo_b.T
    torch.testing.assert_close(grouped_output_proj(o, hf.weight, wo_b), want, atol=1e-4, rtol=1e-5)


def test_packed_varlen_batch_equals_separate_sequences():
    """Two sequences (lengths 5 and 140) packed into one KV buffer with per-token row offsets
    give the same outputs as each sequence alone."""
    lens, heads, d = [5, 140], 4, 32
    qs = [torch.randn(n, heads, d) for n in lens]
    kvs = [torch.randn(n, d) for n in lens]
    sink = torch.randn(heads)
    alone = [
        sparse_attention(q, kv, window_indices(torch.arange(n), 128), sink, 0.2)
        for q, kv, n in zip(qs, kvs, lens, strict=True)
    ]
    positions = torch.cat([torch.arange(n) for n in lens])
    row0 = torch.cat([torch.full((n,), start) for n, start in zip(lens, [0, lens[0]], strict=True)])
    packed = sparse_attention(
        torch.cat(qs), torch.cat(kvs), window_indices(positions, 128, row0), sink, 0.2
    )
    torch.testing.assert_close(packed, torch.cat(alone), atol=1e-6, rtol=0)
