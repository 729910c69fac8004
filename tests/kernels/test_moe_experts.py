"""``kernels.moe_experts`` (slot and sorted forms; dense, FP8, MXFP4 and NVFP4 banks; shared
expert as a bank row) against :class:`~sglang_dsv4.ref.moe.DenseExperts` +
:func:`~sglang_dsv4.ref.moe.swiglu` over the same (dequantized) weights, in fp32.

CPU: interpreted, fp32, small and odd shapes (I not a multiple of 128: w3's FP8 scale rows start
mid-bank). GPU: Flash dims (d 4096, I 1024 / 2048, E 16 / 256, k 6 / 8) in bf16, and CUDA-graph
replay on new routing equals eager. Outputs are NaN-poisoned before every launch. The sorted
form at every tile of ``kernels.moe_sorted_tiles`` (defaults, candidates): interpreted in fp32 and
bf16, and on the GPU at an 8K-token prefill of the served shape.
"""

import importlib

import pytest
import torch
import triton.language as tl

from sglang_dsv4.kernels.slot_sum import slot_sum_torch
from sglang_dsv4.ref.moe import DenseExperts, swiglu
from sglang_dsv4.ref.weight_quant import (
    fp8_block_dequant,
    fp8_block_quant,
    mxfp4_dequant,
    mxfp4_quant,
    nvfp4_dequant,
    nvfp4_quant,
)

K = importlib.import_module("sglang_dsv4.kernels.moe_experts")  # CPU: interpreted (conftest)
S = importlib.import_module("sglang_dsv4.kernels.moe_sorted")
ST = importlib.import_module("sglang_dsv4.kernels.moe_sorted_tiles")
GPU = torch.cuda.is_available()
FORMS = {"slots": K.moe_experts_slots, "sorted": S.moe_experts_sorted}
LIMIT = 10.0


def rel_l2(out, ref) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm().clamp(min=1e-30)).item()


def quantize(w: torch.Tensor, fmt: str):
    """One expert's weight [N, K] -> (codes, scale, global scale, fp32 dequantized)."""
    if fmt == "fp8":
        q, sc = fp8_block_quant(w)
        return q, sc, None, fp8_block_dequant(q, sc, torch.float32)
    if fmt == "mxfp4":
        q, sc = mxfp4_quant(w)
        return q.view(torch.uint8), sc.view(torch.uint8), None, mxfp4_dequant(q, sc)
    q, sc, gs = nvfp4_quant(w)
    return q.view(torch.uint8), sc.view(torch.uint8), gs.float(), nvfp4_dequant(q, sc, gs)


def make_bank(rows, d, inter, fmt, device, dtype, seed=0):
    """Random bank -> (ExpertWeights, fp32 dense (w1, w2, w3) [R, ...] of the same values)."""
    g = torch.Generator(device=device).manual_seed(seed)
    w1, w3 = (torch.randn(rows, inter, d, device=device, generator=g) * d**-0.5 for _ in "13")
    w2 = torch.randn(rows, d, inter, device=device, generator=g) * inter**-0.5
    if fmt == "dense":
        bank = K.ExpertWeights.stacked(torch.cat([w1, w3], dim=1).to(dtype), w2.to(dtype))
        return bank, (w1.to(dtype).float(), w2.to(dtype).float(), w3.to(dtype).float())
    projs, dense = {}, {}
    for k, w in (("w1", w1), ("w3", w3), ("w2", w2)):
        parts = list(zip(*(quantize(w[e], fmt) for e in range(rows)), strict=True))
        gs = None if parts[2][0] is None else torch.stack(parts[2])
        projs[k] = K.Proj(torch.stack(parts[0]), torch.stack(parts[1]), gs)
        dense[k] = torch.stack(parts[3])
    if fmt == "fp8":  # as the served model stores it: one w13 tensor
        w13 = torch.cat([projs["w1"].w, projs["w3"].w], dim=1)
        s13 = torch.cat([projs["w1"].scale, projs["w3"].scale], dim=1)
        bank = K.ExpertWeights.stacked(w13, projs["w2"].w, s13, projs["w2"].scale)
    else:
        bank = K.ExpertWeights(projs["w1"], projs["w3"], projs["w2"], fmt)
    return bank, (dense["w1"], dense["w2"], dense["w3"])


def routing(t, n_exp, topk, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    chosen = torch.stack([torch.randperm(n_exp, generator=g)[:topk] for _ in range(t)])
    if t > 2:
        chosen[: t // 2, 0] = 1  # a crowded expert; other ids absent from every row
    weights = torch.rand(t, topk, generator=g)
    return chosen.to(device, torch.int32), weights.to(device)


def reference(x, chosen, weights, dense, n_exp, shared):
    w1, w2, w3 = dense
    x = x.float()
    out = DenseExperts(w1[:n_exp], w2[:n_exp], w3[:n_exp])(x, chosen.long(), weights, LIMIT)
    if shared:
        out = out + swiglu(x, w1[n_exp], w2[n_exp], w3[n_exp], LIMIT)
    return out


def run(form, x, chosen, weights, bank, shared_row):
    out = torch.full_like(x, float("nan"))
    y = FORMS[form](x, chosen, weights, bank, LIMIT, shared_row, out=out)
    assert y is out or torch.equal(y, out)
    return out


# every form x format x shared / routed; the slow-to-interpret FP4 decode at one size. The slot
# form runs one program per (token, slot): 3 x 2 keeps an odd token count at a third of 7 x 3's
# interpreter time (7 x 3 took 30-65 s a case on the CI's cores)
CASES = [
    (form, fmt, shared, t, topk)
    for form in FORMS
    for fmt in K.FORMATS
    for shared in (True, False)
    for t, topk in ((1, 2), (3, 2) if form == "slots" else (7, 3))
    if not (fmt.endswith("fp4") and t == 1)
]


@pytest.mark.parametrize(("form", "fmt", "shared", "t", "topk"), CASES)
def test_experts_interpreted(form, fmt, shared, t, topk):
    if GPU:
        pytest.skip("interpreter shapes; the GPU tests cover real shapes")
    n_exp, d = 6, 192
    inter = 128 if fmt.endswith("fp4") else 160  # FP4 K tiles: multiples of 64
    bank, dense = make_bank(n_exp + shared, d, inter, fmt, "cpu", torch.float32)
    x = torch.randn(t, d) * 3  # large enough for the clamp to bite
    chosen, weights = routing(t, n_exp, topk, "cpu")
    got = run(form, x, chosen, weights, bank, n_exp if shared else None)
    want = reference(x, chosen, weights, dense, n_exp, shared)
    assert not got.isnan().any() and rel_l2(got, want) <= 1e-5


# every tile a sorted launch may use: today's by pair count (both kernels), each kernel's
# candidates (the other kernel at today's large-T tile: a w2 tile may not fit the w13 kernel)
SORTED_CASES = [("both", t) for _, t in ST.DEFAULT]
SORTED_CASES += [(k, t) for k, ts in ST.CANDIDATES.items() for t in ts if t != ST.GemmTiles(64)]


def case_tiles(kernel: str, tile):
    other = ST.GemmTiles(64)
    return ST.SortedTiles(other if kernel == "w2" else tile, other if kernel == "w13" else tile)


@pytest.fixture
def bf16_dot(monkeypatch):
    """Triton 3.6's interpreter multiplies bf16 ``tl.dot`` operands as their raw uint16 bits
    (``create_dot`` widens only 8-bit floats; the sorted form's bf16 output was ~1e10 off on
    main too): widen them to fp32 first, as the tensor cores multiply bf16 exactly."""
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    dot = builder.create_dot

    def widened(self, a, b, d, *args):
        a, b = (self.cast_impl(v, tl.float32) if v.dtype == tl.bfloat16 else v for v in (a, b))
        return dot(self, a, b, d, *args)

    monkeypatch.setattr(builder, "create_dot", widened)


# bf16 (the served dtype) at every tile; fp32 (the tight bound) at the default tiles only: each
# case takes 7-28 s interpreted on the CI's cores
TILE_DTYPES = [(k, t, torch.bfloat16) for k, t in SORTED_CASES]
TILE_DTYPES += [(k, t, torch.float32) for k, t in SORTED_CASES if k == "both"]


@pytest.mark.parametrize(("kernel", "tile", "dtype"), TILE_DTYPES, ids=str)
def test_sorted_every_tile_matches_twin_interpreted(kernel, tile, dtype, bf16_dot):
    """Each tile (M block up to 128, N up to 256, both rasters) for its kernel: the twin's
    numbers, with a crowded expert spanning several M blocks (300 tokens -> 150 + 300
    pairs on two rows) and N / K tails (d 192, I 160 are not multiples of the tiles)."""
    if GPU:
        pytest.skip("interpreter shapes; the GPU tests cover real shapes")
    n_exp, d, inter, t = 6, 192, 160, 300
    bank, dense = make_bank(n_exp + 1, d, inter, "dense", "cpu", dtype)
    x = (torch.randn(t, d) * 3).to(dtype)
    chosen, weights = routing(t, n_exp, 2, "cpu")
    out = torch.full_like(x, float("nan"))
    S.moe_experts_sorted(x, chosen, weights, bank, LIMIT, n_exp, out, case_tiles(kernel, tile))
    err = rel_l2(out, reference(x, chosen, weights, dense, n_exp, True))
    assert not out.isnan().any() and err <= (1e-5 if dtype == torch.float32 else 1e-2), err


def test_sorted_raster_order_does_not_change_numbers_interpreted():
    """N tiles or M blocks as the fast grid axis: the same programs, the same bits."""
    if GPU:
        pytest.skip("interpreter shapes")
    bank, _ = make_bank(7, 192, 160, "fp8", "cpu", torch.float32)
    x = torch.randn(40, 192) * 3
    chosen, weights = routing(40, 6, 2, "cpu")
    outs = []
    for n_fast in (False, True):
        tile = ST.GemmTiles(16, 64, 64, 4, 2, n_fast)
        outs.append(S.moe_experts_sorted(x, chosen, weights, bank, LIMIT, 6,
                                         tiles=ST.SortedTiles(tile, tile)))  # fmt: skip
    assert not outs[0].isnan().any() and torch.equal(*outs)


def test_sorted_slot_sum_rounds_once_like_the_fp32_sum():
    """The slot sum into out (bf16) equals the fp32 sum rounded once, as before (no fp32
    intermediate)."""
    x, chosen = torch.zeros(5, 8).bfloat16(), torch.zeros(5, 2, dtype=torch.int32)
    bank = K.ExpertWeights.stacked(torch.zeros(3, 32, 8), torch.zeros(3, 8, 16))
    launch = S._SortedLaunch(x, chosen, torch.ones(5, 2), bank, 2)
    y = (torch.randn(5 * 3, 8) * 100).bfloat16()
    out = torch.full_like(x, float("nan"))
    launch.slot_sum(y, out)
    assert torch.equal(out, y.view(5, 3, 8).sum(dim=1, dtype=torch.float32).bfloat16())


@pytest.mark.parametrize("fmt", ["mxfp4", "fp8"])
def test_operands_are_the_bank_bytes_without_dtype_views(fmt):
    """The kernels' operands: FP4 banks' uint8 codes and scales as stored (no dtype view per
    call), FP8 banks' e4m3 weights as stored and their e8m0 scales as bytes (same storage)."""
    bank, _ = make_bank(3, 64, 32, fmt, "cpu", torch.float32)
    for proj in bank[:3]:
        w, scale, _ = bank.operands(proj)
        assert scale.dtype == torch.uint8 and scale.data_ptr() == proj.scale.data_ptr()
        if fmt == "mxfp4":
            assert proj.w.dtype == torch.uint8 and w is proj.w and scale is proj.scale
        else:
            assert w is proj.w and proj.scale.dtype != torch.uint8


# the slot form interpreted takes ~2.5 min a case at 3 tokens on the CI's cores: bf16 (the served
# dtype) at 2 tokens only
@pytest.mark.parametrize(
    ("form", "t", "dtype"),
    [("slots", 2, torch.bfloat16), ("sorted", 7, torch.float32), ("sorted", 7, torch.bfloat16)],
    ids=["slots-2-bf16", "sorted-7-fp32", "sorted-7-bf16"],
)
def test_shared_bank_alone_then_added_in_the_slot_sum_interpreted(form, t, dtype, bf16_dot):
    """A shared expert in a bank of its own (FP8 next to a dense routed bank): run alone
    (``chosen`` None; sorted: the identity grouping, no grouping launch, no slot sum) it equals
    the bank with top-k 0 through the grouping (the bits, up to the sign of zeros the slot sum
    made +0); its rows as ``add`` (and in the slot form the bank itself as ``shared``: one more
    program per token in the same two launches) give the bits of routed + shared in torch
    (bf16: the rounding of the sum, then of the add)."""
    if GPU:
        pytest.skip("interpreter shapes; the GPU tests cover real shapes")
    n_exp, d, inter = 6, 192, 160
    routed, _ = make_bank(n_exp, d, inter, "dense", "cpu", dtype)
    shared, _ = make_bank(1, d, 2 * inter, "fp8", "cpu", dtype, seed=1)
    x = (torch.randn(t, d) * 3).to(dtype)
    chosen, weights = routing(t, n_exp, 2, "cpu")
    fn = FORMS[form]
    alone = fn(x, None, None, shared, LIMIT, 0, out=torch.full_like(x, float("nan")))
    grouped = fn(x, chosen[:, :0], weights[:, :0], shared, LIMIT, 0)
    assert not alone.isnan().any() and torch.equal(alone + 0.0, grouped)
    before = fn(x, chosen, weights, routed, LIMIT) + grouped
    out = torch.full_like(x, float("nan"))
    got = fn(x, chosen, weights, routed, LIMIT, out=out, add=alone)
    assert got is out and torch.equal(got.view(torch.uint8), before.view(torch.uint8))
    if form == "slots":  # the shared bank in the routed call's two launches: the same bits
        both = fn(x, chosen, weights, routed, LIMIT, out=torch.full_like(x, float("nan")),
                  shared=shared)  # fmt: skip
        assert torch.equal(both.view(torch.uint8), before.view(torch.uint8))
        # each bank keeps the tiles of a call of its own (here different K and N tiles)
        ta, tb = K.SlotTiles(8, 64, 4, 64), K.SlotTiles(4, 128, 4, 128)
        want = fn(x, chosen, weights, routed, LIMIT, tiles=ta) + fn(
            x, None, None, shared, LIMIT, 0, tiles=tb
        )
        got = fn(x, chosen, weights, routed, LIMIT, tiles=ta, shared=shared, shared_tiles=tb)
        assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))
        with pytest.raises(ValueError, match="one launch"):
            fn(x, chosen, weights, routed, LIMIT, tiles=ta, shared=shared,
               shared_tiles=tb._replace(block_d=8))  # fmt: skip
    with pytest.raises(ValueError, match="add"):
        fn(x, chosen, weights, routed, LIMIT, add=alone[:1])
    with pytest.raises(ValueError, match="nothing to run"):
        fn(x, None, None, routed, LIMIT)


def test_bank_shape_errors_are_clear():
    bank = K.ExpertWeights.stacked(torch.zeros(2, 64, 32), torch.zeros(2, 32, 16))
    with pytest.raises(ValueError, match="bank w1"):
        K.moe_experts_slots(torch.zeros(1, 32), torch.zeros(1, 1, dtype=torch.int32),
                            torch.ones(1, 1), bank, LIMIT)  # fmt: skip
    w = torch.zeros(2, 32, 32).to(torch.float8_e4m3fn)
    fp8 = K.ExpertWeights(K.Proj(w), K.Proj(w), K.Proj(w), "fp8")
    with pytest.raises(ValueError, match="scales"):
        fp8.check(32)
    with pytest.raises(ValueError, match="format"):
        K.ExpertWeights(K.Proj(w), K.Proj(w), K.Proj(w), "int4").check(32)


# ---- GPU ---------------------------------------------------------------------------------

FLASH = [(16, 1024, 6), (256, 2048, 8)]  # (experts, inter, top-k)


@pytest.mark.gpu
@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("fmt", list(K.FORMATS))
@pytest.mark.parametrize(("n_exp", "inter", "topk"), FLASH)
@pytest.mark.parametrize("t", [1, 32, 300])
def test_experts_gpu_flash_dims(form, fmt, n_exp, inter, topk, t):
    """bf16 activations against the fp32 twin on the same (bf16 / FP8) weights. E 256 x I 2048
    keeps 64 experts in the bank (+ shared) so the fp32 copies fit; ids cover all of them."""
    rows = min(n_exp, 64)
    bank, dense = make_bank(rows + 1, 4096, inter, fmt, "cuda", torch.bfloat16)
    x = torch.randn(t, 4096, device="cuda").bfloat16() * 2
    chosen, weights = routing(t, rows, topk, "cuda")
    got = run(form, x, chosen, weights, bank, rows)
    want = reference(x, chosen, weights, dense, rows, True)
    err = rel_l2(got, want)
    assert not got.isnan().any() and err <= 1e-2, f"rel L2 {err:.2e}"


@pytest.mark.gpu
@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("fmt", list(K.FORMATS))
def test_experts_gpu_graph_replay_equals_eager(form, fmt):
    """Captured once (4 tokens, Flash dims, 16 experts + shared), replayed on new tokens and new
    routing (two tokens on the same experts) equals eager: no host sync, no shape from data."""
    t, n_exp, topk = 4, 16, 6
    bank, _ = make_bank(n_exp + 1, 4096, 1024, fmt, "cuda", torch.bfloat16)
    x = torch.randn(t, 4096, device="cuda").bfloat16()
    chosen, weights = routing(t, n_exp, topk, "cuda")
    fn = FORMS[form]
    fn(x, chosen, weights, bank, LIMIT, n_exp)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = fn(x, chosen, weights, bank, LIMIT, n_exp)
    for seed in range(3):
        x.copy_(torch.randn_like(x))
        new_c, new_w = routing(t, n_exp, topk, "cuda", seed=seed + 1)
        new_c[0] = new_c[1]
        chosen.copy_(new_c)
        weights.copy_(new_w)
        static.fill_(float("nan"))
        graph.replay()
        eager = fn(x, chosen, weights, bank, LIMIT, n_exp)
        assert not static.isnan().any() and torch.equal(static, eager)


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", list(K.FORMATS))
@pytest.mark.parametrize("t", [1, 2, 3, 5, 8])
def test_slots_gpu_served_dims_small_batches(fmt, t):
    """The served Flash-dims layer (16 experts of 1024, top-2, shared row) in the slot form at
    the decode batch sizes whose tiles differ (:func:`slot_tiles`), odd T included."""
    bank, dense = make_bank(17, 4096, 1024, fmt, "cuda", torch.bfloat16)
    x = torch.randn(t, 4096, device="cuda").bfloat16() * 2
    chosen, weights = routing(t, 16, 2, "cuda")
    got = run("slots", x, chosen, weights, bank, 16)
    err = rel_l2(got, reference(x, chosen, weights, dense, 16, True))
    assert not got.isnan().any() and err <= 1e-2, f"rel L2 {err:.2e}"


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", list(K.FORMATS))
@pytest.mark.parametrize(
    ("block_n", "block_k", "warps", "unroll"), [(4, 512, 4, 2), (8, 2048, 8, 1), (32, 64, 4, 4)]
)
def test_slots_gpu_every_swept_tile_is_exact(fmt, block_n, block_k, warps, unroll):
    """Tiles ``scripts/bench_moe.py --sweep`` may pick (N tile 4 ... 32, K tile 64 ... 2048,
    FP8 K tiles across several 128-column scale blocks) give the same numbers."""
    bank, dense = make_bank(17, 4096, 1024, fmt, "cuda", torch.bfloat16)
    x = torch.randn(3, 4096, device="cuda").bfloat16() * 2
    chosen, weights = routing(3, 16, 2, "cuda")
    tiles = K.SlotTiles(block_n, block_k, block_n, min(block_k, 1024), warps, unroll)
    out = torch.full_like(x, float("nan"))
    K.moe_experts_slots(x, chosen, weights, bank, LIMIT, 16, out=out, tiles=tiles)
    err = rel_l2(out, reference(x, chosen, weights, dense, 16, True))
    assert not out.isnan().any() and err <= 1e-2, f"rel L2 {err:.2e}"


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["dense", "fp8"])
@pytest.mark.parametrize(("kernel", "tile"), SORTED_CASES, ids=str)
def test_sorted_gpu_served_prefill_every_tile(fmt, kernel, tile):
    """The served Flash-dims layer (16 experts of 1024, top-2, shared row) at an 8K-token
    prefill (24,576 pairs) with each tile for its kernel: the twin's numbers, and the table's
    tiles give the same up to the fp32 accumulation order."""
    t = 8192
    bank, dense = make_bank(17, 4096, 1024, fmt, "cuda", torch.bfloat16)
    x = torch.randn(t, 4096, device="cuda").bfloat16() * 2
    chosen, weights = routing(t, 16, 2, "cuda")
    out = torch.full_like(x, float("nan"))
    S.moe_experts_sorted(x, chosen, weights, bank, LIMIT, 16, out, case_tiles(kernel, tile))
    want = reference(x, chosen, weights, dense, 16, True)
    err = rel_l2(out, want)
    assert not out.isnan().any() and err <= 1e-2, f"rel L2 {err:.2e}"
    picked = S.moe_experts_sorted(x, chosen, weights, bank, LIMIT, 16)  # the table's tiles
    assert rel_l2(picked, out) <= 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize(("topk", "shared"), [(2, True), (6, True), (2, False)])
def test_sorted_gpu_slot_sum_same_bits_as_torch_sum(topk, shared):
    """The sorted form's slot sum (``kernels.slot_sum``) on the expert outputs of an 8K-token
    prefill (16 experts of 1024; S = top-k + shared row) has the bits of torch's sum it
    replaced."""
    t = 8192
    bank, _ = make_bank(17, 4096, 1024, "fp8", "cuda", torch.bfloat16)
    x = torch.randn(t, 4096, device="cuda").bfloat16() * 2
    chosen, weights = routing(t, 16, topk, "cuda")
    launch = S._SortedLaunch(x, chosen, weights, bank, 16 if shared else None)
    tiles = ST.sorted_tiles(launch.pairs, launch.key)
    h = torch.empty(launch.pairs, 1024, device="cuda", dtype=x.dtype)
    y = torch.empty(launch.pairs, 4096, device="cuda", dtype=x.dtype)
    launch.w13(h, LIMIT, tiles.w13)
    launch.w2(h, y, tiles.w2)
    got, want = torch.full_like(x, float("nan")), torch.full_like(x, float("nan"))
    launch.slot_sum(y, got)
    slot_sum_torch(y, want)
    assert not want.isnan().any() and torch.equal(got.view(torch.int16), want.view(torch.int16))
