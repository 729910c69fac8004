from pathlib import Path

import pytest

from sglang_dsv4.config import AttnKind, DSV4Config
from sglang_dsv4.mem.schema import CacheSchema, EntryFormat

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
GIB = 2**30


def schema(name: str, fmt: EntryFormat) -> CacheSchema:
    return CacheSchema.from_config(DSV4Config.from_json(CONFIGS / f"{name}.json"), fmt)


def test_per_layer_contents_follow_the_schedule():
    s = schema("dsv4-flash", EntryFormat.FP8)
    assert s.block_size == 128
    swa, csa, hca = s.layers[0], s.layers[2], s.layers[3]
    assert (swa.kind, swa.entries_per_block, swa.tail_shape) == (AttnKind.SWA, 0, None)
    assert (csa.entries_per_block, csa.index_keys_per_block) == (32, 32)
    assert csa.tail_shape == (8, 1024) and csa.index_tail_shape == (8, 256)
    assert (hca.entries_per_block, hca.index_keys_per_block, hca.tail_shape) == (1, 0, (128, 512))


def test_fp8_row_is_flashmla_584_bytes():
    s = schema("dsv4-flash", EntryFormat.FP8)
    assert s.kv_row_bytes == 448 + 64 * 2 + 7 + 1 == 584
    assert s.index_key_bytes == 132


@pytest.mark.parametrize(
    ("name", "fmt", "gib_at_1m", "half_ulp"),
    [
        ("dsv4-flash", EntryFormat.FP8, 3.8, 0.05),
        ("dsv4-flash", EntryFormat.BF16, 6.7, 0.05),
        ("dsv4-pro", EntryFormat.BF16, 9.62, 0.005),
    ],
)
def test_kv_per_sequence_at_1m_tokens_matches_published_sizes(name, fmt, gib_at_1m, half_ulp):
    """dsv4_semantics.md section 5: Flash FP8 ~3.8 GiB, Flash BF16 ~6.7 GiB, Pro BF16 9.62 GiB
    (vLLM's figure) of compressed KV per 1M-token sequence."""
    s = schema(name, fmt)
    size = s.blocks_for(1 << 20) * s.block_bytes / GIB
    assert abs(size - gib_at_1m) <= half_ulp, size  # equal to the published digits


def test_tail_bytes():
    s = schema("dsv4-flash", EntryFormat.FP8)
    per_csa = 2 * 4 * (8 * 1024 + 8 * 256)
    per_hca = 2 * 4 * 128 * 512
    assert s.tail_bytes == 21 * per_csa + 20 * per_hca


def test_boundary_full_and_swa_bytes():
    s = schema("dsv4-flash", EntryFormat.FP8)
    assert s.boundary_bytes == 21 * 2 * 4 * 4 * (512 + 128)
    # A full slot carries its block's compressed pages only; raw pages + boundary go with swa.
    # FP8 pages are FlashMLA's: rows' 576 data bytes, then their 8 scale bytes, padded to 576.
    c4_page, c128_page = 33 * 576, 2 * 576  # 32 * 584 = 18688 -> 19008; 584 -> 1152
    assert s.full_bytes_per_token == (21 * (c4_page + 32 * 132) + 20 * c128_page) / 128
    raw_page = 130 * 576  # 128 * 584 = 74752 -> 74880
    assert s.swa_bytes_per_token == (raw_page * 43 + s.boundary_bytes) / 128


def test_plain_rows_have_no_page_padding():
    s = schema("dsv4-flash", EntryFormat.BF16)
    assert s.raw_page_bytes == 128 * 1024
    assert s.full_bytes_per_token == (21 * 32 * (1024 + 256) + 20 * 1024) / 128


def test_bf16_rows_with_fp8_indexer_keys():
    cfg = DSV4Config.from_json(CONFIGS / "dsv4-flash.json")
    s = CacheSchema.from_config(cfg, EntryFormat.BF16, EntryFormat.FP8)
    assert (s.fmt, s.index_fmt, s.index_key_bytes) == (EntryFormat.BF16, EntryFormat.FP8, 132)
    assert s.full_bytes_per_token == (21 * 32 * (1024 + 132) + 20 * 1024) / 128


def test_journal_is_the_tails_plus_n_slots_per_tail_and_nothing_without_speculation():
    s = schema("dsv4-flash", EntryFormat.FP8)
    assert s.journal_bytes(0) == 0  # not speculating
    # per extra slot: 21 c4 layers x (1024 + 256) channels, 20 c128 layers x 512; kv + score
    per_slot = 2 * 4 * (21 * (1024 + 256) + 20 * 512)
    assert s.tail_bytes == 2 * 4 * (21 * 8 * (1024 + 256) + 20 * 128 * 512)
    for n in (2, 4):
        assert s.journal_bytes(n) == s.tail_bytes + n * per_slot + 8  # + the int64 prefix
    csa = s.layers[2]
    assert s.journal_shapes(csa, 4) == ((12, 1024), (12, 256))
    assert s.journal_shapes(s.layers[0], 4) == (None, None)  # SWA: no tail, no journal
