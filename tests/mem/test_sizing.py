"""Pool sizing: the measured budget on GPU; context x requests on CPU (not free RAM)."""

from types import SimpleNamespace

import pytest

from sglang_dsv4.mem.schema import CacheSchema, EntryFormat
from sglang_dsv4.mem.sizing import CPU_MAX_RUNNING_REQUESTS, DSV4PoolConfigurator, cpu_token_cap


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
