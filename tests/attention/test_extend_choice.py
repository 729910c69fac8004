"""``attention.extend_choice``: the FlashMLA extend path's workspace (entries, then window rows,
gathered / dequantized per batch) and index lists give the twin's attention, every layer kind,
bf16 and FP8 rows: on CPU with FlashMLA's sparse prefill replaced by the ``ref`` softmax over
the same workspace and lists (and the FP8 dequant by the pools' reader), so the host plan, the
gathers and the c4 id rebasing are what is tested; the GPU test runs FlashMLA itself. Also the
per-shape choice."""

import sys
from pathlib import Path

import pytest
import torch
from pool_world import World, inputs

from sglang_dsv4.attention import extend_choice
from sglang_dsv4.attention.extend_ops import AttendTorch, ExtendOps, extend_ops
from sglang_dsv4.attention.plan import plan_batch
from sglang_dsv4.attention.wrappers import CSAWrapper, HCAWrapper, SWAWrapper
from sglang_dsv4.config import AttnKind
from sglang_dsv4.mem.schema import EntryFormat
from sglang_dsv4.ref.attention import sparse_attention

STEPS = [[(0, 0, 131), (1, 0, 131)], [(0, 131, 300), (2, 0, 5)], [(3, 256, 301), (1, 131, 140)]]


def _fake_fwd(q, kv, indices, scale, d_v, sink, lengths):
    """FlashMLA's sparse prefill contract, in the ``ref`` math."""
    return sparse_attention(q, kv[:, 0], indices[:, 0].long(), sink, scale), None, None


def _flashmla(ratio, window, lk, topk):
    """FlashMLA's op with its sparse prefill's ``ref`` twin (no sgl_kernel on CPU); the
    workspace gather is the Triton kernel (interpreted)."""
    entry_page = lk.entry_rows.rows_per_page if lk.entry_rows is not None else 1
    raw_page, dim = lk.raw_rows.rows_per_page, lk.raw_rows.dim
    return extend_choice.AttendFlashMLA(
        ratio, window, lk.fp8, raw_page, entry_page, dim, topk, fwd=_fake_fwd
    )


def _run(cfg, weights, layer, fmt, flashmla: bool):
    spec = cfg.layers[layer]
    gen = torch.Generator().manual_seed(3 + layer)
    world = World(cfg, "cpu", torch.bfloat16, fmt, fmt)
    world.req_to_token[3, :256] = world.req_to_token[0, :256]
    lk = world.pool.layer(layer)
    twin = extend_ops(spec.attn.value, lk, window=cfg.sliding_window, n_heads=cfg.num_heads,
                      index_heads=cfg.index_n_heads, topk=cfg.index_topk, device="cpu",
                      kernels=False)  # fmt: skip
    attend = AttendTorch()
    if flashmla:
        attend = _flashmla(spec.attn.value, cfg.sliding_window, lk, cfg.index_topk)
    ops = ExtendOps(twin.store, attend, twin.flush, twin.index_flush, twin.picks)
    cls = {AttnKind.SWA: SWAWrapper, AttnKind.CSA: CSAWrapper, AttnKind.HCA: HCAWrapper}
    w = cls[spec.attn](cfg.sliding_window, ops)
    if spec.attn is AttnKind.CSA:
        w.topk = cfg.index_topk
    sink = torch.randn(cfg.num_heads, generator=gen)
    outs = []
    for step in STEPS:
        reqs, prefix, seq = (list(x) for x in zip(*step, strict=True))
        fb = world.batch(reqs, prefix, seq, decode=False)
        q, kv, comp = inputs(cfg, weights, spec, int(fb.out_cache_loc.numel()), gen)
        w.plan(plan_batch(fb, world.pool, world.rtp))
        outs.append(w.run(lk, q.bfloat16(), kv, sink, cfg.head_dim**-0.5, comp).float())
    return outs


@pytest.mark.parametrize("layer", [0, 2, 3])
@pytest.mark.parametrize("fmt", [EntryFormat.BF16, EntryFormat.FP8])
def test_flashmla_workspace_and_lists_equal_twin(tiny_cfg, tiny_weights, layer, fmt):
    want = _run(tiny_cfg, tiny_weights, layer, fmt, flashmla=False)
    got = _run(tiny_cfg, tiny_weights, layer, fmt, flashmla=True)
    for g, w in zip(got, want, strict=True):
        assert not g.isnan().any()
        # same rows, same softmax: only summation order differs (a wrong or missing row moves
        # it by >1e-2); 1e-4, not 1e-5: CPU bf16 matmul kernels differ by machine (2.2e-5 seen on
        # a 2026-12-06 CI machine)
        assert ((g - w).norm() / w.norm()).item() <= 1e-4


def _bench_extend():
    """``scripts/bench_extend.py``, whose ``compare_attend`` the GPU test runs."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
    import bench_extend

    return bench_extend


@pytest.mark.parametrize("layer", [2, 3])
def test_compare_attend_gives_ours_its_entries(tiny_cfg, tiny_weights, monkeypatch, layer):
    """The GPU test's harness (``bench_extend.attend_both``) with FlashMLA serving the batch,
    as at Flash dims for its 2x1000+300 (c128: the wrapper then builds no visible-entry rows,
    FlashMLA planning its own lists): ours is still given the layer's entries, so both read
    the same keys (CPU: FlashMLA's sparse prefill by its ``ref`` twin)."""
    monkeypatch.setattr(extend_choice, "pick", lambda *args: extend_choice.FLASHMLA)
    cfg, spec = tiny_cfg, tiny_cfg.layers[layer]
    world = World(cfg, "cpu", torch.bfloat16, EntryFormat.FP8, EntryFormat.FP8)
    lk = world.pool.layer(layer)
    twin = extend_ops(spec.attn.value, lk, window=cfg.sliding_window, n_heads=cfg.num_heads,
                      index_heads=cfg.index_n_heads, topk=cfg.index_topk, device="cpu",
                      kernels=False)  # fmt: skip
    flashmla = _flashmla(spec.attn.value, cfg.sliding_window, lk, cfg.index_topk)
    att = extend_choice.AttendChoice(spec.attn.name.lower(), cfg.num_heads, cfg.sliding_window,
                                     AttendTorch(), flashmla)  # fmt: skip
    ops = ExtendOps(twin.store, att, twin.flush, twin.index_flush, twin.picks)
    if spec.attn is AttnKind.CSA:
        w = CSAWrapper(cfg.sliding_window, ops, topk=cfg.index_topk)
    else:
        w = HCAWrapper(cfg.sliding_window, ops)
    gen = torch.Generator().manual_seed(5)
    sink, scale = torch.randn(cfg.num_heads, generator=gen), cfg.head_dim**-0.5
    got = want = None
    for reqs, prefix, seq in (([0, 1], [0, 0], [131, 131]), ([0, 1], [131, 131], [300, 260])):
        fb = world.batch(reqs, prefix, seq, decode=False)
        q, kv, comp = inputs(cfg, tiny_weights, spec, int(fb.out_cache_loc.numel()), gen)
        batch = plan_batch(fb, world.pool, world.rtp)
        got, want = _bench_extend().attend_both(w, lk, batch, q.bfloat16(), kv, sink, scale, comp)
    assert att.choice == extend_choice.FLASHMLA
    assert ((got.float() - want.float()).norm() / want.float().norm()).item() <= 1e-4


def test_pick(monkeypatch):
    rows = (("csa", 64, 4096, 640, 2.0, 1.0), ("csa", 64, 131072, 640, 10.0, 20.0))
    monkeypatch.setattr(extend_choice, "MEASURED", rows)
    assert extend_choice.pick("csa", 64, 8192, 640, True) == extend_choice.FLASHMLA
    assert extend_choice.pick("csa", 64, 65536 * 2, 640, True) == extend_choice.OURS
    assert extend_choice.pick("csa", 64, 8192, 640, False) == extend_choice.OURS
    assert extend_choice.pick("hca", 64, 8192, 640, True) == extend_choice.OURS  # unmeasured


@pytest.mark.gpu
@pytest.mark.parametrize("kind,fmt", [("csa", "fp8"), ("hca", "fp8"), ("swa", "bf16")])
def test_gpu_flashmla_extend_equals_ours(kind, fmt):
    """FlashMLA's sparse prefill over the workspace vs ours over the pools, at Flash dims."""
    got, want = _bench_extend().compare_attend(kind, fmt, b=2, n=1000, prefix=300)
    rel = ((got.float() - want.float()).norm() / want.float().norm()).item()
    assert rel <= 1e-2, f"rel L2 {rel:.2e}"
