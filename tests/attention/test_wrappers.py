"""The extend wrappers on the batched kernels (``attention.extend_ops``: KV store, compressor
flush, indexer top-k, sparse MQA: one launch per op over the whole batch) equal the torch twins
(the per-request ``ref`` math): outputs and every pool tensor (raw rows, entries, indexer keys,
tails, block-end state) after each step of a batch sequence with a fresh prefill, a continued
chunk (tail kept) and an extend over a cached prefix (tail rebuilt from a block end).

CPU runs the kernels under the Triton interpreter: fp32 pools (store / flush / top-k kernels, the
twin's softmax) and bf16 pools (plus the sparse MQA kernel). The GPU tests run the same at the
tiny and at Flash dims. Also: the twin's indexer query chunking picks the same entries as one
pass, and a c4 prefill in one pass keeps the same block-end state as two chunks."""

from dataclasses import replace

import pytest
import torch
from pool_world import World, inputs, pool_state, wrapper

import sglang_dsv4.attention.extend_ops as extend_ops_mod
from sglang_dsv4.attention.plan import TailMode, plan_batch

# (request, prefix, new length) per step: fresh prefills; a chunk continuing 131 -> 300 next to
# a fresh 5-token request; request 3 extends 256 -> 301 over request 0's first two blocks (a
# prefix hit: new tail owner, tail rebuilt from the block-end state at 256)
STEPS = [[(0, 0, 131), (1, 0, 131)], [(0, 131, 300), (2, 0, 5)], [(3, 256, 301), (1, 131, 140)]]


def _run_steps(cfg, weights, layer, device, dtype, kernels, steps=STEPS):
    spec = cfg.layers[layer]
    gen = torch.Generator().manual_seed(10 + layer)
    world = World(cfg, device, dtype)
    world.req_to_token[3, :256] = world.req_to_token[0, :256]  # request 3 shares 2 blocks
    lk = world.pool.layer(layer)
    extend = wrapper(cfg, spec.attn, dtype, device, kernels)
    sink = torch.randn(cfg.num_heads, generator=gen).to(device)
    w = {k: v.to(device) for k, v in weights.items()}
    outs, states, modes = [], [], []
    for step in steps:
        reqs, prefix, seq = (list(x) for x in zip(*step, strict=True))
        fb = world.batch(reqs, prefix, seq, decode=False)
        q, kv, comp = inputs(cfg, w, spec, int(fb.out_cache_loc.numel()), gen)
        q, kv = q.to(device, dtype), kv.to(device, dtype)
        if comp is not None:
            comp = _to(comp, device, dtype)
        plan = plan_batch(fb, world.pool, world.rtp)
        modes.append([r.tail for r in plan.requests])
        extend.plan(plan)
        outs.append(extend.run(lk, q, kv, sink, cfg.head_dim**-0.5, comp).float())
        states.append(pool_state(lk))
    assert modes[2][0] == TailMode.REBUILD and modes[1][0] == TailMode.KEEP
    return outs, states


def _to(comp, device, dtype):
    ix = comp.indexer
    if ix is not None:
        ix = replace(ix, q=ix.q.to(device, dtype), weights=ix.weights.to(device, dtype))
    x = comp.x.to(device, dtype)
    return replace(comp, x=x, inv_freq=comp.inv_freq.to(device), indexer=ix)


def _check(cfg, weights, layer, device, dtype, out_tol, state_tol):
    want, want_states = _run_steps(cfg, weights, layer, device, dtype, kernels=False)
    got, got_states = _run_steps(cfg, weights, layer, device, dtype, kernels=True)
    for g, w in zip(got, want, strict=True):
        assert not g.isnan().any()
        rel = ((g - w).norm() / w.norm()).item()
        assert rel <= out_tol, f"output relative L2 {rel:.2e}"
    for gs, ws in zip(got_states, want_states, strict=True):
        for k, v in ws.items():
            g, v = gs[k].float(), v.float()
            both_inf = torch.isinf(v) & (g == v)  # empty tail slots: -inf scores
            err = torch.where(both_inf, 0.0, (g - v).abs()).max().item()
            scale = torch.where(torch.isinf(v), 0.0, v.abs()).max().item()
            assert err <= state_tol * max(scale, 1.0), f"{k}: max |diff| {err:.2e}"


@pytest.mark.parametrize("layer", [0, 2, 3])  # SWA, CSA (c4), HCA (c128)
def test_kernels_equal_twin_fp32_on_cpu(tiny_cfg, tiny_weights, layer):
    _check(tiny_cfg, tiny_weights, layer, "cpu", torch.float32, 1e-5, 1e-5)


@pytest.mark.parametrize("layer", [2, 3])
def test_kernels_with_sparse_mqa_equal_twin_bf16_on_cpu(tiny_cfg, tiny_weights, layer):
    # bf16 rows: entries differ by a bf16 rounding where the kernel's fp32 sums differ in ulps
    _check(tiny_cfg, tiny_weights, layer, "cpu", torch.bfloat16, 1e-2, 1e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("layer", [0, 2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernels_equal_twin_on_gpu(tiny_cfg, tiny_weights, layer, dtype):
    tol = 1e-4 if dtype == torch.float32 else 1e-2  # fp32 GEMMs may run as TF32 on the GPU
    _check(tiny_cfg, tiny_weights, layer, "cuda", dtype, tol, tol)


def test_indexer_query_chunks_pick_the_same_entries(tiny_cfg, tiny_weights, monkeypatch):
    cfg = tiny_cfg
    want, _ = _run_steps(cfg, tiny_weights, 2, "cpu", torch.float32, False)
    # a few queries per chunk instead of all: 131 / 7 and 169 / 7 leave ragged last chunks
    monkeypatch.setattr(extend_ops_mod, "_SCORE_BYTES", 7 * 4 * cfg.index_n_heads * 75)
    got, _ = _run_steps(cfg, tiny_weights, 2, "cpu", torch.float32, False)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=0)


@pytest.mark.parametrize("kernels", [False, True])
def test_one_pass_flush_keeps_the_same_block_end_state(tiny_cfg, tiny_weights, kernels):
    """A c4 prefill of 0..300 in one pass (block-end state gathered from the pass's projections)
    leaves the same entries, indexer keys, tails and block-end state as 0..126 then 126..300,
    whose block end 128 has its last window split across the chunks (two of its rows come from
    the tail)."""
    cfg, layer = tiny_cfg, 2
    spec = cfg.layers[layer]
    gen = torch.Generator().manual_seed(5)
    q, kv, comp = inputs(cfg, tiny_weights, spec, 300, gen)
    states = []
    for chunks in ([(0, 300)], [(0, 126), (126, 300)]):
        world = World(cfg)
        lk = world.pool.layer(layer)
        extend = wrapper(cfg, spec.attn, kernels=kernels)
        for p, s in chunks:
            fb = world.batch([0], [p], [s], decode=False)
            extend.plan(plan_batch(fb, world.pool, world.rtp))
            sink, scale = torch.zeros(cfg.num_heads), cfg.head_dim**-0.5
            extend.run(lk, q[p:s], kv[p:s], sink, scale, _slice(comp, p, s))
        states.append(pool_state(lk))
    one, split = states
    assert one["boundary.kv"].abs().sum() > 0  # block ends 128 and 256 were written
    for k, v in one.items():
        torch.testing.assert_close(v, split[k], atol=1e-5, rtol=1e-6, msg=k)


def _slice(comp, lo: int, hi: int):
    ix = replace(comp.indexer, q=comp.indexer.q[lo:hi], weights=comp.indexer.weights[lo:hi])
    return replace(comp, x=comp.x[lo:hi], indexer=ix)
