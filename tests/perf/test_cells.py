"""Cells, run order under a deadline, medians, capacity read-back (sglang_dsv4.perf.cells)."""

import pytest

from sglang_dsv4.perf.cells import (
    Cell,
    capacity,
    capacity_log_lines,
    context_length,
    does_not_fit,
    logged_kv_dtype,
    measure,
    parse_cells,
    summarize,
)


def test_parse_cells_and_errors():
    assert parse_cells("4096x1, 4Kx32,32kx128") == [Cell(4096, 1), Cell(4096, 32), Cell(32768, 128)]
    assert parse_cells("32768x1")[0].key == "32768x1"
    for bad, msg in [
        ("4096", "expected INPUTxBATCH"),
        ("4096x1x2", "expected INPUTxBATCH"),
        ("abcx1", "bad length"),
        ("0x1", ">= 1"),
        ("4096x1,4Kx1", "given twice"),
        (" , ", "no cells"),
    ]:
        with pytest.raises(ValueError, match=msg):
            parse_cells(bad)


def test_context_length():
    assert context_length(parse_cells("4096x1,4096x128"), 64) == 8192
    # 32768 + 64 + 1 -> 33 units of 1024
    assert context_length(parse_cells("4096x1,32768x32"), 64) == 33792
    assert context_length(parse_cells("128x1"), 8, minimum=1024) == 1024


SERVER_INFO = {
    "mem_fraction_static": 0.6,
    "page_size": 256,
    "kv_cache_dtype": "auto",
    "swa_full_tokens_ratio": 0.1,
    "context_length": 8192,
    "max_total_num_tokens": 61_500_000,
    "internal_states": [
        {
            "effective_max_running_requests_per_dp": 128,
            "memory_usage": {
                "weight": 2.5,
                "kvcache": 44.5,
                "token_capacity": 61_500_000,
                "token_capacity_swa": 6_150_000,
                "graph": {"decode": 0.5, "prefill": 0.25},
            },
        }
    ],
}


def test_capacity_and_fit():
    cap = capacity(SERVER_INFO)
    assert cap["token_capacity"] == 61_500_000 and cap["token_capacity_swa"] == 6_150_000
    assert cap["kvcache_gb"] == 44.5 and cap["cuda_graph_gb"] == 0.75
    assert cap["max_running_requests_effective"] == 128 and cap["page_size"] == 256
    assert does_not_fit(Cell(32768, 128), 64, cap) is None
    assert "max running requests 128" in does_not_fit(Cell(4096, 256), 64, cap)
    small = {**cap, "token_capacity": 100_000}
    # 32 * (4096 + 64) = 133120 tokens
    assert does_not_fit(Cell(4096, 32), 64, small) == "133120 tokens > pool capacity 100000"


def test_capacity_log_lines():
    log = "\n".join(
        [
            "[t] server_args=ServerArgs(max_total_tokens=None, page_size=256, ...)",
            "[t] Load weight end.",
            "[t] KV Cache is allocated. dtype: torch.float8_e4m3fn, #tokens: 61500000",
            "[t] Initialize DeepSeekV4TokenToKVPool with max_num_reqs=129 swa_size=6150000",
            "[t] max_total_num_tokens=61500000, chunked_prefill_size=8192, ...",
            "[t] Decode batch, #running-req: 1",
        ]
    )
    lines = capacity_log_lines(log)
    assert len(lines) == 3 and lines[0].endswith("#tokens: 61500000")
    assert logged_kv_dtype(lines) == "float8_e4m3fn"
    assert logged_kv_dtype(["nothing here"]) is None
    ours = [
        "KV Cache is allocated. dtype: torch.bfloat16, #tokens: 71314816, KV size: 42.54 GB",
        "sglang-dsv4 pools: fp8 rows, fp8 indexer keys; 71314816 full tokens (372.0 B each)",
    ]
    assert capacity_log_lines("\n".join(ours)) == ours  # our pool line is kept
    assert logged_kv_dtype(ours) == "fp8 rows"  # not SGLang's compute-dtype line


def test_summarize_medians_skip_failed_runs():
    runs = [
        {"decode_tok_s": 100.0, "ttft_s": 0.3, "prefill_tok_s": 10.0},
        {"error": "boom"},
        {"decode_tok_s": 300.0, "ttft_s": 0.1, "prefill_tok_s": 30.0},
        {"decode_tok_s": 200.0, "ttft_s": 0.2, "prefill_tok_s": 20.0},
    ]
    s = summarize(runs)
    assert s["n"] == 3 and s["decode_tok_s"] == 200.0 and s["ttft_s"] == 0.2
    assert s["decode_tok_s_min"] == 100.0 and s["prefill_tok_s_max"] == 30.0
    assert summarize([{"error": "x"}]) == {
        "n": 0,
        **{f"{m}{x}": None for m in ("decode_tok_s", "ttft_s", "prefill_tok_s")
           for x in ("", "_min", "_max")},
    }  # fmt: skip


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_measure_order_errors_and_deadline():
    """Warm pass over all cells, then repeats round-robin; a failed run is recorded and the
    rest go on; a run whose last duration would pass the deadline is skipped and reported."""
    clock = FakeClock()
    order, updates = [], []
    cost = {"4096x1": 1.0, "4096x128": 20.0}

    def run_case(cell):
        order.append(cell.key)
        clock.t += cost[cell.key]
        if len(order) == 4:  # 4096x128's first timed run
            raise RuntimeError("server hiccup")
        return {"decode_tok_s": 10.0 * len(order), "ttft_s": 0.5, "prefill_tok_s": 1.0}

    cells = parse_cells("4096x1,4096x128")
    # passes: warm (t 0 -> 21), run 1 (-> 42), run 2 (-> 63), run 3: 4096x1 at 63 + 1 + 5
    # fits 70, then 4096x128 at 64 + 20 + 5 > 70 is skipped
    rec = measure(cells, 3, run_case, deadline=70, margin_s=5, on_update=updates.append,
                  clock=clock)  # fmt: skip
    assert order == ["4096x1", "4096x128"] * 3 + ["4096x1"]
    small, big = rec["4096x1"], rec["4096x128"]
    assert small["warm"]["decode_tok_s"] == 10 and small["warm"]["wall_s"] == 1.0
    assert [r["decode_tok_s"] for r in small["runs"]] == [30, 50, 70]
    assert small["summary"]["n"] == 3 and small["summary"]["decode_tok_s"] == 50
    assert big["runs"][0] == {"error": "RuntimeError: server hiccup", "wall_s": 20.0}
    assert big["summary"]["n"] == 1 and big["summary"]["decode_tok_s"] == 60
    assert big["skipped"] == ["run 3: deadline (20 s run)"] and small["skipped"] == []
    assert len(updates) == 7


def test_measure_without_warm_or_deadline():
    rec = measure(parse_cells("128x1"), 2, lambda c: {"decode_tok_s": 1.0, "ttft_s": 1.0,
                  "prefill_tok_s": 1.0}, warm=False)  # fmt: skip
    assert "warm" not in rec["128x1"] and rec["128x1"]["summary"]["n"] == 2
