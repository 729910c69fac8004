import pytest
import torch
from conftest import EDGE_LENGTHS
from transformers import DynamicCache

from sglang_dsv4.ref.compressor import (
    CompressorState,
    CompressorWeights,
    compress,
    compress_decode,
)
from sglang_dsv4.ref.rope import rope_inv_freq

CSA, HCA = 2, 3  # tiny-6l layer indices
WHICH = [(CSA, "compressor"), (CSA, "indexer.compressor"), (HCA, "compressor")]


def weights(tiny_weights, layer: int, which: str) -> CompressorWeights:
    p = f"layers.{layer}.attn.{which}."
    w = tiny_weights
    return CompressorWeights(
        w[p + "wkv.weight"], w[p + "wgate.weight"], w[p + "ape"], w[p + "norm.weight"]
    )


def run_chunks(x, chunks, cw, inv_freq):
    """Feed ``x`` in ``chunks``; return (all entries, final state, state after each chunk)."""
    state, pos, out, states = CompressorState.empty(cw), 0, [], []
    for c in chunks:
        entries, first, state = compress(x[pos : pos + c], pos, state, cw, inv_freq)
        assert first == pos // cw.ratio, "entries must continue where the previous chunk stopped"
        out.append(entries)
        states.append(state)
        pos += c
    return torch.cat(out), state, states


def hf_entries(hf_model, layer: int, which: str, x: torch.Tensor, chunks) -> torch.Tensor:
    """Entries the HF compressor (with its cache) emits for ``x`` fed in ``chunks``."""
    attn = hf_model.model.layers[layer].self_attn
    cache = DynamicCache(config=hf_model.config)
    pos = 0
    for c in chunks:
        q_res = torch.randn(1, c, hf_model.config.q_lora_rank)
        attn.compressor(
            x[None, pos : pos + c], q_res, torch.arange(pos, pos + c)[None], cache, layer
        )
        pos += c
    name = "indexer" if which.startswith("indexer") else "compressor"
    got = cache.layers[layer].compressed_kv[name]
    return got.reshape(-1, got.shape[-1])


@pytest.mark.parametrize(("layer", "which"), WHICH)
@pytest.mark.parametrize("n", EDGE_LENGTHS)
def test_one_pass_matches_hf(hf_model, tiny_weights, tiny_cfg, layer, which, n):
    cw = weights(tiny_weights, layer, which)
    inv_freq = rope_inv_freq(tiny_cfg.layers[layer].rope, tiny_cfg.rope_dim)
    x = torch.randn(n, tiny_cfg.hidden_size)
    with torch.no_grad():
        want = hf_entries(hf_model, layer, which, x, [n])
    got, _, _ = run_chunks(x, [n], cw, inv_freq)
    assert got.shape == (n // cw.ratio, cw.head_dim)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize(("layer", "which"), WHICH)
def test_chunked_matches_hf_chunked(hf_model, tiny_weights, tiny_cfg, layer, which):
    chunks = [1, 2, 3, 125, 130, 389]
    cw = weights(tiny_weights, layer, which)
    inv_freq = rope_inv_freq(tiny_cfg.layers[layer].rope, tiny_cfg.rope_dim)
    x = torch.randn(sum(chunks), tiny_cfg.hidden_size)
    with torch.no_grad():
        want = hf_entries(hf_model, layer, which, x, chunks)
    got, _, _ = run_chunks(x, chunks, cw, inv_freq)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


CHUNKINGS = {
    "1+2+3+125+130+389": [1, 2, 3, 125, 130, 389],
    "257+373+20": [257, 373, 20],
    "127+1+129+3+390": [127, 1, 129, 3, 390],
    "token-by-token": [1] * 650,
}


@pytest.mark.parametrize(("layer", "which"), WHICH)
@pytest.mark.parametrize("chunking", list(CHUNKINGS))
def test_chunking_gives_same_entries_and_state(tiny_weights, tiny_cfg, layer, which, chunking):
    chunks = CHUNKINGS[chunking]
    cw = weights(tiny_weights, layer, which)
    inv_freq = rope_inv_freq(tiny_cfg.layers[layer].rope, tiny_cfg.rope_dim)
    x = torch.randn(650, tiny_cfg.hidden_size)
    full, full_state, _ = run_chunks(x, [650], cw, inv_freq)
    got, state, states = run_chunks(x, chunks, cw, inv_freq)
    torch.testing.assert_close(got, full, atol=1e-5, rtol=0)
    torch.testing.assert_close(state.kv, full_state.kv, atol=1e-5, rtol=0)
    assert torch.equal(state.score.isinf(), full_state.score.isinf())
    torch.testing.assert_close(state.score, full_state.score, atol=1e-5, rtol=0)
    # the state after every chunk equals the state of one pass over the same prefix
    pos = 0
    for c, s in list(zip(chunks, states, strict=True))[:40]:
        pos += c
        _, ref_state, _ = run_chunks(x[:pos], [pos], cw, inv_freq)
        torch.testing.assert_close(s.kv, ref_state.kv, atol=1e-5, rtol=0)
        assert torch.equal(s.score.isinf(), ref_state.score.isinf())


def test_state_layout_at_block_boundary(tiny_weights, tiny_cfg):
    """At a multiple of 128 the c128 tail and the c4 current window are empty; the c4 state keeps
    the last complete window (its a-half is what the next entry needs)."""
    x = torch.randn(256, tiny_cfg.hidden_size)
    for layer, which in WHICH:
        cw = weights(tiny_weights, layer, which)
        inv_freq = rope_inv_freq(tiny_cfg.layers[layer].rope, tiny_cfg.rope_dim)
        _, state, _ = run_chunks(x, [256], cw, inv_freq)
        r = cw.ratio
        if cw.overlap:
            assert state.score[r:].isinf().all() and state.score[:r].isfinite().all()
            kv = x[252:256].float() @ cw.wkv.float().T
            torch.testing.assert_close(state.kv[:r], kv, atol=1e-5, rtol=0)
        else:
            assert state.score.isinf().all() and (state.kv == 0).all()


def test_first_csa_entry_pads_previous_window(tiny_weights, tiny_cfg):
    """Entry 0 of c4 pools only the b-half of tokens 0..3 (the missing window -1 has weight 0)."""
    cw = weights(tiny_weights, CSA, "compressor")
    x = torch.randn(4, tiny_cfg.hidden_size)
    entries, _, _ = run_chunks(x, [4], cw, rope_inv_freq(tiny_cfg.layers[CSA].rope, 64))
    d = cw.head_dim
    kv = (x @ cw.wkv.T)[:, d:]
    score = (x @ cw.wgate.T + cw.ape)[:, d:]
    pooled = (kv * score.softmax(0)).sum(0)
    want = (
        pooled * torch.rsqrt(pooled.square().mean() + 1e-6) * cw.norm
    )  # RoPE at position 0 = identity
    torch.testing.assert_close(entries[0], want, atol=1e-5, rtol=0)


@pytest.mark.parametrize(("layer", "which"), WHICH)
def test_batched_decode_step_equals_token_by_token(tiny_weights, tiny_cfg, layer, which):
    """Requests at different positions (window starts, ends, block ends, position 0) step
    together through ``compress_decode``; each equals ``compress`` fed its own tokens."""
    cw = weights(tiny_weights, layer, which)
    inv_freq = rope_inv_freq(tiny_cfg.layers[layer].rope, tiny_cfg.rope_dim)
    starts = [0, 3, 126, 127, 128, 255, 300]
    steps = 6
    xs = [torch.randn(s + steps, tiny_cfg.hidden_size) for s in starts]
    states = [
        compress(x[:s], 0, CompressorState.empty(cw), cw, inv_freq)[2]
        for x, s in zip(xs, starts, strict=True)
    ]
    kv = torch.stack([s.kv for s in states])
    score = torch.stack([s.score for s in states])
    for step in range(steps):
        pos = torch.tensor(starts) + step
        x = torch.stack([x[p] for x, p in zip(xs, pos.tolist(), strict=True)])
        entry, emit, kv, score = compress_decode(x, pos, kv, score, cw, inv_freq)
        for b, p in enumerate(pos.tolist()):
            want, first, states[b] = compress(x[b : b + 1], p, states[b], cw, inv_freq)
            assert bool(emit[b]) == (want.shape[0] == 1)
            if want.shape[0]:
                assert first == p // cw.ratio
                torch.testing.assert_close(entry[b], want[0], atol=1e-5, rtol=0)
            torch.testing.assert_close(kv[b], states[b].kv, atol=1e-6, rtol=0)
            torch.testing.assert_close(score[b], states[b].score, atol=1e-6, rtol=0)
