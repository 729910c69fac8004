"""``kernels.flashmla_lists``: one launch gives FlashMLA's extend index lists and workspace entry
rows of a layer kind exactly as the torch form (``attention.extend_choice.lists_torch``): SWA
(window only), c4 (window + the picks' columns left -1), c128 (window + every visible entry),
over random batches (fresh, chunked, prefix hits, narrow entry pages). Outputs are poisoned
(-7) before the launch so a missed store shows. CPU: interpreter; GPU: Flash shapes."""

import pytest
import torch
from plan_cases import BLOCK, case, pool
from poison import PoisonedTorch
from triton_cpu import interpreted

from sglang_dsv4.attention.extend_choice import lists_torch
from sglang_dsv4.attention.plan_tables import ENTRY_RATIOS, tables_torch
from sglang_dsv4.kernels import flashmla_lists


def _check(mod, lens, ratio, window, width, topk=0, seed=0, device="cpu"):
    r2t, f2s, n_slots, progress, inp = case(lens, window, width, seed, device)
    t = tables_torch(pool(f2s, n_slots, window, progress), r2t, inp).tables
    starts = t.entry_start[ENTRY_RATIOS.index(ratio)] if ratio else None
    n_ent = [s // ratio if ratio else 0 for _, s in lens]
    extra = max(n_ent) if ratio == 128 else 0
    cols = window + extra + topk
    kw = dict(
        ratio=ratio, entries_per_block=BLOCK // ratio if ratio else 1, total_ent=sum(n_ent),
        max_ent=max(n_ent), extra=extra, topk=topk, width=cols + (-cols % 128),
    )  # fmt: skip
    want = lists_torch(t, starts, **kw)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(mod, "torch", PoisonedTorch())
        got = mod.flashmla_lists(t, starts, **kw)
    for g, w, name in zip(got, want, ("lists", "entry rows"), strict=True):
        assert g.dtype == w.dtype and g.shape == w.shape, name
        assert torch.equal(g, w), f"{name}: {g} != {w}"
    return want


@pytest.fixture
def mod():
    with interpreted(flashmla_lists) as (m,):
        yield m


LENS = [(0, 131), (131, 300), (BLOCK, 517), (0, 3)]


@pytest.mark.parametrize("ratio, topk", [(0, 0), (4, 24), (128, 0)])
def test_lists_and_entry_rows_equal_the_torch_form(mod, ratio, topk):
    lists, rows = _check(mod, LENS, ratio, 16, 640, topk)
    assert (rows.numel() > 0) == (ratio > 0)
    assert lists.shape[-1] % 128 == 0


def test_many_entries_cross_program_chunks(mod):
    """c4 entries past one program's 256 (2500 // 4 = 625), a 40-token window, c128 visible
    lists of 19 columns."""
    for ratio in (4, 128):
        _check(mod, [(2000, 2500), (7, 90)], ratio, 40, 2560, topk=8 if ratio == 4 else 0, seed=4)


@pytest.mark.gpu
@pytest.mark.parametrize("ratio, topk", [(0, 0), (4, 512), (128, 0)])
@pytest.mark.parametrize("lens", [[(0, 8192)], [(24_576, 32_768)], [(0, 4096), (4096, 8192)] * 8])
def test_gpu_lists_equal_the_torch_form(ratio, topk, lens):
    width = -(-max(s for _, s in lens) // BLOCK) * BLOCK
    _check(flashmla_lists, lens, ratio, 128, width, topk, seed=len(lens), device="cuda")
