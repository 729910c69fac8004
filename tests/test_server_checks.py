"""The robustness checks the GPU run uses, on the CPU test server: every bad request is refused
with a message naming the problem and the server answers right after; 64 concurrent requests
over 4 shared prefixes all finish, hit the radix cache, and leave no slot behind."""

import pytest

from sglang_dsv4.server_checks import check_bad_requests, shared_prefix_load, used_tokens


@pytest.mark.server
def test_bad_requests_are_refused_and_server_keeps_serving(tiny_server, tiny_dict):
    rows = check_bad_requests(tiny_server.url, 4096, tiny_dict["vocab_size"])
    for row in rows:
        print(row)
    assert len(rows) == 10
    assert all(r["refused_with_reason"] and r["served_after"] for r in rows), rows


@pytest.mark.server
def test_64_concurrent_shared_prefix_requests(tiny_server, tiny_dict):
    stats = shared_prefix_load(
        tiny_server.url, tiny_dict["vocab_size"], prefix_len=300, suffix_len=8, max_new_tokens=4
    )
    print(stats)
    assert stats["errors"] == 0 and stats["short_outputs"] == 0, stats
    # each prefix has 2 whole 128-token blocks; requests after the first of a prefix can hit
    assert stats["hits"] >= 32 and stats["cached_tokens"] >= 32 * 256, stats
    assert used_tokens(tiny_server.url) == [0]
