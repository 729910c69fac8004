"""``perf.timing``: the per-call median, GB/s and JSON on CPU; graph capture and replay timing
on a GPU (a known sleep kernel)."""

import json
import math

import pytest
import torch

from sglang_dsv4.perf.timing import (
    capture,
    event_seconds,
    gbps,
    graph_seconds,
    kernel_count,
    per_call,
    write_json,
)


@pytest.mark.parametrize(
    "elapsed_ms, calls, want",
    [
        pytest.param([3.0, 1.0, 2.0], 1, 2e-3, id="odd-reps"),
        pytest.param([4.0, 1.0, 2.0, 100.0], 2, 1.5e-3, id="even-reps-outlier"),
        pytest.param([20.0], 20, 1e-3, id="one-rep-20-calls"),
    ],
)
def test_per_call_is_the_median_seconds_per_call(elapsed_ms, calls, want):
    assert math.isclose(per_call(elapsed_ms, calls), want, rel_tol=1e-12)


@pytest.mark.parametrize("elapsed_ms, calls", [([], 1), ([1.0], 0)])
def test_per_call_rejects_no_repeats_or_no_calls(elapsed_ms, calls):
    with pytest.raises(ValueError, match="repeats"):
        per_call(elapsed_ms, calls)


def test_gbps_is_bytes_per_second_over_1e9():
    assert math.isclose(gbps(3e9, 1.5), 2.0)
    assert math.isclose(gbps(2 * (1 << 30), 1e-3), 2147.483648)


def test_write_json_makes_the_folder_and_round_trips(tmp_path):
    obj = {"meta": {"gpu": "x"}, "rows": [{"us": 1.5, "op": "a"}]}
    path = write_json(tmp_path / "new" / "bench.json", obj)
    assert json.loads(path.read_text()) == obj
    assert path.read_text().startswith('{\n "meta"')  # indent 1, as the benches wrote


@pytest.mark.gpu
def test_capture_warms_each_distinct_call_once_then_captures_all():
    count = {"a": 0, "b": 0}
    x = torch.zeros(1, device="cuda")

    def a():
        count["a"] += 1
        x.add_(1)

    def b():
        count["b"] += 1
        x.add_(10)

    capture([a, a, a, b])  # warm a, b once; capture runs each python call once; one replay
    assert count == {"a": 1 + 3, "b": 1 + 1}
    assert x.item() == (1 + 10) + (3 + 10)  # warm-ups, then the one replay


@pytest.mark.gpu
def test_graph_and_event_seconds_are_per_call():
    cycles = 2_000_000  # ~1 ms at H100 clocks

    def sleep():
        torch.cuda._sleep(cycles)

    one = graph_seconds([sleep], reps=5)
    four = graph_seconds([sleep] * 4, reps=5, replays=2)
    eager = event_seconds(sleep, reps=5)
    assert 1e-4 < one < 1e-1
    assert math.isclose(four, one, rel_tol=0.2), (four, one)
    assert math.isclose(eager, one, rel_tol=0.2), (eager, one)


@pytest.mark.gpu
def test_kernel_count_counts_one_call_s_launches():
    x = torch.zeros(1024, device="cuda")
    assert kernel_count(lambda: x.add_(1)) == 1
    assert kernel_count(lambda: x.add_(1).mul_(2)) == 2
