"""``kernels.decode_meta``: one launch gives every field of ``DecodeMeta`` exactly as the twin
(``attention.decode.build_decode_meta``, ~45 torch ops) and advances ``tail_pos`` the same way,
for requests at position 0, inside / at the end of a block, past the window and the c128 list,
plus padded rows (``out_loc`` 0, sharing the spare tail row). The kernel's outputs are poisoned
(-7, True) before the launch so a missed store shows. CPU: interpreter; GPU: Flash-like sizes."""

import dataclasses

import pytest
import torch
from poison import PoisonedTorch
from triton_cpu import interpreted

from sglang_dsv4.attention.decode import build_decode_meta, hca_list_width
from sglang_dsv4.kernels import decode_meta

BLOCK = 128


def _world(n_slots: int, width: int, positions: list[int], pad: int, device, seed: int):
    """A random req_to_token table (full slots 1..), full -> swa map, and a decode batch."""
    g = torch.Generator().manual_seed(seed)
    n_full = n_slots * width + 1
    r2t = torch.randint(1, n_full, (n_slots, width), generator=g).int()
    f2s = torch.randint(0, 4 * width, (n_full,), generator=g)
    n = len(positions)
    req = torch.randperm(n_slots, generator=g)[:n]
    pos = torch.tensor(positions)
    loc = r2t[req, pos].long()  # the new token's full slot (> 0)
    req = torch.cat([req, torch.zeros(pad, dtype=torch.long)])  # padding reuses slot 0
    pos = torch.cat([pos, torch.zeros(pad, dtype=torch.long)])
    loc = torch.cat([loc, torch.zeros(pad, dtype=torch.long)])
    return [t.to(device) for t in (req, pos, loc, r2t, f2s)]


def _check(mod, positions, n_pages, window, pad=2, device="cpu", seed=0, width=None):
    width = width or n_pages * BLOCK
    n_slots = len(positions) + 3
    req, pos, loc, r2t, f2s = _world(n_slots, width, positions, pad, device, seed)
    spare = n_slots
    tail_want = torch.full((n_slots + 1,), -5, dtype=torch.long, device=device)
    tail_got = tail_want.clone()
    want = build_decode_meta(req, pos, loc, r2t, f2s, spare, window, BLOCK, n_pages)
    tail_want[want.tail_rows] = want.positions + 1
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(mod, "torch", PoisonedTorch())
        got = mod.decode_meta_fields(
            req.int(), pos, loc, r2t, f2s, spare, tail_got, window=window, block=BLOCK,
            n_pages=n_pages, hca_width=hca_list_width(n_pages, BLOCK),
        )  # fmt: skip
    assert set(got) == {f.name for f in dataclasses.fields(want)}
    for name, w in dataclasses.asdict(want).items():
        g = got[name]
        assert g.dtype == w.dtype and g.shape == w.shape, name
        assert torch.equal(g, w), f"{name}: {g} != {w}"
    assert torch.equal(tail_got, tail_want)


@pytest.fixture
def mod():
    with interpreted(decode_meta) as (m,):
        yield m


@pytest.mark.parametrize(
    "positions",
    [[0], [5, 127, 128, 255, 300], [0, 1, 126, 127, 129, 383, 511]],
)
def test_fields_equal_the_twin(mod, positions):
    _check(mod, positions, n_pages=4, window=16)


def test_window_not_a_power_of_two_and_many_pages(mod):
    """Pages past one loop chunk (300 > 256), a 40-token window, c128 list padded to 320."""
    _check(mod, [39, 40, 1000, 38_000], n_pages=300, window=40, pad=1, seed=3)


def test_narrow_table_clamps_page_starts(mod):
    """``req_to_token`` narrower than the pages' starts (the last column is read)."""
    _check(mod, [3, 200, 330], n_pages=5, window=8, width=400)


@pytest.mark.gpu
@pytest.mark.parametrize("n_pages", [64, 1025])
@pytest.mark.parametrize("bs", [1, 32, 128])
def test_gpu_fields_equal_the_twin(bs, n_pages):
    """8K and 131K-token graph contexts (1025 pages: 5 programs per request)."""
    g = torch.Generator().manual_seed(bs)
    positions = torch.randint(0, n_pages * BLOCK - 1, (bs,), generator=g).tolist()
    positions[0] = 0
    _check(decode_meta, positions, n_pages=n_pages, window=128, pad=3, device="cuda", seed=bs)
