"""plan_facts: with the request slots on the host the extend plan reads nothing back from the
device, plans what the one-read path plans, and raises the read path's errors one batch late."""

import pytest
import torch

from sglang_dsv4.attention.plan import TailMode, plan_batch
from sglang_dsv4.attention.plan_facts import SlottedLens
from sglang_dsv4.attention.plan_tables import tables_torch, tables_triton
from sglang_dsv4.mem.h2d import to_device
from tests.pool_world import BLOCK, World
from tests.sync_check import synchronizing_calls

# (request slot, prefix, seq): fresh prompts and a prefix hit at a block end (REBUILD) ...
STEP = [(0, 0, 131), (1, 0, 5), (2, BLOCK, 300)]
# ... then each request's next chunk (its own tail: KEEP)
NEXT = [(0, 131, 260), (1, 5, 7), (2, 300, 301)]


class _Dev(torch.Tensor):
    """A 'device' tensor: every read back to the host is counted (ops on it stay _Dev)."""

    reads = 0

    def _read(self, name, *args):
        type(self).reads += 1
        return getattr(torch.Tensor, name)(self, *args)

    def tolist(self):
        return self._read("tolist")

    def item(self):
        return self._read("item")

    def cpu(self, *args, **kwargs):
        return self._read("cpu")

    def __bool__(self):
        return self._read("__bool__")

    def __int__(self):
        return self._read("__int__")

    def __index__(self):
        return self._read("__index__")


def _on_device(world):
    """The world's device state as _Dev tensors (SGLang's and the pool's GPU tensors)."""
    pool = world.pool
    pool.tail_pos = pool.tail_pos.as_subclass(_Dev)
    pool.full_to_swa_index_mapping = pool.full_to_swa_index_mapping.as_subclass(_Dev)
    world.rtp.req_to_token = world.rtp.req_to_token.as_subclass(_Dev)


def _batch(world, step, host_slots: bool, dev: bool = False):
    reqs, prefix, seq = (list(x) for x in zip(*step, strict=True))
    fb = world.batch(reqs, prefix, seq, decode=False)
    # the plugin's ForwardBatch.init_new hook: slots on the host prefix lengths
    fb.extend_prefix_lens_cpu = SlottedLens(prefix, reqs) if host_slots else prefix
    if dev:
        fb.req_pool_indices = fb.req_pool_indices.as_subclass(_Dev)
        fb.out_cache_loc = fb.out_cache_loc.as_subclass(_Dev)
    return fb


@pytest.mark.parametrize("host_slots", [True, False])
def test_reads_back_nothing_with_host_slots(tiny_cfg, host_slots):
    """Zero device-to-host reads over two extend steps (the second checks the first) with the
    slots on the host; the read path's count shows the counter sees its one read a step."""
    world = World(tiny_cfg)
    _on_device(world)
    _Dev.reads = 0
    for step in (STEP, NEXT):
        plan = plan_batch(_batch(world, step, host_slots, dev=True), world.pool, world.rtp)
    assert _Dev.reads == (0 if host_slots else 2)
    assert [r.tail for r in plan.requests] == [TailMode.KEEP] * 3


def test_host_slots_plan_what_the_device_read_plans(tiny_cfg):
    a, b = World(tiny_cfg), World(tiny_cfg)
    tails = []
    for step in (STEP, NEXT):
        x = plan_batch(_batch(a, step, host_slots=True), a.pool, a.rtp)
        y = plan_batch(_batch(b, step, host_slots=False), b.pool, b.rtp)
        for p, q in zip(x.requests, y.requests, strict=True):
            assert (p.req_slot, p.prefix, p.tail, p.rebuild_page, p.window_lo) == (
                q.req_slot, q.prefix, q.tail, q.rebuild_page, q.window_lo,
            )  # fmt: skip
        for name in x.tables.__dataclass_fields__:
            assert torch.equal(getattr(x.tables, name), getattr(y.tables, name)), name
        assert torch.equal(a.pool.tail_pos, b.pool.tail_pos)
        tails.append([r.tail for r in x.requests])
        if step is STEP:  # the REBUILD's page: a device value, the same as the one read back
            assert x.tables.rebuild_page.tolist()[:2] == [-1, -1]
            assert x.requests[2].rebuild_page == x.tables.rebuild_page[2] > 0
    assert tails == [[TailMode.FRESH, TailMode.FRESH, TailMode.REBUILD], [TailMode.KEEP] * 3]


def test_own_tail_elsewhere_restarts_as_the_device_read_decides(tiny_cfg):
    """An own request re-planned from 0 or a block end (a retraction keeps its slot): its tail's
    progress is not P, so the device picks FRESH / REBUILD, as the read path does on the host."""
    a, b = World(tiny_cfg), World(tiny_cfg)
    again = [(0, 0, 131), (2, BLOCK, 300)]  # after STEP: progress 131 / 300
    for step in (STEP, again):
        x = plan_batch(_batch(a, step, host_slots=True), a.pool, a.rtp)
        y = plan_batch(_batch(b, step, host_slots=False), b.pool, b.rtp)
        for name in x.tables.__dataclass_fields__:
            assert torch.equal(getattr(x.tables, name), getattr(y.tables, name)), name
    assert [r.tail for r in x.requests] == [TailMode.FRESH, TailMode.REBUILD]
    assert [r.rebuild_page for r in x.requests] == [r.rebuild_page for r in y.requests]
    plan_batch(_batch(a, NEXT[:1], host_slots=True), a.pool, a.rtp)  # no error pending


@pytest.mark.parametrize("host_slots", [True, False])
def test_the_kernel_plans_what_the_torch_form_plans(tiny_cfg, host_slots):
    """``tables_triton`` (interpreted) against ``tables_torch`` through ``plan_batch``: fresh /
    REBUILD, each request's next chunk (KEEP), then own tails re-planned from 0 and a block end
    (the device decides FRESH / REBUILD): requests, tables, tail progress, pending checks."""
    from triton_cpu import interpreted

    from sglang_dsv4.kernels import extend_meta

    a, b = World(tiny_cfg), World(tiny_cfg)
    again = [(0, 0, 131), (2, BLOCK, 300)]
    with interpreted(extend_meta):
        for step in (STEP, NEXT, again):
            x = plan_batch(_batch(a, step, host_slots), a.pool, a.rtp, tables=tables_torch)
            y = plan_batch(_batch(b, step, host_slots), b.pool, b.rtp, tables=tables_triton)
            for p, q in zip(x.requests, y.requests, strict=True):
                assert (p.req_slot, p.prefix, p.seq_len, p.tail, p.rebuild_page) == (
                    q.req_slot, q.prefix, q.seq_len, q.tail, q.rebuild_page,
                )  # fmt: skip
                assert torch.equal(p.window_slots, q.window_slots)
            for name in x.tables.__dataclass_fields__:
                assert torch.equal(getattr(x.tables, name), getattr(y.tables, name)), name
            assert torch.equal(a.pool.tail_pos, b.pool.tail_pos)
            if host_slots:
                got, want = b.pool.plan_checks.copy.wait(), a.pool.plan_checks.copy.wait()
                assert torch.equal(got, want) and bool(got.all())
    assert [r.tail for r in y.requests] == [TailMode.FRESH, TailMode.REBUILD]


def test_freed_window_is_raised_at_the_next_plan(tiny_cfg):
    world = World(tiny_cfg)
    world.req_to_token[2, BLOCK - 3 : BLOCK] = 0  # the REBUILD request's window rows freed
    plan_batch(_batch(world, STEP, host_slots=True), world.pool, world.rtp)  # no read: no error
    with pytest.raises(RuntimeError, match=r"request slot 2: the swa rows .* were freed"):
        plan_batch(_batch(world, [(4, 0, 5)], host_slots=True), world.pool, world.rtp)
    plan_batch(_batch(world, [(4, 0, 5)], host_slots=True), world.pool, world.rtp)  # reported once


def test_lost_tail_progress_is_raised_at_the_next_plan(tiny_cfg):
    world = World(tiny_cfg)
    plan_batch(_batch(world, STEP[:1], host_slots=True), world.pool, world.rtp)
    world.pool.tail_pos[0] = 7  # not what request 0 has seen (131)
    plan_batch(_batch(world, NEXT[:1], host_slots=True), world.pool, world.rtp)
    with pytest.raises(
        RuntimeError, match=r"request slot 0: prefix 131 was neither its own tail's progress"
    ):
        plan_batch(_batch(world, [(4, 0, 5)], host_slots=True), world.pool, world.rtp)


def test_padded_batch_keeps_the_device_read(tiny_cfg):
    """Slots that do not match the batch's lengths (a padded batch) are not trusted."""
    world = World(tiny_cfg)
    _on_device(world)
    fb = _batch(world, STEP, host_slots=True, dev=True)
    fb.extend_prefix_lens_cpu = SlottedLens(fb.extend_prefix_lens_cpu, [0, 1])
    _Dev.reads = 0
    plan_batch(fb, world.pool, world.rtp)
    assert _Dev.reads == 1


@pytest.mark.gpu
@pytest.mark.parametrize("tables", [tables_torch, tables_triton])
def test_plan_with_host_slots_does_not_sync(tiny_cfg, tables):
    """No synchronizing call in two host-planned extend steps on the GPU (the read path: one),
    with either builder of the tables."""
    import warnings

    world = World(tiny_cfg, device="cuda")
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for step in (STEP, NEXT):
                fb = _batch(world, step, host_slots=True)
                # SGLang's device tensor, copied as SGLang copies it (pinned, queued): a
                # pageable .cuda() here is itself a synchronizing copy under torch 2.11
                fb.req_pool_indices = to_device(fb.req_pool_indices, "cuda")
                plan = plan_batch(fb, world.pool, world.rtp, tables=tables)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = synchronizing_calls(caught)
    assert len(syncs) == 0, syncs  # the Python lines whose torch call synchronized
    assert [r.tail for r in plan.requests] == [TailMode.KEEP] * 3
