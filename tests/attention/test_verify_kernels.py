"""A target-verify batch through the GPU kernels (``attention.verify_kernels.VerifyKernels``:
the decode kernels over ``B * n`` rows, the multi-token compressor flush) equals the torch twin
(``attention.speculative.VerifyTorch``) on the same FP8 / bf16 pools: attention outputs, raw
rows, entries and indexer keys (up to one FP8 step), tails, block-end state, and the journal's
slot values, for requests whose verify crosses a block end and c4 window ends, one at position
0, plus padded requests. CPU: Triton interpreter, tiny model. GPU: the same, and the verify step
(device metadata, journal commit, every launch) captured in a CUDA graph replays exactly."""

from types import SimpleNamespace

import pytest
import torch
from attention.test_decode_kernels import (
    N_PAGES,
    _check_rows,
    _decode_inputs,
    _prefilled_world,
    _restore,
    _state,
    _to,
    check_entries_and_state,
)
from pool_world import LENGTHS

from sglang_dsv4.attention.decode_kernels import DecodeKernels
from sglang_dsv4.attention.speculative import VerifyJournal, VerifyTorch, verify_metadata
from sglang_dsv4.attention.verify_kernels import VerifyKernels
from sglang_dsv4.attention.wrappers import CompressedInputs, IndexerInputs
from sglang_dsv4.mem.schema import EntryFormat

N = 3  # verify tokens per request: LENGTHS 127 -> 127..129 crosses the block end
PAD = 2  # padded requests (slot 0, cache slot 0)


def _verify_batch(world, device):
    """SGLang's graph-static inputs of a verify batch of every request of the world."""
    r2t = world.req_to_token
    reqs = list(range(len(LENGTHS)))
    positions = [torch.arange(p, p + N) for p in LENGTHS]
    locs = [r2t[r, p : p + N].long().cpu() for r, p in zip(reqs, LENGTHS, strict=True)]
    zeros = torch.zeros(PAD * N, dtype=torch.long)
    return SimpleNamespace(
        req_pool_indices=torch.tensor(reqs + [0] * PAD, device=device),
        positions=torch.cat([*positions, zeros]).to(device),
        out_cache_loc=torch.cat([*locs, zeros]).to(device),
    )


def _pad_rows(q, kv, comp):
    def p(t):
        return torch.cat([t, torch.zeros(PAD * N, *t.shape[1:], dtype=t.dtype)])

    ix = None if comp is None else comp.indexer
    if ix is not None:
        ix = IndexerInputs(p(ix.q), p(ix.weights), ix.compressor, ix.topk)
    if comp is not None:
        comp = CompressedInputs(p(comp.x), comp.compressor, comp.inv_freq, 1e-6, ix)
    return p(q), p(kv), comp


def _journal_state(journal) -> dict[str, torch.Tensor]:
    out = {"prefix": journal.prefix}
    for i, j in enumerate(journal.tails.values()):
        out[f"{i}.kv"], out[f"{i}.score"] = j.ext.kv, j.ext.score
    return {k: v.clone() for k, v in out.items()}


def _restore_journal(journal, state) -> None:
    journal.prefix.copy_(state["prefix"])
    for i, j in enumerate(journal.tails.values()):
        j.ext.kv.copy_(state[f"{i}.kv"])
        j.ext.score.copy_(state[f"{i}.score"])


def _setup(cfg, weights, layer, device, fmt):
    spec = cfg.layers[layer]
    gen = torch.Generator().manual_seed(400 + layer)
    world, sink = _prefilled_world(cfg, weights, layer, gen, device, fmt)
    rows = len(LENGTHS) * N
    q, kv, comp = _to(*_pad_rows(*_decode_inputs(cfg, weights, spec, rows, gen)), device)
    journal = VerifyJournal(world.pool, N)
    kernels = VerifyKernels.of(
        DecodeKernels(
            world.pool.schema, cfg.num_heads, cfg.index_topk, cfg.index_n_heads, device,
            flashmla=False if device == "cpu" else None,
        ),
        journal,
    )  # fmt: skip
    return world, sink, (q, kv, comp), journal, kernels


def _check_verify_kernels_equal_twin(cfg, weights, layer: int, device: str, fmt: EntryFormat):
    spec = cfg.layers[layer]
    world, sink, (q, kv, comp), journal, kernels = _setup(cfg, weights, layer, device, fmt)
    lk = world.pool.layer(layer)
    fb = _verify_batch(world, device)
    twin = VerifyTorch(journal)
    meta = verify_metadata(journal, twin, fb, world.req_to_token, n=N, n_pages=N_PAGES)
    scale = cfg.head_dim**-0.5
    before, journal_before = _state(lk), _journal_state(journal)
    want = twin.run(None, spec.attn, lk, meta, q, kv, sink, scale, comp).float()
    want_state, want_journal = _state(lk), _journal_state(journal)
    _restore(lk, before)
    _restore_journal(journal, journal_before)

    plan = kernels.plan_verify(len(LENGTHS) + PAD, N, N_PAGES)
    got = kernels.run(plan, spec.attn, lk, meta, q, kv, sink, scale, comp).float()
    real = len(LENGTHS) * N
    assert torch.isfinite(got[:real]).all()
    rel = (got[:real] - want[:real]).norm() / want[:real].norm()
    assert rel <= 1e-2, f"attention rel L2 {rel:.2e}"
    got_state = _state(lk)
    _check_rows(lk, "raw", got_state["raw"], want_state["raw"])
    check_entries_and_state(lk, got_state, want_state)
    got_journal = _journal_state(journal)
    for k, v in want_journal.items():  # the spare row takes the padded requests
        torch.testing.assert_close(got_journal[k][:-1], v[:-1], atol=1e-4, rtol=1e-4, msg=k)


# (layer, pool rows): SWA, CSA (c4), HCA (c128) on FP8 rows, the compressed ones on bf16 rows
CPU_CASES = [(0, EntryFormat.FP8), (2, EntryFormat.FP8), (3, EntryFormat.FP8)]
CPU_CASES += [(2, EntryFormat.BF16), (3, EntryFormat.BF16)]


@pytest.mark.parametrize(("layer", "fmt"), CPU_CASES)
def test_verify_kernels_equal_torch_twin(tiny_cfg, tiny_weights, layer, fmt):
    _check_verify_kernels_equal_twin(tiny_cfg, tiny_weights, layer, "cpu", fmt)


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", [EntryFormat.FP8, EntryFormat.BF16])
@pytest.mark.parametrize("layer", [0, 2, 3])
def test_verify_kernels_equal_torch_twin_on_gpu(tiny_cfg, tiny_weights, layer, fmt):
    w = {k: v.cuda() for k, v in tiny_weights.items()}
    _check_verify_kernels_equal_twin(tiny_cfg, w, layer, "cuda", fmt)


@pytest.mark.gpu
@pytest.mark.parametrize("layer", [0, 2, 3])
def test_verify_graph_replay_equals_eager(tiny_cfg, tiny_weights, layer):
    """One verify step (commit of the last verify, journal, metadata, every launch) captured in
    a CUDA graph and replayed gives the eager step's output, pools and journal exactly."""
    cfg, spec = tiny_cfg, tiny_cfg.layers[layer]
    w = {k: v.cuda() for k, v in tiny_weights.items()}
    world, sink, (q, kv, comp), journal, ops = _setup(cfg, w, layer, "cuda", EntryFormat.FP8)
    lk = world.pool.layer(layer)
    fb = _verify_batch(world, "cuda")  # no host copies inside the capture
    journal.prefix[: len(LENGTHS)] = torch.tensor(LENGTHS, device="cuda") - 1  # a commit to do
    scale = cfg.head_dim**-0.5

    def step(plan):
        meta = verify_metadata(journal, ops, fb, world.req_to_token, n=N, n_pages=N_PAGES)
        return ops.run(plan, spec.attn, lk, meta, q, kv, sink, scale, comp)

    def snapshot():
        return _state(lk), _journal_state(journal), world.pool.tail_pos.clone()

    def restore(s):
        _restore(lk, s[0])
        _restore_journal(journal, s[1])
        world.pool.tail_pos.copy_(s[2])

    bs = len(LENGTHS) + PAD
    before = snapshot()
    want = step(ops.plan_verify(bs, N, N_PAGES)).clone()
    want_state = snapshot()
    restore(before)
    plan = ops.plan_verify(bs, N, N_PAGES)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up off the capture stream, as SGLang does
        step(plan)
    torch.cuda.current_stream().wait_stream(stream)
    restore(before)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step(plan)
    restore(before)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, want)
    got_state = snapshot()
    for k, v in want_state[0].items():
        part = slice(None, -1) if "tail" in k else slice(1, None)
        assert torch.equal(got_state[0][k][part], v[part]), k
    for k, v in want_state[1].items():
        assert torch.equal(got_state[1][k][:-1], v[:-1]), k
    assert torch.equal(got_state[2][:-1], want_state[2][:-1])
