"""Target verify on the pools: a verify batch's rejected tokens leave no state behind.

A request is prefilled to ``P``, then a ``TARGET_VERIFY`` batch extends it by ``n`` draft tokens
(journaled as the backend does: :class:`~sglang_dsv4.attention.speculative.VerifyJournal`), then
its next batch starts at ``P + k`` (``k`` tokens kept). Its tails must then be exactly those of a
request that was only ever fed the ``k`` kept tokens, and after it continues past the rejected
positions every pool tensor (raw rows, entries, indexer keys, tails, block-end state) equals that
request's: the rejected tokens' rows are overwritten before any query reads them. Verify windows
cross a c4 window end and the block end 127 / 128.
"""

from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from pool_world import World, inputs, pool_state, wrapper

from sglang_dsv4.attention.plan import plan_batch
from sglang_dsv4.attention.speculative import VerifyJournal
from sglang_dsv4.spec_torch import build_chain, verify_chain_greedy

CASES = [(126, 4, k) for k in range(5)] + [(130, 3, 1), (125, 3, 3)]  # (P, n, kept)
END = 140  # the continuation's end (past every verify)


def _slice(comp, lo: int, hi: int):
    if comp is None:
        return None
    ix = comp.indexer
    if ix is not None:
        ix = replace(ix, q=ix.q[lo:hi], weights=ix.weights[lo:hi])
    return replace(comp, x=comp.x[lo:hi], indexer=ix)


def _mode(verify: bool):
    return SimpleNamespace(is_decode=lambda: False, is_target_verify=lambda: verify)


def _feed(world, extend, lk, data, lo, hi, *, verify=False, journal=None, commit=None):
    """Extend request 0 over positions ``lo..hi`` with rows ``lo..hi`` of ``data``."""
    q, kv, comp = data
    fb = world.batch([0], [lo], [hi], decode=False)
    fb.forward_mode = _mode(verify)
    if verify:  # SGLang's verify batch: seq_lens without the draft tokens
        fb.seq_lens_cpu = torch.tensor([lo])
        fb.spec_info = SimpleNamespace(draft_token_num=hi - lo)
    plan = plan_batch(fb, world.pool, world.rtp, commit=commit)
    if verify:
        journal.begin(plan, world.rtp.req_generation)
    extend.plan(plan)
    c = _slice(comp, lo, hi)
    if verify and c is not None:
        journal.record(lk.layer, c)
    sink, scale = torch.zeros(q.shape[1]), q.shape[-1] ** -0.5
    extend.run(lk, q[lo:hi], kv[lo:hi], sink, scale, c)


@pytest.mark.parametrize("layer", [0, 2, 3])  # SWA, CSA (c4), HCA (c128)
@pytest.mark.parametrize(("prefix", "n", "kept"), CASES)
def test_rejected_verify_tokens_leave_no_state(tiny_cfg, tiny_weights, layer, prefix, n, kept):
    cfg, spec = tiny_cfg, tiny_cfg.layers[layer]
    data = inputs(cfg, tiny_weights, spec, END, torch.Generator().manual_seed(layer))
    states = []
    for verify in (True, False):
        world = World(cfg)
        lk = world.pool.layer(layer)
        extend = wrapper(cfg, spec.attn, lk)
        journal = VerifyJournal(world.pool)
        _feed(world, extend, lk, data, 0, prefix)
        if verify:
            _feed(world, extend, lk, data, prefix, prefix + n, verify=True, journal=journal)
        elif kept:  # the kept tokens only
            _feed(world, extend, lk, data, prefix, prefix + kept)
        start = prefix + kept
        if verify and spec.attn.compressed:  # the next batch commits: tails after P + k
            assert journal.commit(0, int(world.rtp.req_generation[0]), start)
            world.pool.tail_pos[0] = start
        tails = {k: v for k, v in pool_state(lk).items() if k.startswith(("tail", "index_tail"))}
        _feed(world, extend, lk, data, start, END, commit=journal.commit)
        states.append((tails, pool_state(lk)))
    (got_tails, got), (want_tails, want) = states
    for k, v in want_tails.items():
        assert torch.equal(got_tails[k], v), f"tail {k} after the verify differs"
    for k, v in want.items():
        torch.testing.assert_close(got[k], v, atol=1e-6, rtol=0, msg=k)


def test_commit_refuses_what_it_did_not_journal(tiny_cfg, tiny_weights):
    world = World(tiny_cfg)
    journal = VerifyJournal(world.pool)
    assert not journal.commit(0, 1, 5)  # nothing journaled
    spec = tiny_cfg.layers[3]
    lk = world.pool.layer(3)
    extend = wrapper(tiny_cfg, spec.attn, lk)
    data = inputs(tiny_cfg, tiny_weights, spec, END, torch.Generator().manual_seed(0))
    _feed(world, extend, lk, data, 0, 10)
    _feed(world, extend, lk, data, 10, 13, verify=True, journal=journal)
    assert not journal.commit(0, 1, 14)  # past the verify
    assert not journal.commit(0, 2, 11)  # another owner of the slot (entry dropped)
    assert not journal.commit(0, 1, 11)


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
