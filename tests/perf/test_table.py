"""Merging side-by-side JSONs and the markdown table (sglang_dsv4.perf.table)."""

import json

import pytest

from sglang_dsv4.perf.cells import summarize
from sglang_dsv4.perf.table import load_runs, markdown, merge


def record(inp, bs, decode, ttft, prefill, n=3, **extra):
    runs = [{"decode_tok_s": decode, "ttft_s": ttft, "prefill_tok_s": prefill}] * n
    rec = {"input_len": inp, "batch_size": bs, "runs": runs, "skipped": [], **extra}
    return {**rec, "summary": summarize(runs)}


def doc(impl, t, cells, context=8192, full=None):
    return {
        "kind": "side_by_side",
        "impl": impl,
        "time": t,
        "date": "2026-12-06 10:00 UTC",
        "gpu": "NVIDIA H100 80GB HBM3, 81559 MiB",
        "command": f"bash scripts/gpu_side_by_side.sh {impl}",
        "status": "done",
        "startup_s": 60.0,
        "context_length": context,
        "capacity": {"token_capacity": full, "mem_fraction_static": 0.6, "page_size": 256},
        "cells": cells,
    }


def docs():
    old_ours = doc("ours", 1, {"4096x1": record(4096, 1, 50.0, 0.9, 4000.0)}, full=1000)
    ours = doc(
        "ours",
        2,
        {
            "4096x1": record(4096, 1, 140.0, 0.2, 20480.0),
            "4096x128": record(4096, 128, 0, 0, 0, n=0, skipped=["run 1: deadline (30 s run)"]),
        },
        full=14_600_000,
    )
    native = doc(
        "native",
        3,
        {
            "4096x1": record(4096, 1, 448.0, 0.1, 40960.0),
            "4096x128": record(4096, 128, 20000.0, 2.5, 209715.2),
        },
        full=61_500_000,
    )
    return [native, old_ours, ours]


def test_merge_newest_with_runs_wins():
    m = merge(docs())
    assert m["cells"]["ours"]["4096x1"]["summary"]["decode_tok_s"] == 140.0
    # the newer ours doc has no timed run of 4096x128; nothing older has one either
    assert m["cells"]["ours"]["4096x128"]["summary"]["n"] == 0
    assert [r["impl"] for r in m["runs"]] == ["ours", "ours", "native"]
    # a later doc that measured nothing does not erase an earlier result
    empty = doc("ours", 4, {"4096x1": record(4096, 1, 0, 0, 0, n=0)})
    m = merge([*docs(), empty])
    assert m["cells"]["ours"]["4096x1"]["summary"]["decode_tok_s"] == 140.0


def test_markdown_ratios_and_capacity():
    text = markdown(merge(docs()))
    rows = {ln.split("|")[1].strip() + "x" + ln.split("|")[2].strip(): ln for ln in
            text.splitlines() if ln.startswith("| 4096")}  # fmt: skip
    # decode 140 / 448, TTFT 0.2 / 0.1, prefill 20480 / 40960
    assert (
        "| 140 | 448 | 0.31x | 0.200 | 0.100 | 2.00x | 20.5K | 41.0K | 0.50x | 3/3 |"
        in (rows["4096x1"])
    )
    assert "| - | 20.0K | - |" in rows["4096x128"]
    assert "0/3 (ours: run 1: deadline (30 s run))" in rows["4096x128"]
    assert "| ours | 8192 | 14.60M |" in text and "| native | 8192 | 61.50M |" in text
    assert "full tokens ours / native at context 8192: 0.24x" in text
    assert "`bash scripts/gpu_side_by_side.sh native`" in text


def test_load_runs(tmp_path):
    paths = []
    for i, d in enumerate(docs()):
        paths.append(tmp_path / f"sbs_{i}.json")
        paths[-1].write_text(json.dumps(d))
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"bench": []}))
    loaded = load_runs([*paths, other])
    assert len(loaded) == 3 and loaded[0]["file"] == str(paths[0])
    with pytest.raises(ValueError, match="no side-by-side run JSONs"):
        load_runs([other])


def test_markdown_profile_rows():
    batch = {
        "batch_size": 32,
        "kernels_per_step": 3100,
        "kernels_per_layer": 620.0,
        "device_us_per_step": 7900.0,
        "span_us_per_step": 8400.0,
        "top": [{"name": "sparse_mqa_decode", "share": 0.014}],
    }
    ours = docs()[2] | {"profile": {"batches": [batch, {"batch_size": 1, "error": "boom"}]}}
    text = markdown(merge([*docs()[:2], ours]))
    assert "| ours | 32 | 3100 | 620 | 7.900 | 8.400 | sparse_mqa_decode (1%) |" in text
    assert "| ours | 1 | failed: boom |" in text


def test_server_that_did_not_start():
    failed = doc("native", 5, {}) | {"status": "failed: server did not start (RuntimeError)"}
    failed.pop("capacity")
    text = markdown(merge([*docs(), failed]))
    assert "status failed: server did not start (RuntimeError)" in text
    assert sum(ln.startswith("| native | 8192 |") for ln in text.splitlines()) == 1
