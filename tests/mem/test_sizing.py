import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from sglang_dsv4.config import DSV4Config
from sglang_dsv4.mem.schema import CacheSchema, EntryFormat
from sglang_dsv4.mem.sizing import (
    CPU_MAX_RUNNING_REQUESTS,
    DSV4PoolConfigurator,
    cpu_token_cap,
    row_format,
    tail_rows,
)

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
        + tail_rows(256) * s.tail_bytes
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


# CPU: context x requests, not free RAM


def kvc(device, context=4096, max_total_tokens=None, max_running_requests=None):
    return SimpleNamespace(
        device=device,
        server_args=SimpleNamespace(
            max_total_tokens=max_total_tokens, max_running_requests=max_running_requests
        ),
        model_config=SimpleNamespace(context_len=context, model_path="/some/ckpt"),
    )


def test_cpu_cap_is_context_times_requests_and_only_on_cpu():
    cap, why = cpu_token_cap(kvc("cpu"))
    assert cap == 4096 * CPU_MAX_RUNNING_REQUESTS and "4096 x 16 requests" in why
    assert cpu_token_cap(kvc("cpu", context=8192, max_running_requests=2))[0] == 16384
    assert cpu_token_cap(kvc("cuda")) is None  # GPU: the measured budget decides
    assert cpu_token_cap(kvc("cpu", max_total_tokens=1000)) is None  # the user's cap wins


@pytest.fixture(scope="module")
def schema(tiny_cfg):
    return CacheSchema.from_config(tiny_cfg, EntryFormat.BF16)


def test_cap_bounds_a_large_budget_and_a_small_budget_still_bounds_it(schema, caplog):
    caplog.set_level("INFO")
    big, small = 1 << 36, 1 << 24  # 64 GiB of "free RAM", 16 MiB
    free = DSV4PoolConfigurator(schema, 16, 0.1)
    capped = DSV4PoolConfigurator(schema, 16, 0.1, (65536, "context x requests"))
    assert free.calculate_pool_sizes(big, 128).full_max_total_num_tokens > 10**7
    sizes = capped.calculate_pool_sizes(big, 128)
    assert (sizes.full_max_total_num_tokens, sizes.swa_max_total_num_tokens) == (65536, 6528)
    assert "65536 full token slots = context x requests" in caplog.text
    # a budget below the cap still decides (and equals the uncapped sizing)
    below = free.calculate_pool_sizes(small, 128)
    assert 0 < below.full_max_total_num_tokens < 65536
    assert capped.calculate_pool_sizes(small, 128) == below


# speculative decoding: the verify journal


def test_speculation_reserves_exactly_the_verify_journal(caplog):
    s, budget = flash_dims(), 10**10
    plain = DSV4PoolConfigurator(s, 256, 0.1)
    spec = DSV4PoolConfigurator(s, 256, 0.1, verify_tokens=4)
    assert plain.journal_bytes == 0 and plain.tails_bytes == spec.tails_bytes
    assert spec.journal_bytes == s.journal_bytes(4) * tail_rows(256) > 0
    with caplog.at_level(logging.INFO, logger="sglang_dsv4.mem.sizing"):
        with_journal = spec.calculate_pool_sizes(budget, 128)
    assert "verify journal 0.20 GB (4 tokens per verify" in caplog.text
    # the same pools as without speculation on a budget smaller by the journal, not more
    assert with_journal == plain.calculate_pool_sizes(budget - spec.journal_bytes, 128)
    assert with_journal != plain.calculate_pool_sizes(budget, 128)


def test_real_flash_journal_at_256_requests_is_the_documented_3_46_gb():
    cfg = DSV4Config.from_json(CONFIGS / "dsv4-flash.json")
    spec = DSV4PoolConfigurator(CacheSchema.from_config(cfg), 256, 0.1, verify_tokens=4)
    assert round(spec.journal_bytes / 1e9, 2) == 3.46  # docs/speculative.md, mem.sizing
    assert round(spec.tails_bytes / 1e9, 2) == 3.15


def spec_kvc(tiny_dict, algorithm, draft_worker=False, draft_tokens=4, device="cuda"):
    """An SGLang KV-cache configurator as ``from_kv_cache_configurator`` reads it."""
    args = SimpleNamespace(
        device=device, kv_cache_dtype="auto", max_total_tokens=1024, max_running_requests=8,
        swa_full_tokens_ratio=0.1, speculative_algorithm=algorithm,
        speculative_num_draft_tokens=draft_tokens,
    )  # fmt: skip
    hf_config = SimpleNamespace(to_dict=lambda: tiny_dict)
    model_config = SimpleNamespace(
        hf_config=hf_config, dtype=torch.bfloat16, is_draft_model=False, context_len=512
    )
    return SimpleNamespace(
        device=device, server_args=args, model_config=model_config, is_draft_worker=draft_worker
    )


def test_speculation_comes_from_the_server_args(tiny_dict):
    def width(*args, **kwargs):
        return DSV4PoolConfigurator.from_kv_cache_configurator(spec_kvc(*args, **kwargs))

    assert width(tiny_dict, "EAGLE", draft_tokens=3).verify_tokens == 3
    assert width(tiny_dict, None).verify_tokens == 0
    assert width(tiny_dict, "EAGLE", draft_worker=True).verify_tokens == 0  # no journal there
    assert width(tiny_dict, "EAGLE").journal_bytes > 0 == width(tiny_dict, None).journal_bytes


@pytest.mark.parametrize("algorithm", ["EAGLE", None])
def test_the_backends_journal_is_what_sizing_reserved(tiny_dict, tiny_cfg, algorithm):
    """Pools and backend built as SGLang builds them (``plugin._build_pool``: a request slot per
    ``ReqToTokenPool`` row) from the server args the sizing read: the journal's tensors take
    exactly the bytes it reserved (none without speculation)."""
    from sglang.srt.mem_cache.memory_pool import ReqToTokenPool

    from sglang_dsv4.attention.backend import DSV4AttnBackend
    from sglang_dsv4.mem.pools import DSV4KVPool
    from sglang_dsv4.mem.sizing import schema_for

    kvc = spec_kvc(tiny_dict, algorithm, device="cpu")
    sizing = DSV4PoolConfigurator.from_kv_cache_configurator(kvc)
    args = kvc.server_args
    rtp = ReqToTokenPool(args.max_running_requests, 512, "cpu", enable_memory_saver=False)
    schema, row_dtype = schema_for(kvc.model_config, args, "cpu")
    n_req = rtp.req_to_token.shape[0]
    pool = DSV4KVPool(schema, 1024, 1024, n_req, row_dtype, "cpu")
    runner = SimpleNamespace(
        token_to_kv_pool=pool, req_to_token_pool=rtp, model=SimpleNamespace(cfg=tiny_cfg),
        model_config=kvc.model_config, token_to_kv_pool_allocator=SimpleNamespace(),
        server_args=args, is_draft_worker=False,
    )  # fmt: skip
    journal = DSV4AttnBackend(runner).journal
    ext = [t for j in journal.tails.values() for t in (j.ext.kv, j.ext.score)]
    allocated = sum(t.nbytes for t in ext) + journal.prefix.nbytes
    assert allocated == sizing.journal_bytes
    assert (allocated > 0) == (algorithm is not None)
    bufs = [b for lk in pool.layers for b in (lk.tail, lk.index_tail) if b is not None]
    tails = [t for b in bufs for t in (b.kv, b.score)]
    assert sum(t.nbytes for t in tails) == sizing.tails_bytes  # the tails' rows, likewise
