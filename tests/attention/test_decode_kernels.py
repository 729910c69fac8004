"""The decode step through the GPU kernels (``attention.decode_kernels.DecodeKernels``: store_kv,
CompressorFlush, IndexerTopK, SparseMQA) equals the torch twin (``DecodeTorch``) on the same FP8
pools: attention outputs, raw rows (byte-exact), entries and indexer keys (up to one FP8 step),
tails and block-end state, for requests whose decode token starts a block, ends a block, ends a
c4 window, or sits at position 0, plus padded rows. CPU: Triton interpreter, tiny model."""

import dataclasses

import pytest
import torch
from pool_world import BLOCK, LENGTHS, World, inputs
from pool_world import wrapper as extend_wrapper

from sglang_dsv4.attention.decode import DecodeTorch, KVNorm, build_decode_meta
from sglang_dsv4.attention.decode_kernels import DecodeKernels
from sglang_dsv4.attention.plan import plan_batch
from sglang_dsv4.attention.wrappers import CompressedInputs, IndexerInputs
from sglang_dsv4.config import AttnKind
from sglang_dsv4.mem.schema import EntryFormat
from sglang_dsv4.ops.proj import ProjCat
from sglang_dsv4.ref.quant import hadamard
from sglang_dsv4.ref.rope import rope_inv_freq

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
        return torch.cat([t, torch.zeros(PAD, *t.shape[1:], dtype=t.dtype, device=t.device)])

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
    lk = world.pool.layer(layer)
    wrapper = extend_wrapper(cfg, spec.attn, lk, device)  # the torch twin on the pool's device
    live = [i for i, n in enumerate(LENGTHS) if n]
    fb = world.batch(live, [0] * len(live), [LENGTHS[i] for i in live], decode=False)
    q, kv, comp = _to(*inputs(cfg, weights, spec, int(fb.out_cache_loc.numel()), gen), device)
    wrapper.plan(plan_batch(fb, world.pool, world.rtp))
    sink = torch.randn(cfg.num_heads, generator=gen).to(device)
    wrapper.run(lk, q.to(dtype), kv, sink, cfg.head_dim**-0.5, comp)
    return world, sink


def _decode_inputs_of_step(world, device):
    """SGLang's graph-static inputs of the decode step: request slots, positions, out slots."""
    n = len(LENGTHS)
    dec = world.batch(list(range(n)), LENGTHS, [s + 1 for s in LENGTHS], decode=True)
    return (
        torch.tensor(list(range(n)) + [0] * PAD, device=device),  # padding reuses a live slot
        torch.tensor(LENGTHS + [0] * PAD, device=device),
        torch.cat(
            [dec.out_cache_loc.to(device), torch.zeros(PAD, dtype=torch.long, device=device)]
        ),
    )


def _decode_meta(world, cfg, device, step_inputs=None):
    slots, positions, out_loc = step_inputs or _decode_inputs_of_step(world, device)
    return build_decode_meta(
        slots,
        positions,
        out_loc,
        world.req_to_token,
        world.pool.full_to_swa_index_mapping,
        world.pool.spare_tail_row,
        cfg.sliding_window,
        BLOCK,
        N_PAGES,
    )


def _fused_projections(comp) -> None:
    """The compressors' projections as the served model hands them over: strided views of one
    concatenated GEMM output (``ops.proj.ProjCat``)."""
    ix = comp.indexer
    ws = [comp.compressor.wkv, comp.compressor.wgate]
    ws += [] if ix is None else [ix.compressor.wkv, ix.compressor.wgate]
    ys = ProjCat().run(ProjCat().fuse([w.detach().clone() for w in ws]), comp.x)
    assert comp.x.shape[0] == 1 or not ys[0].is_contiguous()
    comp.projected = ys[:2]
    if ix is not None:
        ix.projected = ys[2:]


def _check_kernels_equal_twin(
    cfg,
    weights,
    layer: int,
    device: str,
    fmt: EntryFormat,
    fused_norm: bool = False,
    fused_proj: bool = False,
):
    spec = cfg.layers[layer]
    gen = torch.Generator().manual_seed(100 + layer)
    world, sink = _prefilled_world(cfg, weights, layer, gen, device, fmt)
    lk = world.pool.layer(layer)
    n = len(LENGTHS)
    q, kv, comp = _to(*_pad(*_decode_inputs(cfg, weights, spec, n, gen)), device)
    if fused_proj:
        _fused_projections(comp)
    meta = _decode_meta(world, cfg, device)
    scale = cfg.head_dim**-0.5
    kv_norm = None
    if fused_norm:  # raw wkv(x) rows: the store applies kv_norm + RoPE
        kv = kv * 3 + 0.5
        weight = _bf16_exact(torch.rand(cfg.head_dim, generator=gen) + 0.5).to(device)
        inv_freq = rope_inv_freq(spec.rope, cfg.rope_dim).to(device)
        kv_norm = KVNorm(weight, inv_freq, meta.positions, 1e-6)
    before = _state(lk)
    twin = DecodeTorch()
    want = twin.run(
        twin.plan(n + PAD, N_PAGES), spec.attn, lk, meta, q, kv, sink, scale, comp, kv_norm
    )
    want_state = _state(lk)
    _restore(lk, before)

    ops = DecodeKernels(
        world.pool.schema, cfg.num_heads, cfg.index_topk, cfg.index_n_heads, device, flashmla=False
    )
    plan = ops.plan(n + PAD, N_PAGES)
    for k in plan.attn.values():
        k.out.fill_(float("nan"))
    got = ops.run(plan, spec.attn, lk, meta, q, kv, sink, scale, comp, kv_norm).float()
    assert torch.isfinite(got[:n]).all()
    want = want.float()
    rel = (got[:n] - want[:n]).norm() / want[:n].norm()
    assert rel <= 1e-2, f"attention rel L2 {rel:.2e}"
    got_state = _state(lk)
    # Page 0, swa page 0 and the spare tail row take padded / non-emitting writes: not compared.
    if fused_norm:  # Triton's and torch's cos / sin differ in the last bits
        _check_rows(lk, "raw", got_state["raw"], want_state["raw"])
    elif lk.fp8:  # store_kv == pack_fp8_rows, byte for byte
        assert torch.equal(got_state["raw"][1:], want_state["raw"][1:])
    else:
        assert torch.equal(got_state["raw"][BLOCK:], want_state["raw"][BLOCK:])
    check_entries_and_state(lk, got_state, want_state)


def check_entries_and_state(lk, got_state, want_state) -> None:
    """Entries / indexer keys within one FP8 step, tails and block-end state within fp32
    rounding (page 0, swa page 0 and the spare tail row take padded writes: not compared)."""
    for name in ("entries", "index_keys"):
        if name in want_state:
            _check_rows(lk, name, got_state[name], want_state[name])
    for k, v in want_state.items():
        if "." in k:
            part = slice(None, -1) if "tail" in k else slice(1, None)
            torch.testing.assert_close(got_state[k][part], v[part], atol=1e-4, rtol=1e-4, msg=k)


@pytest.mark.parametrize("layer", [2, 3])  # CSA (c4), HCA (c128)
def test_decode_kernels_take_the_fused_projections(tiny_cfg, tiny_weights, layer):
    fmt = EntryFormat.FP8
    _check_kernels_equal_twin(tiny_cfg, tiny_weights, layer, "cpu", fmt, fused_proj=True)


@pytest.mark.parametrize("layer", [0, 2, 3])  # SWA, CSA (c4), HCA (c128)
def test_decode_kernels_equal_torch_twin_on_fp8_pools(tiny_cfg, tiny_weights, layer):
    _check_kernels_equal_twin(tiny_cfg, tiny_weights, layer, "cpu", EntryFormat.FP8)


@pytest.mark.parametrize("layer", [2, 3])
def test_decode_kernels_equal_torch_twin_on_bf16_rows(tiny_cfg, tiny_weights, layer):
    _check_kernels_equal_twin(tiny_cfg, tiny_weights, layer, "cpu", EntryFormat.BF16)


@pytest.mark.parametrize("fmt", [EntryFormat.FP8, EntryFormat.BF16])
def test_fused_kv_norm_rope_store_equals_twin(tiny_cfg, tiny_weights, fmt):
    _check_kernels_equal_twin(tiny_cfg, tiny_weights, 0, "cpu", fmt, fused_norm=True)


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", [EntryFormat.FP8, EntryFormat.BF16])
@pytest.mark.parametrize("layer", [0, 2, 3])
def test_decode_kernels_equal_torch_twin_on_gpu(tiny_cfg, tiny_weights, layer, fmt):
    w = {k: v.cuda() for k, v in tiny_weights.items()}
    _check_kernels_equal_twin(tiny_cfg, w, layer, "cuda", fmt, fused_norm=layer == 0)


def _check_rows(lk, name: str, got: torch.Tensor, want: torch.Tensor) -> None:
    """Decoded rows agree within one FP8 / bf16 step (the kernel pools in another fp32 order)."""
    read, store = {
        "raw": (lk.read_raw, lk.raw_rows),
        "entries": (lk.read_entries, lk.entry_rows),
        "index_keys": (lk.read_index_keys, lk.key_rows),
    }[name]
    per_page = store.rows_per_page
    n_rows = got.shape[0] * per_page if store.layout is not None else got.numel() // store.dim
    rows = torch.arange(per_page, n_rows, device=got.device)  # not page 0
    live = getattr(lk, name)
    live.copy_(got)
    a = read(rows).float()
    live.copy_(want)
    b = read(rows).float()
    assert (a != b).float().mean() < 0.01, name  # almost every value equal
    assert ((a - b).abs() <= 0.13 * b.abs() + 1e-3 * b.abs().max()).all(), name


# ---------------------------------------------------------------- GPU: Flash dims, graphs


def _flash_dims():
    from pathlib import Path

    from sglang_dsv4.config import DSV4Config

    path = Path(__file__).resolve().parents[2] / "sglang_dsv4" / "configs" / "dsv4-flash-dims.json"
    return DSV4Config.from_json(path)


def _flash_weights(cfg, gen) -> dict[str, torch.Tensor]:
    """Random compressor weights of every compressed layer (the only weights ``inputs`` uses)."""
    w = {}
    for spec in cfg.layers:
        if not spec.attn.compressed:
            continue
        parts = [("compressor", cfg.head_dim)]
        if spec.attn is AttnKind.CSA:
            parts.append(("indexer.compressor", cfg.index_head_dim))
        for which, d in parts:
            c = (2 if spec.ratio == 4 else 1) * d
            p = f"layers.{spec.index}.attn.{which}."
            std = cfg.hidden_size**-0.5
            w[p + "wkv.weight"] = torch.randn(c, cfg.hidden_size, generator=gen) * std
            w[p + "wgate.weight"] = torch.randn(c, cfg.hidden_size, generator=gen) * std
            w[p + "ape"] = torch.randn(spec.ratio, c, generator=gen) * 0.1
            w[p + "norm.weight"] = torch.rand(d, generator=gen) + 0.5
    return w


@pytest.mark.gpu
@pytest.mark.parametrize("layer", [0, 1, 2])  # Flash dims: SWA, CSA (c4), HCA (c128)
def test_flash_dims_fp8_decode_close_to_fp32_twin(layer):
    """The served decode step (FP8 pools, kernels; FlashMLA where the choice table picks it)
    against the fp32 twin on fp32 pools, same inputs and history (top-k 512 >= every visible
    entry here, so both attend to the same rows): FP8 rounding only."""
    cfg = _flash_dims()
    spec = cfg.layers[layer]
    w = {k: v.cuda() for k, v in _flash_weights(cfg, torch.Generator().manual_seed(7)).items()}
    outs = {}
    for fmt in (EntryFormat.FP32, EntryFormat.FP8):
        gen = torch.Generator().manual_seed(200 + layer)
        world, sink = _prefilled_world(cfg, w, layer, gen, "cuda", fmt)
        lk = world.pool.layer(layer)
        n = len(LENGTHS)
        q, kv, comp = _to(*_pad(*_decode_inputs(cfg, w, spec, n, gen)), "cuda")
        meta = _decode_meta(world, cfg, "cuda")
        if fmt is EntryFormat.FP32:
            ops = DecodeTorch()
        else:
            ops = DecodeKernels(
                world.pool.schema, cfg.num_heads, cfg.index_topk, cfg.index_n_heads, "cuda"
            )
        plan = ops.plan(n + PAD, N_PAGES)
        o = ops.run(plan, spec.attn, lk, meta, q, kv, sink, cfg.head_dim**-0.5, comp)
        outs[fmt] = o[:n].float()
    want, got = outs[EntryFormat.FP32], outs[EntryFormat.FP8]
    assert torch.isfinite(got).all()
    rel = (got - want).norm() / want.norm()
    max_abs = (got - want).abs().max() / want.abs().max()
    assert rel <= 5e-2 and max_abs <= 0.15, f"rel L2 {rel:.2e}, max-abs / max {max_abs:.2e}"


@pytest.mark.gpu
@pytest.mark.parametrize("layer", [0, 2, 3])
def test_decode_graph_replay_equals_eager(tiny_cfg, tiny_weights, layer):
    """One decode step (metadata + every launch) captured in a CUDA graph and replayed gives
    the eager step's output and pools exactly."""
    cfg, spec = tiny_cfg, tiny_cfg.layers[layer]
    w = {k: v.cuda() for k, v in tiny_weights.items()}
    gen = torch.Generator().manual_seed(300 + layer)
    world, sink = _prefilled_world(cfg, w, layer, gen, "cuda", EntryFormat.FP8)
    lk = world.pool.layer(layer)
    n = len(LENGTHS)
    q, kv, comp = _to(*_pad(*_decode_inputs(cfg, w, spec, n, gen)), "cuda")
    ops = DecodeKernels(world.pool.schema, cfg.num_heads, cfg.index_topk, cfg.index_n_heads, "cuda")
    scale = cfg.head_dim**-0.5

    static = _decode_inputs_of_step(world, "cuda")  # no host copies inside the capture

    def step(plan):
        meta = _decode_meta(world, cfg, "cuda", static)
        return ops.run(plan, spec.attn, lk, meta, q, kv, sink, scale, comp)

    before = _state(lk)
    want = step(ops.plan(n + PAD, N_PAGES)).clone()
    want_state = _state(lk)
    _restore(lk, before)
    plan = ops.plan(n + PAD, N_PAGES)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up off the capture stream, as SGLang does
        step(plan)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step(plan)
    _restore(lk, before)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, want)
    got_state = _state(lk)
    for k, v in want_state.items():
        part = slice(None, -1) if "tail" in k else slice(1, None)
        assert torch.equal(got_state[k][part], v[part]), k


@pytest.mark.gpu
@pytest.mark.parametrize("kind", [AttnKind.SWA, AttnKind.CSA, AttnKind.HCA])
@pytest.mark.parametrize("batch", [1, 5, 64])
def test_flashmla_equals_ours_on_the_same_fp8_cache(kind, batch):
    """FlashMLA's sparse decode and our SparseMQA on the very same FP8 pages of our pools
    (swa pages of 128 rows, c4 pages of 32, c128 pages of 1), eager and graph-replayed."""
    from sglang_dsv4.attention.choice import flashmla_eligible
    from sglang_dsv4.attention.decode_kernels import FlashMLADecode, load_flashmla
    from sglang_dsv4.kernels.attention import SparseMQA

    cfg = _flash_dims()
    if not flashmla_eligible(True, cfg.num_heads, cfg.head_dim, "cuda"):
        pytest.skip("FlashMLA's sparse decode needs sm90")
    gen = torch.Generator(device="cuda").manual_seed(batch)
    world = World(cfg, "cuda", torch.bfloat16, EntryFormat.FP8, EntryFormat.FP8)
    lk = next(x for x in world.pool.layers if x.kind is kind)
    n_swa, d = world.pool.n_swa_slots + BLOCK, cfg.head_dim
    lk.write_raw(torch.arange(n_swa, device="cuda"), torch.randn(n_swa, d, device="cuda"))
    window = torch.randint(BLOCK, n_swa, (batch, cfg.sliding_window), device="cuda", generator=gen)
    window[0, :5] = -1  # positions before 0
    window = window.int()
    extra, rows = {}, None
    if kind is not AttnKind.SWA:
        per_page = lk.entry_rows.rows_per_page
        n_rows = lk.entries.shape[0] * per_page
        lk.write_entries(torch.arange(n_rows, device="cuda"), torch.randn(n_rows, d, device="cuda"))
        width = cfg.index_topk if kind is AttnKind.CSA else 64
        rows = torch.randint(per_page, n_rows, (batch, width), device="cuda", generator=gen)
        rows[:, width // 2 + 3 :] = -1  # a partly filled list
        rows = rows.int()
        extra = {"extra_kv": lk.entry_pages(), "extra_indices": rows}
    q = torch.randn(batch, cfg.num_heads, d, device="cuda", generator=gen).bfloat16()
    sink = torch.randn(cfg.num_heads, device="cuda", generator=gen)
    scale = d**-0.5
    ours = SparseMQA(cfg.num_heads, d, kv_fp8=True, device="cuda")
    ours.plan(batch, cfg.sliding_window, 0 if rows is None else rows.shape[1])
    want = ours.run(q, lk.raw_pages(), window, sink, scale, **extra).float()
    mla = FlashMLADecode(load_flashmla(), d)
    mla.plan()
    got = mla.run(q, lk.raw_pages(), window, sink, scale, **extra).float()
    rel = (got - want).norm() / want.norm()
    assert rel <= 1e-2, f"FlashMLA vs ours rel L2 {rel:.2e}"
    mla.plan()  # a fresh schedule computed inside the graph, as a captured decode step does
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = mla.run(q, lk.raw_pages(), window, sink, scale, **extra)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out.float(), got)


class _FakeMLA:
    """Stands in for ``sgl_kernel.flash_mla`` on CPU: records what ``FlashMLADecode`` hands it."""

    def __init__(self):
        self.calls = []

    def get_mla_metadata(self):
        return object(), None  # a fresh FlashMLASchedMeta

    def flash_mla_with_kvcache(self, **kw):
        self.calls.append(kw)
        b, _, h, _ = kw["q"].shape
        return torch.zeros(b, 1, h, kw["head_dim_v"]), None


@pytest.mark.parametrize(
    ("lengths", "handed", "kept"), [(False, None, True), (True, [1, 3, 1], False)]
)
def test_flashmla_schedule_static_without_lengths(lengths, handed, kept):
    """Static schedule: no per-query counts reach FlashMLA and the warm-up's schedule survives
    the capture; with counts (HCA) they are handed over and the schedule is recomputed."""
    from sglang_dsv4.attention.decode_kernels import FlashMLADecode

    fake = _FakeMLA()
    mla = FlashMLADecode(fake, 8, lengths=lengths)
    mla.plan()
    warm = mla.sched
    q, kv = torch.zeros(3, 4, 16), torch.zeros(2, 1, 1, 16, dtype=torch.uint8)
    idx = torch.zeros(3, 64, dtype=torch.int32)
    counts = torch.tensor([1, 3, 1], dtype=torch.int32)
    out = mla.run(
        q, kv, idx, torch.zeros(4), 1.0, extra_kv=kv, extra_indices=idx, extra_lengths=counts
    )
    assert out.shape == (3, 4, 8) and fake.calls[-1]["tile_scheduler_metadata"] is warm
    got = fake.calls[-1]["extra_topk_length"]
    assert (got if got is None else got.tolist()) == handed
    mla.after_warmup()
    assert (mla.sched is warm) is kept


@pytest.mark.parametrize(
    ("pages", "bs", "static"),
    # c128 lists of 64 / 192 / 8192 entries (1M tokens) over two HCA layers (tiny)
    [(4, 2, True), (160, 2, True), (4, 128, True), (8192, 2, False), (160, 128, False)],
)
def test_decode_plan_keeps_flashmla_schedules_static_but_long_hca(
    tiny_cfg, monkeypatch, pages, bs, static
):
    """One FlashMLA schedule launch per step at most: SWA, CSA and HCA lists cheaper to walk
    than a schedule launch static, longer HCA lists per step."""
    import sglang_dsv4.attention.decode_kernels as dk

    monkeypatch.setattr(dk, "load_flashmla", _FakeMLA)
    monkeypatch.setattr(dk, "pick", lambda *a: dk.FLASHMLA)
    world = World(tiny_cfg, "cpu", torch.bfloat16, EntryFormat.FP8, EntryFormat.FP8)
    cfg = tiny_cfg
    ops = DecodeKernels(
        world.pool.schema, cfg.num_heads, cfg.index_topk, cfg.index_n_heads, "cpu", flashmla=True
    )
    assert len(world.pool.schema.layers_of(AttnKind.HCA)) == 2  # the costs above assume it
    plan = ops.plan(bs, pages)
    assert {k: v.lengths for k, v in plan.attn.items()} == {
        AttnKind.SWA: False,
        AttnKind.CSA: False,
        AttnKind.HCA: not static,
    }


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("kind", "width"),
    # the c128 list of a 16K / a 33792-token context (static since static_hca_schedule)
    [(AttnKind.CSA, 512), (AttnKind.HCA, 128), (AttnKind.HCA, 320)],
    ids=["csa", "hca-128", "hca-320"],
)
@pytest.mark.parametrize("batch", [1, 5, 64])
def test_flashmla_static_schedule_equals_per_step_counts(kind, width, batch):
    """A c4 top-k list (512) / a c128 list of 128 or 320 entries without its counts
    (static schedule, kept from an eager run across a graph capture) gives the outputs of the
    per-step schedule from the counts, at Flash dims, for counts from 1 to the list width (-1
    past each count)."""
    from sglang_dsv4.attention.choice import flashmla_eligible
    from sglang_dsv4.attention.decode_kernels import FlashMLADecode, load_flashmla

    cfg = _flash_dims()
    if not flashmla_eligible(True, cfg.num_heads, cfg.head_dim, "cuda"):
        pytest.skip("FlashMLA's sparse decode needs sm90")
    gen = torch.Generator(device="cuda").manual_seed(batch)
    world = World(cfg, "cuda", torch.bfloat16, EntryFormat.FP8, EntryFormat.FP8)
    lk = next(x for x in world.pool.layers if x.kind is kind)
    n_swa, d = world.pool.n_swa_slots + BLOCK, cfg.head_dim
    topk = cfg.index_topk if kind is AttnKind.CSA else width
    lk.write_raw(torch.arange(n_swa, device="cuda"), torch.randn(n_swa, d, device="cuda"))
    per_page = lk.entry_rows.rows_per_page
    n_rows = lk.entries.shape[0] * per_page
    lk.write_entries(torch.arange(n_rows, device="cuda"), torch.randn(n_rows, d, device="cuda"))
    window = torch.randint(BLOCK, n_swa, (batch, cfg.sliding_window), device="cuda", generator=gen)
    window[0, :5] = -1
    window = window.int()

    def step():
        rows = torch.randint(per_page, n_rows, (batch, topk), device="cuda", generator=gen)
        counts = torch.randint(1, topk + 1, (batch,), device="cuda", generator=gen)
        counts[0] = topk
        ids = torch.arange(topk, device="cuda")
        rows = torch.where(ids < counts[:, None], rows, -1).int()
        q = torch.randn(batch, cfg.num_heads, d, device="cuda", generator=gen).bfloat16()
        return q, rows, counts.int()

    sink = torch.randn(cfg.num_heads, device="cuda", generator=gen)
    scale, pages = d**-0.5, lk.raw_pages()
    q, rows, counts = step()
    static = FlashMLADecode(load_flashmla(), d, lengths=False)
    static.plan()
    kw = {"extra_kv": lk.entry_pages()}
    static.run(q, pages, window, sink, scale, extra_indices=rows, **kw)  # the eager warm-up
    static.after_warmup()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = static.run(q, pages, window, sink, scale, extra_indices=rows, **kw)
    for _ in range(2):  # new queries, lists and counts under the kept schedule
        q_new, rows_new, counts_new = step()
        q.copy_(q_new), rows.copy_(rows_new), counts.copy_(counts_new)
        out.fill_(float("nan"))
        graph.replay()
        per_step = FlashMLADecode(load_flashmla(), d, lengths=True)
        per_step.plan()
        want = per_step.run(
            q, pages, window, sink, scale, extra_indices=rows, extra_lengths=counts, **kw
        ).float()
        torch.cuda.synchronize()
        rel = (out.float() - want).norm() / want.norm()
        assert torch.isfinite(out).all() and rel <= 5e-3, f"static vs per-step rel L2 {rel:.2e}"


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_build_meta_kernel_equals_twin(tiny_cfg, device):
    """``DecodeKernels.build_meta`` (one launch) == ``DecodeTorch.build_meta`` on the world's
    decode step with padded rows: every ``DecodeMeta`` field and the advanced ``tail_pos``."""
    cfg = tiny_cfg
    world = World(cfg, device, torch.bfloat16, EntryFormat.FP8, EntryFormat.FP8)
    step = _decode_inputs_of_step(world, device)
    pool = world.pool
    ops = DecodeKernels(
        pool.schema, cfg.num_heads, cfg.index_topk, cfg.index_n_heads, device, flashmla=False
    )
    got_tail, want_tail = pool.tail_pos.clone().fill_(-3), pool.tail_pos.clone().fill_(-3)
    args = (*step, world.req_to_token, pool.full_to_swa_index_mapping, pool.spare_tail_row)
    kw = {"window": cfg.sliding_window, "block": BLOCK, "n_pages": N_PAGES}
    want = DecodeTorch().build_meta(*args, want_tail, **kw)
    got = ops.build_meta(*args, got_tail, **kw)
    for f in dataclasses.fields(want):
        assert torch.equal(getattr(got, f.name), getattr(want, f.name)), f.name
    assert torch.equal(got_tail, want_tail) and (want_tail >= 0).any()


def test_static_hca_schedule_from_the_measured_costs():
    """The walk of a whole list against one schedule launch: longer lists, more HCA layers and
    larger batches (throughput-bound walks) all tip it to the per-step schedule."""
    from sglang_dsv4.attention.decode_kernels import static_hca_schedule

    assert static_hca_schedule(264, 1, 1)  # 32K context, the Flash-dims checkpoint
    assert static_hca_schedule(6400, 1, 1) and not static_hca_schedule(8192, 1, 1)  # 1M
    assert static_hca_schedule(264, 21, 1) and not static_hca_schedule(528, 21, 1)
    assert static_hca_schedule(264, 1, 128) and not static_hca_schedule(528, 1, 128)
