from pathlib import Path

import pytest
import torch

from sglang_dsv4.config import AttnKind, DSV4Config
from sglang_dsv4.kernels.attention import fp8_rows_to_pages
from sglang_dsv4.mem.pools import DSV4KVPool
from sglang_dsv4.mem.schema import CacheSchema, EntryFormat
from sglang_dsv4.ref.kv_layout import pack_fp8_rows, unpack_fp8_rows
from sglang_dsv4.ref.quant import fp8_e4m3_fake_quant, hadamard

CONFIGS = Path(__file__).resolve().parents[2] / "sglang_dsv4" / "configs"
B = 128


def pool(fmt: EntryFormat, index_fmt=None, dtype=torch.bfloat16) -> DSV4KVPool:
    cfg = DSV4Config.from_json(CONFIGS / "dsv4-flash-dims.json")
    schema = CacheSchema.from_config(cfg, fmt, index_fmt)
    return DSV4KVPool(schema, 3 * B, 2 * B, 4, dtype, "cpu")


def layer(p: DSV4KVPool, kind: AttnKind):
    return next(lk for lk in p.layers if lk.kind is kind)


def test_fp8_pool_tensors_are_flashmla_pages():
    p = pool(EntryFormat.FP8)
    csa, hca = layer(p, AttnKind.CSA), layer(p, AttnKind.HCA)
    assert csa.raw.dtype == torch.uint8 and csa.raw.shape == (3, 130 * 576)  # 2 swa pages + dummy
    assert csa.entries.shape == (4, 33 * 576) and hca.entries.shape == (4, 2 * 576)
    assert csa.index_keys.shape == (4, 32 * 132)
    assert csa.raw_pages().shape == (3, B, 1, 584) and csa.raw_pages().stride(0) == 130 * 576
    assert csa.entry_pages().shape == (4, 32, 1, 584) and hca.entry_pages().shape == (4, 1, 1, 584)
    assert p.get_kv_size_bytes() == sum(
        t.numel() for lk in p.layers for t in (lk.raw, lk.entries, lk.index_keys) if t is not None
    ) + sum(
        2 * 4 * tb.kv.numel()
        for lk in p.layers
        for tb in (lk.tail, lk.index_tail, lk.boundary, lk.index_boundary)
        if tb is not None
    )


@pytest.mark.parametrize("fmt", [EntryFormat.FP8, EntryFormat.BF16])
def test_page_views_are_made_once_over_the_pools(fmt):
    """The kernels' page views (read by every attention launch) are made with the layer, not
    per call, and stay views of the pool tensors (what a later write puts there, they show)."""
    p = pool(fmt)
    for lk in p.layers:
        assert lk.raw_pages() is lk.raw_pages()
        assert lk.raw_pages().data_ptr() == lk.raw.data_ptr()
        assert lk.raw_pages().shape == lk.raw_rows.pages(lk.raw).shape
        if lk.kind is AttnKind.SWA:
            assert lk.entry_pages() is None
            continue
        assert lk.entry_pages() is lk.entry_pages()
        assert lk.entry_pages().data_ptr() == lk.entries.data_ptr()
        lk.entries.view(-1)[0] = 7  # one byte / value at the start of page 0
        assert lk.entry_pages().reshape(-1)[0] == 7


def test_fp8_rows_round_trip_as_packed_records():
    p = pool(EntryFormat.FP8)
    lk = layer(p, AttnKind.CSA)
    gen = torch.Generator().manual_seed(0)
    kv = torch.randn(5, 512, generator=gen) * 3
    slots = torch.tensor([128, 129, 200, 255, 300])
    lk.write_raw(slots, kv)
    expect = unpack_fp8_rows(pack_fp8_rows(kv)).bfloat16()
    assert torch.equal(lk.read_raw(slots), expect)
    assert torch.equal(lk.read_raw(slots.view(5, 1)), expect.view(5, 1, 512))
    # the kernels' view holds the same bytes as FlashMLA's packer would write
    pages = fp8_rows_to_pages(pack_fp8_rows(kv), 1)  # one row per page, then compare rows
    view = lk.raw_pages()
    for i, s in enumerate(slots.tolist()):
        page, slot = divmod(s, B)
        data = view[page].reshape(-1)[slot * 576 : slot * 576 + 576]
        scales = lk.raw[page, B * 576 + slot * 8 : B * 576 + slot * 8 + 8]
        assert torch.equal(torch.cat([data, scales]), pages[i, 0, 0])


def test_fp8_entries_and_index_keys_round_trip():
    p = pool(EntryFormat.FP8)
    lk = layer(p, AttnKind.CSA)
    gen = torch.Generator().manual_seed(1)
    x, k = torch.randn(3, 512, generator=gen), torch.randn(3, 128, generator=gen)
    rows = torch.tensor([32, 63, 95])  # pages 1..2 of 32 rows
    lk.write_entries(rows, x)
    assert torch.equal(lk.read_entries(rows).float(), unpack_fp8_rows(pack_fp8_rows(x)))
    lk.write_index_keys(rows, k)
    # stored: FP8 of the Hadamard-rotated key (one power-of-2 scale); read: rotated back
    stored = fp8_e4m3_fake_quant(hadamard(k), block=128)
    assert torch.allclose(lk.read_index_keys(rows), hadamard(stored))
    assert (lk.read_index_keys(rows).float() - k).abs().max() < 0.1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_plain_pools_keep_row_shapes(dtype):
    fmt = EntryFormat.FP32 if dtype == torch.float32 else EntryFormat.BF16
    p = pool(fmt, dtype=dtype)
    lk = layer(p, AttnKind.CSA)
    assert lk.raw.shape == (3 * B, 512) and lk.entries.shape == (4, 32, 512)
    assert lk.index_keys.shape == (4, 32, 128) and not lk.fp8
    x = torch.randn(2, 512)
    lk.write_entries(torch.tensor([33, 40]), x)
    assert torch.equal(lk.entries[1, [1, 8]], x.to(dtype))
    assert torch.equal(lk.read_entries(torch.tensor([33, 40])), x.to(dtype))


def test_plain_rows_must_match_the_row_dtype():
    with pytest.raises(ValueError, match="row dtype"):
        pool(EntryFormat.FP32, dtype=torch.bfloat16)


def test_tail_progress_lives_on_the_device():
    p = pool(EntryFormat.FP8)
    assert p.tail_pos.shape == (5,) and p.tail_pos.dtype == torch.int64
