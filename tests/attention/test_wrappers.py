"""The extend wrappers with the sparse MQA kernel (one launch per layer over the batch's row
lists) equal the per-request ``ref`` softmax: a fresh prefill and a continued chunk (tail kept,
entries already in the pools), every layer kind. CPU runs the kernel under the Triton
interpreter; the GPU test runs it on bf16 rows. Also: the indexer's query chunking (which bounds
the score tensor of long prefills) picks the same entries as one unchunked pass."""

import pytest
import torch
from pool_world import World, inputs, pool_state

import sglang_dsv4.attention.wrappers as wrappers_mod
from sglang_dsv4.attention.plan import plan_batch
from sglang_dsv4.attention.wrappers import CSAWrapper, HCAWrapper, SWAWrapper
from sglang_dsv4.config import AttnKind
from sglang_dsv4.kernels.attention import SparseMQA

WRAPPERS = {AttnKind.SWA: SWAWrapper, AttnKind.CSA: CSAWrapper, AttnKind.HCA: HCAWrapper}
# (request, prefix, new length): a fresh 131-token prefill and a chunk continuing 131 -> 300
STEPS = [[(0, 0, 131), (1, 0, 131)], [(0, 131, 300), (2, 0, 5)]]


def _wrapper(cfg, kind: AttnKind, kernel):
    if kind is AttnKind.CSA:
        return CSAWrapper(cfg.sliding_window, kernel, topk=cfg.index_topk)
    return WRAPPERS[kind](cfg.sliding_window, kernel)


def _run_steps(cfg, weights, layer: int, device: str, dtype, kernel) -> list[torch.Tensor]:
    spec = cfg.layers[layer]
    gen = torch.Generator().manual_seed(10 + layer)
    world = World(cfg, device, dtype)
    lk = world.pool.layer(layer)
    wrapper = _wrapper(cfg, spec.attn, kernel)
    sink = torch.randn(cfg.num_heads, generator=gen).to(device)
    w = {k: v.to(device) for k, v in weights.items()}
    outs = []
    for step in STEPS:
        reqs, prefix, seq = (list(x) for x in zip(*step, strict=True))
        fb = world.batch(reqs, prefix, seq, decode=False)
        q, kv, comp = inputs(cfg, w, spec, int(fb.out_cache_loc.numel()), gen)
        q, kv = q.to(device, dtype), kv.to(device, dtype)
        if comp is not None:
            comp = _to(comp, device)
        wrapper.plan(plan_batch(fb, world.pool, world.rtp))
        if kernel is not None:
            kernel.out.fill_(float("nan"))
        outs.append(wrapper.run(lk, q, kv, sink, cfg.head_dim**-0.5, comp).float())
    return outs


def _to(comp, device):
    from dataclasses import replace

    ix = comp.indexer
    if ix is not None:
        ix = replace(ix, q=ix.q.to(device), weights=ix.weights.to(device))
    return replace(comp, x=comp.x.to(device), inv_freq=comp.inv_freq.to(device), indexer=ix)


def _check_kernel_extend(cfg, weights, layer: int, device: str) -> None:
    want = _run_steps(cfg, weights, layer, device, torch.bfloat16, None)
    kernel = SparseMQA(cfg.num_heads, cfg.head_dim, kv_fp8=False, device=device)
    got = _run_steps(cfg, weights, layer, device, torch.bfloat16, kernel)
    for g, w in zip(got, want, strict=True):
        assert not g.isnan().any()
        rel = (g - w).norm() / w.norm()  # both read bf16 rows; outputs are rounded to bf16
        assert rel <= 1e-2, f"relative L2 {rel:.2e}"


@pytest.mark.parametrize("layer", [0, 2, 3])  # SWA, CSA (c4), HCA (c128)
def test_kernel_extend_equals_ref_on_cpu(tiny_cfg, tiny_weights, layer):
    _check_kernel_extend(tiny_cfg, tiny_weights, layer, "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("layer", [0, 2, 3])
def test_kernel_extend_equals_ref_on_gpu(tiny_cfg, tiny_weights, layer):
    _check_kernel_extend(tiny_cfg, tiny_weights, layer, "cuda")


def test_indexer_query_chunks_pick_the_same_entries(tiny_cfg, tiny_weights, monkeypatch):
    cfg = tiny_cfg
    want = _run_steps(cfg, tiny_weights, 2, "cpu", torch.float32, None)
    # a few queries per chunk instead of all: 131 / 7 and 169 / 7 leave ragged last chunks
    monkeypatch.setattr(wrappers_mod, "_SCORE_BYTES", 7 * 4 * cfg.index_n_heads * 75)
    got = _run_steps(cfg, tiny_weights, 2, "cpu", torch.float32, None)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=0)


def test_one_pass_flush_keeps_the_same_block_end_state(tiny_cfg, tiny_weights):
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
        wrapper = _wrapper(cfg, spec.attn, None)
        for p, s in chunks:
            fb = world.batch([0], [p], [s], decode=False)
            wrapper.plan(plan_batch(fb, world.pool, world.rtp))
            sink, scale = torch.zeros(cfg.num_heads), cfg.head_dim**-0.5
            wrapper.run(lk, q[p:s], kv[p:s], sink, scale, _slice(comp, p, s))
        states.append(pool_state(lk))
    one, split = states
    assert one["boundary.kv"].abs().sum() > 0  # block ends 128 and 256 were written
    for k, v in one.items():
        torch.testing.assert_close(v, split[k], atol=1e-5, rtol=1e-6, msg=k)


def _slice(comp, lo: int, hi: int):
    from dataclasses import replace

    ix = replace(comp.indexer, q=comp.indexer.q[lo:hi], weights=comp.indexer.weights[lo:hi])
    return replace(comp, x=comp.x[lo:hi], indexer=ix)
