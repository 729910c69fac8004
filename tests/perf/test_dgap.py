"""scripts/dgap.py: the graph-launch report of a profiler trace (synthetic kineto events)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
import dgap  # a script: importable once scripts/ is on the path


def _x(cat, name, ts, dur, corr=None, tid=1):
    args = {"correlation": corr} if corr is not None else {}
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "pid": 7, "tid": tid,
            "args": args}  # fmt: skip


def _step(t0: float, corr: int) -> list[dict]:
    """The copy's launch at t0, 200 us of Python (a 150 us frame inside), the graph launch
    (30 us), its first kernel 40 us after the launch starts."""
    return [
        _x("cuda_runtime", "cudaLaunchKernel", t0, 5, corr),
        _x("python_function", "backend.py(121): init_forward_metadata_out_graph", t0 + 20, 150),
        _x("cpu_op", "aten::copy_", t0 + 180, 10),
        _x("cuda_runtime", "cudaEventRecord", t0 + 195, 2),  # not a launch: the window goes on
        _x("cuda_runtime", "cudaGraphLaunch", t0 + 205, 30, corr + 1),
        _x("kernel", "multi_tensor_apply_kernel", t0 + 8, 3, corr),
        _x("kernel", "_decode_meta_kernel", t0 + 245, 4, corr + 1),
        _x("kernel", "nvjet", t0 + 250, 100, corr + 1),
    ]


def test_launch_report_medians_and_frames():
    events = _step(0.0, 10) + _step(2000.0, 20)
    rep = dgap.launch_report(events)
    assert rep["launches"] == 2
    med = rep["median_us"]
    assert med["launch_us"] == pytest.approx(30)
    assert med["after_prev_launch_us"] == pytest.approx(200)
    assert med["to_first_kernel_us"] == pytest.approx(40)
    frames = rep["frames_before_launch_us_per_launch"]
    assert frames["backend.py(121): init_forward_metadata_out_graph"] == pytest.approx(150)
    assert frames["aten::copy_"] == pytest.approx(10)


def test_launch_report_without_graphs():
    rep = dgap.launch_report([_x("cuda_runtime", "cudaLaunchKernel", 0, 5, 1)])
    assert rep["launches"] == 0 and rep["median_us"] == {}


def test_client_times_split_the_bench_figure():
    """10 chunks 1 ms apart after a 2 s prefill, the stream ending 40 ms after the last one: the
    steady decode is 1000 tok/s, bench_one_batch_server's figure 10 / 49 ms."""
    arrivals = [2.0 + 0.001 * i for i in range(10)]
    got = dgap.client_times(0.0, arrivals, arrivals[-1] + 0.040, 10)
    assert abs(got["decode_tok_s"] - 1000) < 1e-6 and abs(got["ttft_s"] - 2.0) < 1e-9
    assert abs(got["bench_tok_s"] - 10 / 0.049) < 1e-6
    assert abs(got["tail_s"] - 0.040) < 1e-9 and abs(got["second_chunk_s"] - 0.001) < 1e-9
    assert dgap.client_times(0.0, [], 1.0, 0)["decode_tok_s"] is None
