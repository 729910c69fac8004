"""plan_batch: host lengths from SGLang's host copies, one device read, batched gathers."""

import pytest
import torch

from sglang_dsv4.attention import plan as plan_module
from sglang_dsv4.attention.plan import TailMode, plan_batch
from sglang_dsv4.attention.plan_facts import SlottedLens
from sglang_dsv4.attention.plan_tables import FACT_ROWS
from tests.pool_world import BLOCK, World
from tests.sync_check import synchronizing_calls

# (request slot, prefix, seq): fresh prompts and a prefix hit at a block end (REBUILD)
STEP = [(0, 0, 131), (1, 0, 5), (2, BLOCK, 300)]


class _NoRead:
    """A device tensor the plan must not read back (SGLang gave its host copy)."""

    def tolist(self):
        raise AssertionError("read the device tensor although a host copy was given")


def _batch(world, step, host_prefix: bool):
    reqs, prefix, seq = (list(x) for x in zip(*step, strict=True))
    fb = world.batch(reqs, prefix, seq, decode=False)
    if host_prefix:
        fb.extend_prefix_lens_cpu = prefix
        fb.extend_prefix_lens = _NoRead()
    return fb


def test_plan_takes_host_lengths_and_matches_per_request_gathers(tiny_cfg):
    world = World(tiny_cfg)
    plan = plan_batch(_batch(world, STEP, host_prefix=True), world.pool, world.rtp)
    to_swa = world.pool.translate_loc_from_full_to_swa
    window = world.pool.schema.sliding_window
    assert [r.tail for r in plan.requests] == [TailMode.FRESH, TailMode.FRESH, TailMode.REBUILD]
    for r, (slot, prefix, seq) in zip(plan.requests, STEP, strict=True):
        assert (r.req_slot, r.prefix, r.seq_len) == (slot, prefix, seq)
        assert r.window_lo == max(0, prefix - window + 1)
        assert torch.equal(r.slots.long(), world.req_to_token[slot, :seq].long())
        assert torch.equal(r.window_slots, to_swa(world.req_to_token[slot, r.window_lo : seq]))
    t = plan.tables
    lens = [s - p for _, p, s in STEP]
    assert t.cu_seqlens.tolist() == [0, *torch.tensor(lens).cumsum(0).tolist()]
    assert t.positions.tolist() == [i for _, p, s in STEP for i in range(p, s)]
    assert t.query_req.tolist() == [b for b, n in enumerate(lens) for _ in range(n)]
    assert t.req_slots.tolist() == [s for s, _, _ in STEP]
    assert world.pool.tail_pos[[s for s, _, _ in STEP]].tolist() == [s for _, _, s in STEP]
    assert t.seq_lens.tolist() == [s for _, _, s in STEP]
    assert t.window_lo.tolist() == [r.window_lo for r in plan.requests]
    assert torch.equal(t.window_slots, torch.cat([r.window_slots for r in plan.requests]))
    # each query's window: its request's swa slots of positions t-W+1 .. t (ref.window_indices)
    for row, (b, pos) in enumerate(zip(t.query_req.tolist(), t.positions.tolist(), strict=True)):
        slot, want = STEP[b][0], []
        for p in range(pos - window + 1, pos + 1):
            want.append(int(to_swa(world.req_to_token[slot, p : p + 1])) if p >= 0 else -1)
        assert t.window_rows[row].tolist() == want
    ids = t.window_ids
    assert torch.equal(t.window_rows.long(), torch.where(ids >= 0, t.window_slots[ids], -1))


@pytest.mark.parametrize("host_slots", [True, False])
def test_plan_copies_host_facts_once(tiny_cfg, monkeypatch, host_slots):
    """The per-token tables are built on the device from the [R, B+1] host facts: one host ->
    device copy per batch (the read path: a second one, its host-decided tail modes)."""
    copies = []

    def counted(host, device):
        copies.append(host.numel())
        return host

    monkeypatch.setattr(plan_module, "to_device", counted)
    world = World(tiny_cfg)
    fb = _batch(world, STEP, host_prefix=True)
    if host_slots:
        fb.extend_prefix_lens_cpu = SlottedLens(fb.extend_prefix_lens_cpu, [s for s, _, _ in STEP])
    plan_batch(fb, world.pool, world.rtp)
    facts = len(FACT_ROWS) * (len(STEP) + 1)
    assert copies == ([facts] if host_slots else [facts, len(STEP)])


def test_plan_without_host_prefix_reads_the_device_tensor(tiny_cfg):
    world, other = World(tiny_cfg), World(tiny_cfg)
    a = plan_batch(_batch(world, STEP, host_prefix=True), world.pool, world.rtp)
    b = plan_batch(_batch(other, STEP, host_prefix=False), other.pool, other.rtp)
    for x, y in zip(a.requests, b.requests, strict=True):
        assert (x.prefix, x.tail, x.rebuild_page) == (y.prefix, y.tail, y.rebuild_page)
    assert torch.equal(a.tables.window_rows, b.tables.window_rows)
    assert torch.equal(a.tables.boundary_table, b.tables.boundary_table)


@pytest.mark.gpu
def test_plan_reads_the_device_once(tiny_cfg):
    """One device-to-host read per extend batch (the facts); no pageable copy's sync."""
    import warnings

    world = World(tiny_cfg, device="cuda")
    fb = _batch(world, STEP, host_prefix=True)
    fb.req_pool_indices = fb.req_pool_indices.cuda()  # SGLang's device tensor
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            plan_batch(fb, world.pool, world.rtp)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = synchronizing_calls(caught)  # the Python lines whose torch call synchronized
    assert len(syncs) == 1, syncs
