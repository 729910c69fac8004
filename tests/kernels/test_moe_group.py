"""``kernels.moe_group`` against its twin (``cat`` + ``torch.sort(stable=True)`` +
``searchsorted``, the ops it replaced): order, offsets and weights bit for bit, outputs poisoned
first (order / offsets -7, weights NaN).

CPU: interpreted, T 1 ... 300, k 0 ... 9, R 16 / 17 / 257, with and without the shared row,
routings with ties (every pair on one expert), unused experts, int32 / int64 ids, fp32 / bf16
weights, the one-program form and the chunked form at several chunk sizes; the sorted MoE call
with either grouping gives the same bits. GPU: served shapes (T 1, 32, 128, 8192; R 16 + shared,
256, 384; k 2, 6, 8) at every chunk size, CUDA-graph replay on new routing, no host sync, and
the whole sorted MoE call (bf16, FP8) bit for bit as with the torch grouping.
"""

import importlib

import pytest
import torch

from sglang_dsv4.ref.weight_quant import fp8_block_quant

G = importlib.import_module("sglang_dsv4.kernels.moe_group")  # CPU: interpreted (conftest)
K = importlib.import_module("sglang_dsv4.kernels.moe_experts")
S = importlib.import_module("sglang_dsv4.kernels.moe_sorted")
GPU = torch.cuda.is_available()


def routing(t, k, n_exp, kind="random", device="cpu", dtype=torch.int32, seed=0):
    """(chosen [T, k], weights fp32 [T, k]); ``kind``: ``random`` (distinct ids per token),
    ``crowded`` (ids from the lower half of the experts, the upper half unused; half the
    tokens on expert 1 in slot 0, some twice) or ``one`` (every pair on expert 0: all tie)."""
    g = torch.Generator().manual_seed(seed)
    span = n_exp if kind == "random" else max(k, n_exp // 2)
    chosen = torch.rand(t, span, generator=g).argsort(dim=1)[:, :k]
    if kind == "crowded" and k:
        chosen[: t // 2, 0] = 1
    if kind == "one":
        chosen.zero_()
    weights = torch.rand(t, k, generator=g)
    return chosen.to(device, dtype), weights.to(device)


def poisoned(pairs, n_rows, device) -> G.Grouping:
    return G.Grouping(
        torch.full((pairs,), -7, dtype=torch.int32, device=device),
        torch.full((n_rows + 1,), -7, dtype=torch.int32, device=device),
        torch.full((pairs,), float("nan"), device=device),
    )


def check(chosen, weights, n_rows, shared_row, chunk=None):
    slots = chosen.shape[1] + (shared_row is not None)
    out = poisoned(chosen.shape[0] * slots, n_rows, chosen.device)
    got = G.group_pairs(chosen, weights, n_rows, shared_row, chunk, out=out)
    want = G.group_pairs_torch(chosen, weights, n_rows, shared_row)
    for name, a, b in zip(G.Grouping._fields, got, want, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        same = torch.equal(a.view(torch.int32), b.view(torch.int32))  # weights as bits
        assert same, f"{name}: {a[:16].tolist()} vs {b[:16].tolist()}"
    assert got.order.data_ptr() == out.order.data_ptr()  # written into out
    return got


# (T, k, R, shared row, routing): decode and ties, unused experts, the shared row, R 257
CASES = [
    (1, 1, 16, None, "random"),
    (1, 2, 17, 16, "random"),
    (2, 6, 257, 256, "random"),
    (5, 9, 16, None, "random"),
    (7, 1, 16, None, "one"),
    (32, 2, 17, 16, "crowded"),
    (32, 6, 257, 256, "crowded"),
    (33, 8, 257, None, "random"),
    (64, 3, 16, 16, "one"),
    (73, 7, 16, None, "crowded"),
    (100, 4, 257, 256, "random"),
]


@pytest.mark.parametrize(("t", "k", "n_rows", "shared", "kind"), CASES, ids=str)
def test_group_one_program_equals_torch_sort_interpreted(t, k, n_rows, shared, kind):
    n_exp = n_rows - (shared is not None)
    chosen, weights = routing(t, k, n_exp, kind, seed=t * k)
    assert t * (k + (shared is not None)) <= G.ONE_PROGRAM_MAX  # the one-program form
    got = check(chosen, weights, n_rows, shared)
    counts = torch.diff(got.offsets)
    assert (counts == 0).any() or kind == "random"  # unused experts were there


@pytest.mark.parametrize("chunk", [64, 128, 512, None])
@pytest.mark.parametrize(
    ("t", "k", "n_rows", "shared", "kind"),
    [(300, 2, 17, 16, "crowded"), (300, 9, 257, None, "random"), (257, 1, 16, None, "one")],
    ids=str,
)
def test_group_chunked_equals_torch_sort_interpreted(t, k, n_rows, shared, kind, chunk):
    """The two-launch form at chunk sizes that split the pairs unevenly (the last chunk part
    full), down to one step per chunk; default chunk: one program below ONE_PROGRAM_MAX."""
    n_exp = n_rows - (shared is not None)
    chosen, weights = routing(t, k, n_exp, kind, seed=k)
    check(chosen, weights, n_rows, shared, chunk)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.int16], ids=str)
def test_group_any_id_dtype_and_bf16_weights_interpreted(dtype):
    chosen, weights = routing(40, 6, 16, "crowded", dtype=dtype)
    check(chosen, weights.bfloat16(), 17, 16)
    check(chosen, weights.bfloat16(), 17, 16, chunk=64)


def test_group_shared_only_and_empty_interpreted():
    """The separate shared bank's call (top-k 0, shared row 0: one slot per token) and T = 0
    (no launch: offsets zero, empty order / weights)."""
    chosen, weights = routing(9, 2, 16)
    got = check(chosen[:, :0], weights[:, :0], 1, 0)
    assert got.order.tolist() == list(range(9)) and got.offsets.tolist() == [0, 9]
    empty = check(chosen[:0], weights[:0], 17, 16)
    assert empty.order.numel() == 0 and empty.offsets.tolist() == [0] * 18


def test_group_drops_ids_outside_the_bank_interpreted():
    """Ids outside [0, R) (never routed) land past offsets[R]; the valid pairs keep the stable
    order of their ids (what the GEMM kernels read: rows below offsets[R])."""
    chosen, weights = routing(30, 3, 16, seed=3)
    chosen[::4, 1] = -1
    chosen[::5, 2] = 16
    got = G.group_pairs(chosen, weights, 16)
    flat = chosen.reshape(-1).long()
    valid = torch.nonzero((flat >= 0) & (flat < 16)).flatten()
    n = int(got.offsets[-1])
    assert n == valid.numel() < flat.numel()
    want = valid[torch.sort(flat[valid], stable=True).indices]
    assert torch.equal(got.order[:n].long(), want)
    assert sorted(got.order[n:].tolist()) == sorted(set(range(90)) - set(valid.tolist()))
    want_off = torch.searchsorted(flat[valid].sort().values, torch.arange(17))
    assert torch.equal(got.offsets.long(), want_off)


def test_group_chunk_bounds():
    for pairs in (513, 24576, 57344, 73728, 10**6):
        c = G.group_chunk(pairs)
        assert c in G.CHUNKS and c & (c - 1) == 0
    assert G.group_chunk(57344) == 512 and G.group_chunk(10**6) == 2048


def make_bank(rows, d, inter, fmt, device, dtype):
    """A random dense or FP8 bank (its values do not matter: both runs read the same)."""
    w13 = torch.randn(rows, 2 * inter, d, device=device) * d**-0.5
    w2 = torch.randn(rows, d, inter, device=device) * inter**-0.5
    if fmt == "dense":
        return K.ExpertWeights.stacked(w13.to(dtype), w2.to(dtype))
    q13, s13 = (torch.stack(t) for t in zip(*map(fp8_block_quant, w13), strict=True))
    q2, s2 = (torch.stack(t) for t in zip(*map(fp8_block_quant, w2), strict=True))
    return K.ExpertWeights.stacked(q13, q2, s13, s2)


def sorted_both_ways(t, n_exp, topk, fmt, device, dtype, d, inter, shared=True):
    """moe_experts_sorted's output with the kernel grouping and with the torch one."""
    bank = make_bank(n_exp + shared, d, inter, fmt, device, dtype)
    x = torch.randn(t, d, device=device).to(dtype)
    chosen, weights = routing(t, topk, n_exp, "crowded", device=device)
    outs = []
    for group in (G.group_pairs, G.group_pairs_torch):
        out = torch.full_like(x, float("nan"))
        S.moe_experts_sorted(x, chosen, weights, bank, 10.0, n_exp if shared else None, out,
                             group=group)  # fmt: skip
        outs.append(out)
    return outs


def test_sorted_moe_same_bits_with_either_grouping_interpreted():
    got, want = sorted_both_ways(20, 8, 3, "dense", "cpu", torch.float32, 64, 32)
    assert not want.isnan().any() and torch.equal(got.view(torch.int32), want.view(torch.int32))


# (R, k, shared row); (1, 0, 0): a shared expert in a bank of its own (ops.moe: top-k 0)
SERVED = [(17, 2, 16), (17, 6, 16), (256, 8, None), (257, 6, 256), (384, 8, None), (385, 8, 384),
          (1, 0, 0)]  # fmt: skip


@pytest.mark.gpu
@pytest.mark.parametrize(("n_rows", "k", "shared"), SERVED, ids=str)
@pytest.mark.parametrize("t", [1, 32, 128, 8192])
def test_group_gpu_served_shapes(t, n_rows, k, shared):
    n_exp = n_rows - (shared is not None)
    for kind in ("random", "crowded"):
        chosen, weights = routing(t, k, n_exp, kind, device="cuda", dtype=torch.int32, seed=t)
        check(chosen, weights, n_rows, shared)
        check(chosen.long(), weights.bfloat16(), n_rows, shared)
        if t == 8192:  # every chunk size the benchmark times (T 128: the default one)
            for chunk in G.CHUNKS:
                check(chosen, weights, n_rows, shared, chunk)


@pytest.mark.gpu
@pytest.mark.parametrize("t", [32, 8192])
def test_group_gpu_graph_replay_and_no_sync(t):
    """Captured once, replayed on new routing written into the same inputs: the twin's bits;
    an eager call makes no host sync."""
    chosen, weights = routing(t, 6, 256, device="cuda", seed=1)
    torch.cuda.set_sync_debug_mode("error")
    try:
        G.group_pairs(chosen, weights, 257, 256)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    out = poisoned(t * 7, 257, "cuda")
    G.group_pairs(chosen, weights, 257, 256, out=out)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        G.group_pairs(chosen, weights, 257, 256, out=out)
    new_chosen, new_weights = routing(t, 6, 256, "crowded", device="cuda", seed=2)
    chosen.copy_(new_chosen)
    weights.copy_(new_weights)
    graph.replay()
    want = G.group_pairs_torch(chosen, weights, 257, 256)
    for a, b in zip(out, want, strict=True):
        assert torch.equal(a.view(torch.int32), b.view(torch.int32))


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["dense", "fp8"])
@pytest.mark.parametrize(
    ("t", "n_exp", "topk", "inter"), [(32, 16, 2, 1024), (32, 256, 6, 256), (8192, 16, 2, 1024)]
)
def test_sorted_moe_gpu_same_bits_with_either_grouping(fmt, t, n_exp, topk, inter):
    """The whole sorted call (d 4096; the served 16 experts of 1024, 256 narrower ones to keep
    the bank small) with the kernel grouping has the bits of the torch grouping's."""
    got, want = sorted_both_ways(t, n_exp, topk, fmt, "cuda", torch.bfloat16, 4096, inter)
    assert not want.isnan().any() and torch.equal(got.view(torch.int16), want.view(torch.int16))
