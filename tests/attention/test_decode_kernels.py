"""The decode step through the GPU kernels (``attention.decode_kernels.DecodeKernels``: store_kv,
CompressorFlush, IndexerTopK, SparseMQA) equals the torch twin (``DecodeTorch``) on the same FP8
pools: attention outputs, raw rows (byte-exact), entries and indexer keys (up to one FP8 step),
tails and block-end state, for requests whose decode token starts a block, ends a block, ends a
c4 window, or sits at position 0, plus padded rows. CPU: Triton interpreter, tiny model."""

import pytest
import torch
from pool_world import BLOCK, LENGTHS, World, inputs
from pool_world import wrapper as extend_wrapper

from sglang_dsv4.attention.decode import DecodeTorch, build_decode_meta
from sglang_dsv4.attention.decode_kernels import DecodeKernels
from sglang_dsv4.attention.plan import plan_batch
from sglang_dsv4.attention.wrappers import CompressedInputs, IndexerInputs
from sglang_dsv4.mem.schema import EntryFormat
from sglang_dsv4.ref.quant import hadamard

PAD = 2
N_PAGES = 4


def _bf16_exact(t: torch.Tensor) -> torch.Tensor:
    return t.bfloat16().float()


def _decode_inputs(cfg, weights, spec, n: int, gen):
    """Inputs the kernels see exactly: bf16-representable q / kv, indexer queries whose
    Hadamard rotation is bf16-representable (the kernels score rotated bf16 queries)."""
    q, kv, comp = inputs(cfg, weights, spec, n, gen)
    q, kv = _bf16_exact(q), _bf16_exact(kv)
    if comp is not None and comp.indexer is not None:
        ix = comp.indexer
        ix = IndexerInputs(hadamard(_bf16_exact(ix.q)), ix.weights, ix.compressor, ix.topk)
        comp = CompressedInputs(comp.x, comp.compressor, comp.inv_freq, comp.norm_eps, ix)
    return q, kv, comp


def _pad(q, kv, comp):
    def p(t):
        return torch.cat([t, torch.zeros(PAD, *t.shape[1:], dtype=t.dtype)])

    if comp is None:
        return p(q), p(kv), None
    ix = comp.indexer
    if ix is not None:
        ix = IndexerInputs(p(ix.q), p(ix.weights), ix.compressor, ix.topk)
    return p(q), p(kv), CompressedInputs(p(comp.x), comp.compressor, comp.inv_freq, 1e-6, ix)


def _state(lk) -> dict[str, torch.Tensor]:
    out = {"raw": lk.raw}
    for name in ("entries", "index_keys"):
        if getattr(lk, name) is not None:
            out[name] = getattr(lk, name)
    for name in ("tail", "index_tail", "boundary", "index_boundary"):
        tb = getattr(lk, name)
        if tb is not None:
            out[name + ".kv"], out[name + ".score"] = tb.kv, tb.score
    return {k: v.clone() for k, v in out.items()}


def _restore(lk, state) -> None:
    lk.raw.copy_(state["raw"])
    for name in ("entries", "index_keys"):
        if name in state:
            getattr(lk, name).copy_(state[name])
    for name in ("tail", "index_tail", "boundary", "index_boundary"):
        if name + ".kv" in state:
            getattr(lk, name).kv.copy_(state[name + ".kv"])
            getattr(lk, name).score.copy_(state[name + ".score"])


def _to(q, kv, comp, device):
    if comp is None:
        return q.to(device), kv.to(device), None
    ix = comp.indexer
    if ix is not None:
        ix = IndexerInputs(ix.q.to(device), ix.weights.to(device), ix.compressor, ix.topk)
    comp = CompressedInputs(
        comp.x.to(device), comp.compressor, comp.inv_freq.to(device), comp.norm_eps, ix
    )
    return q.to(device), kv.to(device), comp


def _prefilled_world(cfg, weights, layer: int, gen, device="cpu", fmt=EntryFormat.FP8):
    """A world whose requests hold ``LENGTHS`` tokens, written by the torch extend path."""
    dtype = torch.float32 if fmt is EntryFormat.FP32 else torch.bfloat16
    index_fmt = fmt if fmt is EntryFormat.FP32 else EntryFormat.FP8
    world = World(cfg, device, dtype, fmt, index_fmt)
    spec = cfg.layers[layer]
    wrapper = extend_wrapper(cfg, spec.attn)  # the torch twin
    live = [i for i, n in enumerate(LENGTHS) if n]
    fb = world.batch(live, [0] * len(live), [LENGTHS[i] for i in live], decode=False)
    q, kv, comp = _to(*inputs(cfg, weights, spec, int(fb.out_cache_loc.numel()), gen), device)
    wrapper.plan(plan_batch(fb, world.pool, world.rtp))
    sink = torch.randn(cfg.num_heads, generator=gen).to(device)
    wrapper.run(world.pool.layer(layer), q.to(dtype), kv, sink, cfg.head_dim**-0.5, comp)
    return world, sink


def _decode_meta(world, cfg, device):
    n = len(LENGTHS)
    dec = world.batch(list(range(n)), LENGTHS, [s + 1 for s in LENGTHS], decode=True)
    return build_decode_meta(
        torch.tensor(list(range(n)) + [0] * PAD, device=device),  # padding reuses a live slot
        torch.tensor(LENGTHS + [0] * PAD, device=device),
        torch.cat([dec.out_cache_loc, torch.zeros(PAD, dtype=torch.long)]).to(device),
        world.req_to_token,
        world.pool.full_to_swa_index_mapping,
        world.pool.spare_tail_row,
        cfg.sliding_window,
        BLOCK,
        N_PAGES,
    )


def _check_kernels_equal_twin(cfg, weights, layer: int, device: str, fmt: EntryFormat):
    spec = cfg.layers[layer]
    gen = torch.Generator().manual_seed(100 + layer)
    world, sink = _prefilled_world(cfg, weights, layer, gen, device, fmt)
    lk = world.pool.layer(layer)
    n = len(LENGTHS)
    q, kv, comp = _to(*_pad(*_decode_inputs(cfg, weights, spec, n, gen)), device)
    meta = _decode_meta(world, cfg, device)
    scale = cfg.head_dim**-0.5
    before = _state(lk)
    twin = DecodeTorch()
    want = twin.run(twin.plan(n + PAD, N_PAGES), spec.attn, lk, meta, q, kv, sink, scale, comp)
    want_state = _state(lk)
    _restore(lk, before)

    ops = DecodeKernels(
        world.pool.schema, cfg.num_heads, cfg.index_topk, cfg.index_n_heads, device, flashmla=False
    )
    plan = ops.plan(n + PAD, N_PAGES)
    for k in plan.attn.values():
        k.out.fill_(float("nan"))
    got = ops.run(plan, spec.attn, lk, meta, q, kv, sink, scale, comp).float()
    assert torch.isfinite(got[:n]).all()
    want = want.float()
    rel = (got[:n] - want[:n]).norm() / want[:n].norm()
    assert rel <= 1e-2, f"attention rel L2 {rel:.2e}"
    got_state = _state(lk)
    # Page 0, swa page 0 and the spare tail row take padded / non-emitting writes: not compared.
    if lk.fp8:  # store_kv == pack_fp8_rows, byte for byte
        assert torch.equal(got_state["raw"][1:], want_state["raw"][1:])
    else:
        assert torch.equal(got_state["raw"][BLOCK:], want_state["raw"][BLOCK:])
    for name in ("entries", "index_keys"):
        if name in want_state:
            _check_rows(lk, name, got_state[name], want_state[name])
    for k, v in want_state.items():
        if "." in k:
            part = slice(None, -1) if "tail" in k else slice(1, None)
            torch.testing.assert_close(got_state[k][part], v[part], atol=1e-4, rtol=1e-4, msg=k)


@pytest.mark.parametrize("layer", [0, 2, 3])  # SWA, CSA (c4), HCA (c128)
def test_decode_kernels_equal_torch_twin_on_fp8_pools(tiny_cfg, tiny_weights, layer):
    _check_kernels_equal_twin(tiny_cfg, tiny_weights, layer, "cpu", EntryFormat.FP8)


@pytest.mark.parametrize("layer", [2, 3])
def test_decode_kernels_equal_torch_twin_on_bf16_rows(tiny_cfg, tiny_weights, layer):
    _check_kernels_equal_twin(tiny_cfg, tiny_weights, layer, "cpu", EntryFormat.BF16)


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", [EntryFormat.FP8, EntryFormat.BF16])
@pytest.mark.parametrize("layer", [0, 2, 3])
def test_decode_kernels_equal_torch_twin_on_gpu(tiny_cfg, tiny_weights, layer, fmt):
    w = {k: v.cuda() for k, v in tiny_weights.items()}
    _check_kernels_equal_twin(tiny_cfg, w, layer, "cuda", fmt)


def _check_rows(lk, name: str, got: torch.Tensor, want: torch.Tensor) -> None:
    """Decoded rows agree within one FP8 / bf16 step (the kernel pools in another fp32 order)."""
    read = lk.read_entries if name == "entries" else lk.read_index_keys
    per_page = (lk.entry_rows if name == "entries" else lk.key_rows).rows_per_page
    rows = torch.arange(per_page, got.shape[0] * per_page, device=got.device)  # not page 0
    live = getattr(lk, name)
    live.copy_(got)
    a = read(rows).float()
    live.copy_(want)
    b = read(rows).float()
    assert (a != b).float().mean() < 0.01, name  # almost every value equal
    assert ((a - b).abs() <= 0.13 * b.abs() + 1e-3 * b.abs().max()).all(), name
