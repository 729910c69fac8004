"""Idle gaps and host syncs inside extend steps, on a synthetic kineto-shaped trace with known
answers (Python frames, CPU ops, a DtoH copy + stream sync, a late launch), and on a real CPU
torch.profiler trace."""

import torch

from sglang_dsv4.perf.host_gaps import format_gaps, gap_report
from sglang_dsv4.perf.trace import EXTEND_STEP, format_stats, load_trace, step_stats

PID, TID = 1, 10
PLAN = "sglang_dsv4/attention/plan.py(60): plan_batch"
ATTN = "sglang_dsv4/model/deepseek_v4.py(200): _attention"


class Trace:
    def __init__(self):
        self.events, self.corr = [], 100

    def cpu(self, cat, name, ts, dur, **args):
        self.events.append({"ph": "X", "cat": cat, "name": name, "pid": PID, "tid": TID,
                            "ts": ts, "dur": dur, "args": args})  # fmt: skip

    def launch(self, name, ts, gpu=None, dur=2):
        self.corr += 1
        self.cpu("cuda_runtime", name, ts, dur, correlation=self.corr)
        if gpu is not None:
            op_name, cat, start, op_dur = gpu
            self.events.append({"ph": "X", "cat": cat, "name": op_name, "pid": 0, "tid": 7,
                                "ts": start, "dur": op_dur,
                                "args": {"correlation": self.corr}})  # fmt: skip


def extend_trace(steps: int = 2) -> Trace:
    """Per step (base b = 1000 i): kernel A [b+100, b+200) launched from aten::linear; plan's
    .item() (DtoH copy [b+200, b+202) + a 15 us stream sync); kernel B [b+300, b+350) launched
    at b+90 from aten::mm in _attention: one 98 us gap before B."""
    t = Trace()
    for i in range(steps):
        b = 1000 * i
        t.cpu("user_annotation", "step[EXTEND bs=2 toks=600]", b, 999)
        t.cpu("python_function", ATTN, b + 1, 990)
        t.cpu("cpu_op", "aten::linear", b + 10, 20)
        t.launch("cudaLaunchKernel", b + 15, ("gemm_A", "kernel", b + 100, 100))
        t.cpu("python_function", PLAN, b + 40, 40)
        t.cpu("cpu_op", "aten::item", b + 45, 30)
        t.cpu("cpu_op", "aten::_local_scalar_dense", b + 46, 28)
        t.launch("cudaMemcpyAsync", b + 50, ("Memcpy DtoH (Device -> Pageable)", "gpu_memcpy",
                                            b + 200, 2))  # fmt: skip
        t.launch("cudaStreamSynchronize", b + 55, dur=15)
        t.cpu("cpu_op", "aten::mm", b + 85, 10)
        t.launch("cudaLaunchKernel", b + 90, ("attn_B", "kernel", b + 300, 50))
    t.launch("cudaStreamSynchronize", 9000, dur=5)  # outside every step: not counted
    return t


def test_extend_step_stats_idle_time():
    stats = step_stats(extend_trace().events, pattern=EXTEND_STEP, layers=1)
    assert stats["steps"] == 2 and stats["tokens_per_step"] == 600
    assert stats["kernels_per_step"] == 2 and stats["copies_per_step"] == 1
    assert stats["device_us_per_step"] == 152  # 100 + 2 + 50
    assert stats["span_us_per_step"] == 250  # b+100 .. b+350
    assert stats["idle_us_per_step"] == 98  # b+202 .. b+300
    assert stats["host_us_per_step"] == 999
    text = format_stats(stats, "extend")
    assert "600 tokens per step" in text and "idle inside a step" in text


def test_gaps_and_syncs_named_by_host_context():
    report = gap_report(extend_trace().events, pattern=EXTEND_STEP, min_gap_us=20)
    assert report["steps"] == 2 and report["gaps_per_step"] == 1
    assert report["gap_us_per_step"] == 98
    gap = report["top_gaps"][0]
    assert (gap["idle_us"], gap["before"], gap["after"]) == (98, "Memcpy DtoH (Device -> Pageable)",
                                                             "attn_B")  # fmt: skip
    assert gap["site"] == ATTN  # the plan frame closed before B's launch
    syncs = {s["site"]: s for s in report["syncs"]}
    assert set(syncs) == {f"cudaStreamSynchronize @ {PLAN}", f"cudaMemcpyAsync @ {PLAN}"}
    assert syncs[f"cudaStreamSynchronize @ {PLAN}"]["count"] == 2  # not the one outside
    assert syncs[f"cudaStreamSynchronize @ {PLAN}"]["blocked_us"] == 30
    assert report["syncs_per_step"] == 2
    text = format_gaps(report)
    assert "host syncs per step: 2.0" in text and "attn_B" in text
    # a larger threshold drops the gap from the per-step count; the longest gaps stay listed
    high = gap_report(extend_trace().events, pattern=EXTEND_STEP, min_gap_us=99)
    assert high["gaps_per_step"] == 0 and high["top_gaps"][0]["idle_us"] == 98
    # the histogram: per step one 98 us gap (>= 20 us), nothing shorter
    hist = {h["bin"]: (h["per_step"], h["us_per_step"]) for h in report["histogram"]}
    assert hist == {"< 2 us": (0, 0), "2-5 us": (0, 0), "5-20 us": (0, 0), ">= 20 us": (1, 98)}
    assert "op before -> op after" in text and ">= 20 us: 1.0 (98.0 us)" in text


def test_histogram_bins_short_gaps():
    """Graph-replay-like step: kernels 1, 3 and 10 us apart fall in the three short bins."""
    t = Trace()
    t.cpu("user_annotation", "step[DECODE bs=1]", 0, 500)
    starts = [100, 111, 124, 144]  # gaps: 1, 3, 10 after 10-us kernels
    for i, s in enumerate(starts):
        t.launch(
            "cudaGraphLaunch" if i == 0 else "cudaLaunchKernel", 10 + i, (f"k{i}", "kernel", s, 10)
        )
    report = gap_report(t.events)
    hist = {h["bin"]: (h["per_step"], h["us_per_step"]) for h in report["histogram"]}
    assert hist == {"< 2 us": (1, 1), "2-5 us": (1, 3), "5-20 us": (1, 10), ">= 20 us": (0, 0)}
    assert [g["idle_us"] for g in report["top_gaps"]] == [10, 3, 1]
    assert (report["top_gaps"][0]["before"], report["top_gaps"][0]["after"]) == ("k2", "k3")
    assert report["gaps_per_step"] == 0  # none >= 20 us


def test_cpu_ops_named_without_stack():
    """Without Python frames the site is the enclosing CPU op chain, outermost first."""
    events = [e for e in extend_trace(1).events if e["cat"] != "python_function"]
    report = gap_report(events, pattern=EXTEND_STEP)
    assert report["top_gaps"][0]["site"] == "aten::mm"
    sites = {s["site"] for s in report["syncs"]}
    assert "cudaMemcpyAsync @ aten::item > aten::_local_scalar_dense" in sites


def test_real_cpu_trace_gaps(tmp_path):
    """torch.profiler on CPU: a Python sleep between two ops inside an extend span is a gap."""
    import time

    a = torch.randn(64, 64)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(2):
            with torch.profiler.record_function("step[EXTEND bs=1 toks=64]"):
                torch.mm(a, a)
                time.sleep(0.005)
                torch.add(a, a)
    path = tmp_path / "cpu.json"
    prof.export_chrome_trace(str(path))
    events = load_trace(path)
    report = gap_report(events, kind="cpu", pattern=EXTEND_STEP, min_gap_us=1000)
    assert report["gaps_per_step"] == 1
    assert report["top_gaps"][0]["after"] == "aten::add"
    assert report["gap_us_per_step"] >= 4500  # the sleep, at least (more on a loaded machine)
    stats = step_stats(events, kind="cpu", pattern=EXTEND_STEP)
    assert stats["idle_us_per_step"] >= 4000
