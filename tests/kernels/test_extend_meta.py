"""``kernels.extend_meta``: one launch gives the extend plan's device half exactly as the torch
form (``attention.plan_tables.tables_torch``): every ``BatchTables`` field, the page of token
``P-1``, the checks, and ``tail_pos`` after, over random batches (fresh, chunked, block-end and
mid-block prefixes, own / new tails, host-decided and device-decided modes, freed window rows,
zero-length window tails). Outputs are poisoned (-7; True for bool) before the launch so a
missed store shows. CPU: interpreter at small shapes; GPU: Flash shapes (window 128)."""

import dataclasses

import pytest
import torch
from plan_cases import BLOCK, case, pool
from poison import PoisonedTorch
from triton_cpu import interpreted

from sglang_dsv4.attention.plan_tables import tables_torch
from sglang_dsv4.kernels import extend_meta


def _check(mod, lens, window, width, seed=0, device="cpu", compressed=True):
    r2t, f2s, n_slots, progress, inp = case(lens, window, width, seed, device, compressed)
    want_pool, got_pool = (pool(f2s, n_slots, window, progress) for _ in range(2))
    want = tables_torch(want_pool, r2t, inp)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(mod, "torch", PoisonedTorch())
        f = mod.extend_meta_fields(
            inp.facts, r2t, f2s, got_pool.tail_pos, n_tokens=inp.n_tokens,
            n_window=inp.n_window, n_blocks=inp.n_blocks, max_window=inp.max_window,
            window=window, block=BLOCK, compressed=compressed,
        )  # fmt: skip
    for name, w in dataclasses.asdict(want.tables).items():
        g = f.get(name, getattr(want.tables, name))  # the facts' views are shared
        assert g.dtype == w.dtype and g.shape == w.shape, name
        assert torch.equal(g, w), f"{name}: {g} != {w}"
    assert torch.equal(f["last_page"], want.last_page)
    assert torch.equal(f["flags"], want.flags)
    assert torch.equal(got_pool.tail_pos, want_pool.tail_pos)
    return want


@pytest.fixture
def mod():
    with interpreted(extend_meta) as (m,):
        yield m


def test_fresh_chunked_and_prefix_hits(mod):
    """Fresh prompts, a chunk after 131 tokens, a block-end hit, a mid-block prefix, a
    one-token chunk, a chunk ending at a block end."""
    _check(mod, [(0, 131), (131, 260), (BLOCK, 300), (250, 251), (0, 5), (100, 256)], 16, 512)


def test_window_not_a_power_of_two_and_many_blocks(mod):
    """A 40-token window; window slots and blocks past one program's chunk (300 blocks)."""
    _check(mod, [(38_000, 38_017), (39, 80), (0, 1)], 40, 300 * BLOCK, seed=3)


def test_narrow_table_clamps_block_starts(mod):
    """``req_to_token`` narrower than the last block's start + 128 (the last column is read)."""
    _check(mod, [(3, 200), (130, 330)], 8, 330, seed=1)


def test_many_requests_cross_the_request_search_step(mod):
    """70 requests (> 64 starts compared per step), one token each, some with no window."""
    _check(mod, [(i, i + 1) for i in range(70)], 4, 128, seed=5)


def test_without_compressors_every_mode_is_keep_or_the_hosts(mod):
    want = _check(mod, [(0, 9), (BLOCK, 140), (7, 20)], 16, 256, seed=2, compressed=False)
    assert want.flags[0].all()


def test_the_checks_fail_where_they_should(mod):
    """An own tail elsewhere than a mid-block P, and a freed row in a prefix window."""
    r2t, f2s, n_slots, progress, inp = case([(200, 210)], 16, 512, 0, "cpu")
    f = inp.facts
    slot = int(f[0, 0])
    f[4, 0], f[5, 0] = 1, -1  # own, the device decides
    progress[slot] = 7
    f2s[r2t[slot, 195].long()] = 0  # position 195 of the window 185..199: freed
    world = pool(f2s, n_slots, 16, progress)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(mod, "torch", PoisonedTorch())
        got = mod.extend_meta_fields(
            f, r2t, f2s, world.tail_pos, n_tokens=10, n_window=25, n_blocks=2, max_window=25,
            window=16, block=BLOCK, compressed=True,
        )  # fmt: skip
    assert got["flags"].tolist() == [[False], [False]]
    assert got["tail_mode"].tolist() == [0]  # KEEP: no place to restart; the check raises
    assert int(world.tail_pos[slot]) == 210


@pytest.mark.gpu
@pytest.mark.parametrize(
    "lens",
    [
        [(0, 8192)],
        [(24_576, 32_768)],
        [(0, 4096), (4096, 8192)] * 8,
        [(131_000 - i, 131_072) for i in range(1, 130)],  # 129 requests over a 131K context
    ],
)
def test_gpu_fields_equal_the_torch_form(lens):
    width = -(-max(s for _, s in lens) // BLOCK) * BLOCK
    _check(extend_meta, lens, 128, width, seed=len(lens), device="cuda")
