"""perf.host_phases: per-decode-step rows from a synthetic host-trace document."""

import json

import pytest

from sglang_dsv4.perf.host_phases import decode_rows, format_summary, load, summarize

PHASES = ["input", "run_batch", "fill_from", "replay", "event_sync"]
US = 1000  # ns


def _doc(steps: int, copy_to_launch_us: float = 300.0) -> dict:
    """``steps`` loop iterations of 1600 us: run_batch at +100 (fill_from, then the launch
    ``copy_to_launch_us`` later), a 200 us event sync at +1300; GPU marks 1600 us apart with a
    250 us copy -> graph gap and a 1300 us graph."""
    records, marks = [], []
    for k in range(steps):
        t = k * 1600 * US
        records.append((0, t, t + 10 * US, None))
        records.append((1, t + 100 * US, t + 1000 * US, "DECODE:1" if k else "EXTEND:1"))
        records.append((2, t + 200 * US, t + 210 * US, None))
        launch = t + 210 * US + int(copy_to_launch_us * US)
        records.append((3, launch, launch + 40 * US, None))
        records.append((4, t + 1300 * US, t + 1500 * US, None))
        g = k * 1600.0
        marks += [("rb0", t + 100 * US, g), ("fill", t + 210 * US, g + 20),
                  ("rp0", launch, g + 270), ("rp1", launch + 40 * US, g + 1570),
                  ("rb1", t + 1000 * US, g + 1600)]  # fmt: skip
    return {"pid": 1, "phases": PHASES, "records": records, "marks": marks, "graphs": {}}


def test_decode_rows_phases_and_gpu_marks():
    rows = decode_rows(_doc(6))
    # the last iteration has no successor (its period is unknown) and the first is an extend
    assert [r["mode"] for r in rows] == ["DECODE:1"] * 4
    r = rows[1]
    assert r["period"] == pytest.approx(1600)
    assert r["run_batch"] == pytest.approx(900)
    assert r["blocked"] == pytest.approx(200)
    assert r["busy"] == pytest.approx(1400)
    assert r["host_copy_to_launch"] == pytest.approx(300)
    assert r["gpu_idle_copy_graph"] == pytest.approx(250)
    assert r["gpu_graph"] == pytest.approx(1300)
    assert r["gpu_period"] == pytest.approx(1600)
    assert r["gpu_idle_before"] == pytest.approx(0)
    assert "gpu_period" not in rows[0] or rows[0]["gpu_period"] == pytest.approx(1600)


def test_decode_rows_batch_size_filter():
    assert decode_rows(_doc(6), batch_size=32) == []
    assert len(decode_rows(_doc(6), batch_size=1)) == 4


def test_summarize_trims_and_takes_medians():
    doc = _doc(30, copy_to_launch_us=300.0)
    rows = decode_rows(doc)
    rows[5]["host_copy_to_launch"] = 9000.0  # one outlier does not move the median
    s = summarize(rows)
    assert s["steps"] == len(rows) - 4
    assert s["median_us"]["host_copy_to_launch"] == pytest.approx(300)
    assert s["p90_us"]["host_copy_to_launch"] == pytest.approx(300)
    text = format_summary(s, "t")
    assert "host_copy_to_launch" in text and "gpu_idle_copy_graph" in text
    assert text.index("period") < text.index("run_batch") < text.index("gpu_graph")


def test_load_orders_documents(tmp_path):
    a, b = _doc(3), _doc(3)
    b["records"] = [(p, t + 10**9, e + 10**9, i) for p, t, e, i in b["records"]]
    (tmp_path / "x.json").write_text(json.dumps(b))
    (tmp_path / "y.json").write_text(json.dumps(a))
    docs = load([tmp_path / "x.json", tmp_path / "y.json"])
    assert docs[0]["records"][0][1] < docs[1]["records"][0][1]
