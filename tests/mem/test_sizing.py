import logging
from pathlib import Path

import pytest
import torch

from sglang_dsv4.config import DSV4Config
from sglang_dsv4.mem.schema import CacheSchema, EntryFormat
from sglang_dsv4.mem.sizing import DSV4PoolConfigurator, row_format

CONFIGS = Path(__file__).resolve().parents[2] / "sglang_dsv4" / "configs"
NATIVE_BYTES_PER_FULL_TOKEN = 724  # SGLang 0.5.17's DSV4 pool, Flash-dims, swa ratio 0.1


def flash_dims(fmt=EntryFormat.FP8, index_fmt=None) -> CacheSchema:
    cfg = DSV4Config.from_json(CONFIGS / "dsv4-flash-dims.json")
    return CacheSchema.from_config(cfg, fmt, index_fmt)


def test_fp8_flash_dims_bytes_per_token():
    s = flash_dims()
    # SWA, c4, c128, c4: c4 entry pages 33 * 576, key pages 32 * 132, c128 pages 2 * 576
    assert s.full_bytes_per_token == (2 * (33 * 576 + 32 * 132) + 2 * 576) / 128 == 372.0
    boundary = 2 * 2 * 4 * 4 * (512 + 128)  # 2 c4 layers, kv + score fp32, 4 slots
    assert s.swa_bytes_per_token == (4 * 130 * 576 + boundary) / 128


def test_fp8_capacity_at_least_native_at_the_default_swa_ratio():
    s = flash_dims()
    per_full = s.full_bytes_per_token + 0.1 * s.swa_bytes_per_token
    assert per_full <= NATIVE_BYTES_PER_FULL_TOKEN, per_full
    budget = 48 * 10**9
    sizes = DSV4PoolConfigurator(s, 256, 0.1).calculate_pool_sizes(budget, 128)
    native = budget / NATIVE_BYTES_PER_FULL_TOKEN
    assert sizes.full_max_total_num_tokens >= native
    assert sizes.swa_max_total_num_tokens == int(sizes.full_max_total_num_tokens * 0.1) // 128 * 128
    used = (
        sizes.full_max_total_num_tokens * s.full_bytes_per_token
        + sizes.swa_max_total_num_tokens * s.swa_bytes_per_token
        + 257 * s.tail_bytes
    )
    assert used <= budget


def test_bf16_rows_hold_fewer_tokens_than_fp8():
    fp8 = DSV4PoolConfigurator(flash_dims(), 64, 0.1).calculate_pool_sizes(10**10, 128)
    bf16 = DSV4PoolConfigurator(flash_dims(EntryFormat.BF16, EntryFormat.FP8), 64, 0.1)
    sizes = bf16.calculate_pool_sizes(10**10, 128)
    assert 0 < sizes.full_max_total_num_tokens < fp8.full_max_total_num_tokens


def test_sizing_logs_what_it_sized(caplog):
    with caplog.at_level(logging.INFO, logger="sglang_dsv4.mem.sizing"):
        DSV4PoolConfigurator(flash_dims(), 8, 0.1).calculate_pool_sizes(10**9, 128)
    line = caplog.records[-1].getMessage()
    assert "fp8 rows" in line and "372.0 B each" in line and "swa ratio 0.1" in line


def test_swa_pool_too_small_is_a_clear_error():
    with pytest.raises(ValueError, match="swa-full-tokens-ratio"):
        DSV4PoolConfigurator(flash_dims(), 8, 0.01).calculate_pool_sizes_from_max_tokens(
            128 * 100, 128
        )


@pytest.mark.parametrize(
    ("model", "device", "kv", "expected"),
    [
        (torch.float32, "cuda", "fp8_e4m3", (EntryFormat.FP32, EntryFormat.FP32)),
        (torch.bfloat16, "cpu", "bfloat16", (EntryFormat.BF16, EntryFormat.BF16)),
        (torch.bfloat16, "cuda", "fp8_e4m3", (EntryFormat.FP8, EntryFormat.FP8)),
        (torch.bfloat16, "cuda", "auto", (EntryFormat.FP8, EntryFormat.FP8)),
        (torch.bfloat16, "cuda", "bfloat16", (EntryFormat.BF16, EntryFormat.FP8)),
    ],
)
def test_row_format(model, device, kv, expected):
    assert row_format(model, device, kv)[:2] == expected


def test_row_format_refuses_other_kv_dtypes():
    with pytest.raises(ValueError, match="fp8_e4m3 or bfloat16"):
        row_format(torch.bfloat16, "cuda", "fp8_e5m2")
