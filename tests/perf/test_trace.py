"""The decode-step trace parser on a synthetic kineto-format GPU trace (CUDA-graph replays,
eager launches, copies, sampling outside the step, a second thread, a kernel without a launch)
with known answers, and on a real torch.profiler CPU trace of a loop shaped like SGLang's steps."""

import gzip
import json

import pytest
import torch

from sglang_dsv4.perf.trace import format_stats, load_trace, step_stats

SCHED = (1, 10)  # (pid, tid) of the scheduler thread
OTHER = (1, 11)


class Trace:
    """Builds kineto-shaped events: CPU spans / launches on a thread, GPU ops on a stream."""

    def __init__(self):
        self.events = [{"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "x"}}]
        self.corr = 100

    def span(self, name, ts, dur, thread=SCHED):
        pid, tid = thread
        self.events.append(
            {"ph": "X", "cat": "user_annotation", "name": name, "pid": pid, "tid": tid,
             "ts": ts, "dur": dur, "args": {}}
        )  # fmt: skip

    def launch(self, name, ts, gpu_ops, thread=SCHED, cat="cuda_runtime"):
        """One launch call at CPU time ``ts``; ``gpu_ops`` = [(name, cat, gpu ts, dur)]."""
        self.corr += 1
        pid, tid = thread
        self.events.append(
            {"ph": "X", "cat": cat, "name": name, "pid": pid, "tid": tid, "ts": ts, "dur": 2,
             "args": {"correlation": self.corr}}
        )  # fmt: skip
        for op_name, op_cat, op_ts, dur in gpu_ops:
            self.events.append(
                {"ph": "X", "cat": op_cat, "name": op_name, "pid": 0, "tid": 7, "ts": op_ts,
                 "dur": dur, "args": {"correlation": self.corr, "stream": 7}}
            )  # fmt: skip


def synthetic_trace() -> Trace:
    """3 decode steps at bs 4: a graph replay of 5 kernels (gemm 10 us x2, norm 1 us x3) + one
    eager kernel (topk 3 us, a cuLaunchKernel) + one memcpy (2 us); sampling after each step;
    one extend step before them; a launch on another thread during step 2; a kernel without a
    launch event. Step 3's graph is cut short (2 kernels, the profiler stopped)."""
    t = Trace()
    t.span("step[EXTEND bs=4 toks=400]", 0, 50)
    t.launch("cudaLaunchKernel", 10, [("prefill_attn", "kernel", 60, 40)])
    graph = [("gemm", 10), ("norm", 1), ("gemm", 10), ("norm", 1), ("norm", 1)]
    for step in range(3):
        base = 1000 * (step + 1)
        t.span("step[DECODE bs=4]", base, 100)
        ops = graph if step < 2 else graph[:2]
        gpu, ts = [], base + 200
        for name, dur in ops:
            gpu.append((name, "kernel", ts, dur))
            ts += dur + 1
        t.launch("cudaGraphLaunch", base + 10, gpu)
        t.launch("cuLaunchKernel", base + 20, [("topk", "kernel", ts, 3)], cat="cuda_driver")
        t.launch("cudaMemcpyAsync", base + 30, [("Memcpy DtoD", "gpu_memcpy", ts + 4, 2)])
        t.launch("cudaLaunchKernel", base + 150, [("sample", "kernel", ts + 10, 5)])  # after span
    t.launch("cudaLaunchKernel", 2050, [("other_thread", "kernel", 2400, 7)], thread=OTHER)
    t.events.append(
        {"ph": "X", "cat": "kernel", "name": "orphan", "pid": 0, "tid": 7, "ts": 5000, "dur": 9,
         "args": {"correlation": 99999}}
    )  # fmt: skip
    return t


def test_gpu_trace_counts_per_decode_step():
    stats = step_stats(synthetic_trace().events, kind="gpu", layers=2, top=3)
    rows = stats["per_step"]
    assert stats["steps"] == 3 and stats["batch_sizes"] == [4]
    assert [r["kernels"] for r in rows] == [6, 6, 3]  # graph (5, 5, 2) + topk
    assert [r["copies"] for r in rows] == [1, 1, 1]
    # graph 10+1+10+1+1 (step 3: 10+1), topk 3, memcpy 2
    assert [r["device_us"] for r in rows] == [28, 28, 16]
    # graph kernels 1 us apart from base+200 to base+227, topk 228-231, memcpy 232-234
    assert rows[0]["span_us"] == 34
    assert stats["kernels_per_step"] == 6 and stats["kernels_per_step_min"] == 3
    assert stats["device_us_per_step"] == 28 and stats["kernels_per_layer"] == 3
    # extend kernel, 3 sampling kernels, the other thread's kernel; the orphan has no launch
    assert stats["outside_steps"] == 5 and stats["unlinked"] == 1
    top = stats["top"]
    # totals: gemm 50, topk 9, norm 3+3+1, memcpy 6
    assert [r["name"] for r in top] == ["gemm", "topk", "norm"]
    assert top[0]["count"] == 5 and top[0]["total_us"] == 50
    assert top[0]["share"] == pytest.approx(50 / (28 + 28 + 16))
    assert top[1]["per_step"] == 1
    text = format_stats(stats, "synthetic")
    assert "kernels per step: 6 (min 3, max 6)" in text and "gemm" in text


def test_gpu_trace_from_gzip_file(tmp_path):
    path = tmp_path / "x.trace.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": synthetic_trace().events, "schemaVersion": 1}, f)
    assert step_stats(load_trace(path))["kernels_per_step"] == 6


def test_missing_steps_and_kernels_are_loud():
    t = synthetic_trace()
    with pytest.raises(ValueError, match="no step spans matching"):
        step_stats(t.events, pattern=r"^step\[IDLE")
    no_kernels = [e for e in t.events if e.get("cat") not in ("kernel", "gpu_memcpy")]
    with pytest.raises(ValueError, match="no GPU kernels"):
        step_stats(no_kernels)
    with pytest.raises(ValueError, match="kind must be"):
        step_stats(t.events, kind="tpu")


def test_real_cpu_profiler_trace(tmp_path):
    """torch.profiler on CPU, steps shaped like SGLang's spans: per decode step add + mul + sum
    (sum's internals nest under it), a matmul outside the spans, an extend step excluded."""
    a, b = torch.randn(64, 64), torch.randn(64, 64)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        with torch.profiler.record_function("step[EXTEND bs=2 toks=64]"):
            torch.cat([a, b])
        for _ in range(4):
            with torch.profiler.record_function("step[DECODE bs=2]"):
                c = torch.add(a, b)
                c = torch.mul(c, b)
                c.sum()
            torch.matmul(a, b)
    path = tmp_path / "cpu.json"
    prof.export_chrome_trace(str(path))
    stats = step_stats(load_trace(path), kind="cpu", top=5)
    assert stats["steps"] == 4 and stats["batch_sizes"] == [2]
    assert [r["kernels"] for r in stats["per_step"]] == [3, 3, 3, 3]
    assert {r["name"] for r in stats["top"]} == {"aten::add", "aten::mul", "aten::sum"}
    assert all(r["count"] == 4 for r in stats["top"])
    assert stats["outside_steps"] >= 5  # 4 matmuls + the extend step's cat


def test_unlinked_kernels_warn():
    t = synthetic_trace()
    for i in range(40):
        t.events.append(
            {"ph": "X", "cat": "kernel", "name": "lost", "pid": 0, "tid": 7, "ts": 9000 + i,
             "dur": 1, "args": {"correlation": 50000 + i}}
        )  # fmt: skip
    stats = step_stats(t.events)
    assert stats["unlinked"] == 41
    assert "WARNING: 41 GPU ops have no launch event" in format_stats(stats)
    assert "WARNING" not in format_stats(step_stats(synthetic_trace().events))
