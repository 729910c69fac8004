"""Target verify on the pools: the static-shape verify step equals an extend over the same
tokens, and its rejected tokens leave no state behind.

A request is prefilled to ``P``, then a ``TARGET_VERIFY`` batch runs ``n`` draft tokens through
the verify step of the backend (:func:`~sglang_dsv4.attention.speculative.verify_metadata`:
commit, journal, ``B * n`` decode rows; the twin ops), padded like a captured graph's batch.
Its outputs and pool writes equal those of the extend path over the same tokens. Then its next
batch starts at ``P + k`` (``k`` tokens kept), committed either by the next verify's device
metadata or by an extend plan's commit callback: the tails must be exactly those of a request
only ever fed the ``k`` kept tokens, and after it continues past the rejected positions every
pool tensor (raw rows, entries, indexer keys, tails, block-end state) equals that request's.
Verify windows cross a c4 window end and the block end 127 / 128.
"""

from types import SimpleNamespace

import pytest
import torch
from pool_world import World, inputs, pool_state, wrapper

from sglang_dsv4.attention.plan import plan_batch
from sglang_dsv4.attention.speculative import VerifyJournal, VerifyTorch, verify_metadata
from sglang_dsv4.attention.wrappers import CompressedInputs, IndexerInputs
from sglang_dsv4.spec_torch import build_chain, extend_cache_locs, verify_chain_greedy

CASES = [(126, 4, k) for k in range(5)] + [(130, 3, 1), (125, 3, 3), (2, 4, 1)]  # (P, n, kept)
END = 140  # the continuation's end (past every verify)
PAD = 2  # padded requests of the verify batch (slot 0, cache slot 0), as a graph pads
N_PAGES = 3  # pages of every request (pool_world)


def _rows(comp, lo: int, hi: int, pad: int = 0, n: int = 0):
    """Rows ``lo..hi`` of ``comp`` (and ``pad * n`` random rows after them)."""
    if comp is None:
        return None

    def take(t):
        return torch.cat([t[lo:hi], torch.randn(pad * n, *t.shape[1:])])

    ix = comp.indexer
    if ix is not None:
        ix = IndexerInputs(take(ix.q), take(ix.weights), ix.compressor, ix.topk)
    return CompressedInputs(take(comp.x), comp.compressor, comp.inv_freq, comp.norm_eps, ix)


def _extend(world, extend, lk, data, lo, hi, journal=None):
    """Extend request 0 over positions ``lo..hi`` (rows ``lo..hi`` of ``data``)."""
    q, kv, comp = data
    fb = world.batch([0], [lo], [hi], decode=False)
    commit = None if journal is None else journal.commit
    plan = plan_batch(fb, world.pool, world.rtp, commit=commit)
    if journal is not None:
        journal.forget(plan.tables.req_slots)
    extend.plan(plan)
    sink, scale = torch.zeros(q.shape[1]), q.shape[-1] ** -0.5
    return extend.run(lk, q[lo:hi], kv[lo:hi], sink, scale, _rows(comp, lo, hi))


def _verify(world, kind, lk, data, lo, n, journal):
    """A verify batch of request 0 over positions ``lo..lo+n-1`` plus ``PAD`` padded requests,
    through the backend's device metadata and the twin verify ops."""
    q, kv, comp = data
    fb = SimpleNamespace(
        req_pool_indices=torch.tensor([0] + [0] * PAD),
        positions=torch.cat([torch.arange(lo, lo + n), torch.zeros(PAD * n, dtype=torch.long)]),
        out_cache_loc=torch.cat(
            [world.req_to_token[0, lo : lo + n].long(), torch.zeros(PAD * n, dtype=torch.long)]
        ),
    )
    ops = VerifyTorch(journal)
    meta = verify_metadata(journal, ops, fb, world.req_to_token, n=n, n_pages=N_PAGES)
    sink, scale = torch.zeros(q.shape[1]), q.shape[-1] ** -0.5
    pad = torch.randn(PAD * n, *q.shape[1:]), torch.randn(PAD * n, *kv.shape[1:])
    c = _rows(comp, lo, lo + n, PAD, n)
    out = ops.run(None, kind, lk, meta, torch.cat([q[lo : lo + n], pad[0]]),
                  torch.cat([kv[lo : lo + n], pad[1]]), sink, scale, c)  # fmt: skip
    return out[:n]


@pytest.mark.parametrize("layer", [0, 2, 3])  # SWA, CSA (c4), HCA (c128)
@pytest.mark.parametrize(("prefix", "n", "kept"), CASES)
@pytest.mark.parametrize("next_batch", ["commit", "extend", "verify"])
def test_rejected_verify_tokens_leave_no_state(
    tiny_cfg, tiny_weights, layer, prefix, n, kept, next_batch
):
    """``next_batch``: what commits the verify at ``P + k`` (the callback called directly, an
    extend plan through it, the next verify's metadata)."""
    cfg, spec = tiny_cfg, tiny_cfg.layers[layer]
    data = inputs(cfg, tiny_weights, spec, END, torch.Generator().manual_seed(layer))
    states = {}
    for verify in (True, False):
        world = World(cfg)
        lk = world.pool.layer(layer)
        extend = wrapper(cfg, spec.attn, lk)
        journal = VerifyJournal(world.pool, n)
        _extend(world, extend, lk, data, 0, prefix, journal)
        if verify:
            _verify_equals_extend(world, spec.attn, lk, extend, data, prefix, n, journal)
        elif kept:  # the kept tokens only
            _extend(world, extend, lk, data, prefix, prefix + kept)
        start = prefix + kept
        tails = None
        if next_batch == "commit":
            if verify:
                assert journal.commit(0, 1, start)
                assert int(world.pool.tail_pos[0]) == start
            tails = _tail_state(lk)
        elif next_batch == "verify":
            _verify(world, spec.attn, lk, data, start, n, journal)
            assert int(world.pool.tail_pos[0]) == start + n
            start += n
        _extend(world, extend, lk, data, start, END, journal)
        states[verify] = (tails, pool_state(lk))
    (got_tails, got), (want_tails, want) = states[True], states[False]
    for k, v in (want_tails or {}).items():
        # rounding only: the verify projects its tokens as decode rows, the oracle as a chunk
        torch.testing.assert_close(got_tails[k][0], v[0], atol=1e-6, rtol=0, msg=k)
    _assert_state(got, want, "continued")


def _verify_equals_extend(world, kind, lk, extend, data, prefix, n, journal) -> None:
    """Verify ``n`` tokens from ``prefix``; the extend path over them from the same state gives
    the same outputs and pools (the verify's state is left in place)."""
    before = pool_state(lk)
    got = _verify(world, kind, lk, data, prefix, n, journal)
    assert int(world.pool.tail_pos[0]) == prefix + n
    verified = pool_state(lk)
    _restore_tails(lk, before)
    world.pool.tail_pos[0] = prefix
    want = _extend(world, extend, lk, data, prefix, prefix + n)  # no journal: keeps the entry
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    _assert_state(verified, pool_state(lk), "verify vs extend")


def _tail_state(lk) -> dict[str, torch.Tensor]:
    return {k: v for k, v in pool_state(lk).items() if k.startswith(("tail", "index_tail"))}


def _restore_tails(lk, state) -> None:
    for name in ("tail", "index_tail"):
        if name + ".kv" in state:
            getattr(lk, name).kv[:-1] = state[name + ".kv"]
            getattr(lk, name).score[:-1] = state[name + ".score"]


def _assert_state(got, want, what: str) -> None:
    for k, v in want.items():
        torch.testing.assert_close(got[k], v, atol=1e-5, rtol=0, msg=f"{what}: {k}")


def test_commit_refuses_what_it_did_not_journal(tiny_cfg, tiny_weights):
    world = World(tiny_cfg)
    journal = VerifyJournal(world.pool, 3)
    assert not journal.commit(0, 1, 5)  # nothing journaled
    spec = tiny_cfg.layers[3]
    lk = world.pool.layer(3)
    data = inputs(tiny_cfg, tiny_weights, spec, END, torch.Generator().manual_seed(0))
    extend = wrapper(tiny_cfg, spec.attn, lk)
    _extend(world, extend, lk, data, 0, 10, journal)
    _verify(world, spec.attn, lk, data, 10, 3, journal)
    assert not journal.commit(0, 1, 14)  # past the verify: dropped
    _verify(world, spec.attn, lk, data, 10, 3, journal)
    journal.forget(torch.tensor([0]))  # a new owner's plan
    assert not journal.commit(0, 1, 11)
    assert not VerifyJournal(world.pool, 0).tails  # not speculating: no buffers


def test_chain_twins_match_sglang_semantics():
    """top-k 1 tree build / greedy verify twins: positions, chain links, accepted prefix."""
    seq_lens = torch.tensor([7, 3])
    mask, pos, idx, nxt, sib, tokens = build_chain(
        torch.tensor([1, 2]), torch.tensor([[10, 11], [20, 21]]), seq_lens, 3, full_mask=True
    )
    assert pos.tolist() == [7, 8, 9, 3, 4, 5] and tokens.tolist() == [1, 10, 11, 2, 20, 21]
    assert idx.tolist() == [[0, 1, 2], [3, 4, 5]] and nxt.tolist() == [[1, 2, -1]] * 2
    assert (sib == -1).all() and mask.numel() == (7 + 3 + 3 + 3) * 3
    cand = tokens.view(2, 3)
    target = torch.tensor([[10, 11, 12], [20, 99, 98]])  # request 0 keeps both, 1 keeps one
    predicts = torch.zeros(6, dtype=torch.int32)
    accept = torch.full((2, 3), -1, dtype=torch.int32)
    num = torch.empty(2, dtype=torch.int32)
    verify_chain_greedy(predicts, accept, num, cand, target)
    assert num.tolist() == [2, 1] and accept.tolist() == [[0, 1, 2], [3, 4, -1]]
    assert predicts.tolist() == [10, 11, 12, 20, 99, 0]


def test_extend_cache_locs_takes_each_requests_slots_in_batch_order():
    """``assign_extend_cache_locs_func`` twin: ``req_to_token[r, start:end]`` per request."""
    req_to_token = torch.arange(40, dtype=torch.int32).view(4, 10)
    locs = extend_cache_locs(
        torch.tensor([2, 0]), req_to_token, torch.tensor([5, 1]), torch.tensor([8, 4])
    )
    assert locs.dtype == torch.int64 and locs.tolist() == [25, 26, 27, 1, 2, 3]
