"""The static-shape decode path equals the per-request extend path on the same pools: outputs,
entries, indexer keys, tails, block-end state and raw rows, for requests whose decode token
starts a block, ends a block, ends a c4 window, or sits at position 0 — plus padded rows."""

import pytest
import torch
from pool_world import BLOCK, LENGTHS, World, inputs, pool_state, wrapper

from sglang_dsv4.attention.decode import build_decode_meta, decode_attention
from sglang_dsv4.attention.plan import plan_batch
from sglang_dsv4.attention.wrappers import CompressedInputs, IndexerInputs
from sglang_dsv4.config import AttnKind


@pytest.mark.parametrize("layer", [0, 2, 3])  # SWA, CSA (c4), HCA (c128)
def test_decode_equals_extend_path(tiny_cfg, tiny_weights, layer):
    cfg, spec = tiny_cfg, tiny_cfg.layers[layer]
    extend = wrapper(cfg, spec.attn)
    gen = torch.Generator().manual_seed(layer)
    sink = torch.randn(cfg.num_heads, generator=gen)
    scale = cfg.head_dim**-0.5
    world = World(cfg)
    lk = world.pool.layer(layer)

    # Prefill every request with a nonzero prefix, then one decode token each.
    live = [i for i, n in enumerate(LENGTHS) if n]
    fb = world.batch(live, [0] * len(live), [LENGTHS[i] for i in live], decode=False)
    q0, kv0, comp0 = inputs(cfg, tiny_weights, spec, int(fb.out_cache_loc.numel()), gen)
    extend.plan(plan_batch(fb, world.pool, world.rtp))
    extend.run(lk, q0, kv0, sink, scale, comp0)
    before = pool_state(lk)

    n = len(LENGTHS)
    q, kv, comp = inputs(cfg, tiny_weights, spec, n, gen)
    reqs = list(range(n))
    dec = world.batch(reqs, LENGTHS, [s + 1 for s in LENGTHS], decode=True)
    extend.plan(plan_batch(dec, world.pool, world.rtp))
    want = extend.run(lk, q, kv, sink, scale, comp)
    want_state = pool_state(lk)

    # Restore the pools and replay the step on the static-shape path, with two padded rows.
    _restore(lk, before)
    pad = 2
    positions = torch.tensor(LENGTHS + [0] * pad)
    meta = build_decode_meta(
        torch.tensor(reqs + [0] * pad),  # padding reuses a live request slot
        positions,
        torch.cat([dec.out_cache_loc, torch.zeros(pad, dtype=torch.long)]),
        world.req_to_token,
        world.pool.full_to_swa_index_mapping,
        world.pool.spare_tail_row,
        cfg.sliding_window,
        BLOCK,
        n_pages=4,
    )
    padded = _pad_inputs(q, kv, comp, pad)
    got = decode_attention(lk, meta, *padded[:2], sink, scale, padded[2])
    torch.testing.assert_close(got[:n], want, atol=1e-5, rtol=0)
    got_state = pool_state(lk)
    for k, v in want_state.items():
        torch.testing.assert_close(got_state[k], v, atol=1e-5, rtol=0, msg=k)


def _restore(lk, state: dict[str, torch.Tensor]) -> None:
    lk.raw[BLOCK:] = state["raw"]
    for name in ("entries", "index_keys"):
        if name in state:
            getattr(lk, name)[1:] = state[name]
    for name in ("tail", "index_tail"):
        if name + ".kv" in state:
            getattr(lk, name).kv[:-1] = state[name + ".kv"]
            getattr(lk, name).score[:-1] = state[name + ".score"]
    for name in ("boundary", "index_boundary"):
        if name + ".kv" in state:
            getattr(lk, name).kv[1:] = state[name + ".kv"]
            getattr(lk, name).score[1:] = state[name + ".score"]


def _pad_inputs(q, kv, comp, pad: int):
    def p(t):
        return torch.cat([t, torch.randn(pad, *t.shape[1:])])

    if comp is None:
        return p(q), p(kv), None
    ix = comp.indexer
    if ix is not None:
        ix = IndexerInputs(p(ix.q), p(ix.weights), ix.compressor, ix.topk)
    return (
        p(q),
        p(kv),
        CompressedInputs(p(comp.x), comp.compressor, comp.inv_freq, comp.norm_eps, ix),
    )


def test_decode_ops_are_chosen_once_per_pool(tiny_cfg):
    from sglang_dsv4.attention.decode import DecodeTorch, decode_ops
    from sglang_dsv4.attention.decode_kernels import DecodeKernels
    from sglang_dsv4.mem.schema import EntryFormat

    cfg = tiny_cfg
    args = (cfg.num_heads, cfg.index_topk, cfg.index_n_heads)
    fp32 = World(cfg).pool
    assert type(decode_ops(fp32, *args, kernels=False)) is DecodeTorch
    with pytest.raises(ValueError, match="FP8 or bf16 rows"):
        decode_ops(fp32, *args, kernels=True)
    fp8 = World(cfg, "cpu", torch.bfloat16, EntryFormat.FP8, EntryFormat.FP8).pool
    ops = decode_ops(fp8, *args, kernels=True)
    assert isinstance(ops, DecodeKernels) and not ops.flashmla  # FlashMLA: sm90 only
    plan = ops.plan(3, 2)
    assert set(plan.attn) == {AttnKind.SWA, AttnKind.CSA, AttnKind.HCA}
    assert set(plan.flush) == {"c4", "c4_index", "c128"} and plan.indexer is not None
