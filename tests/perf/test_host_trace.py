"""perf.host_trace: the debug plugin's targets, its timing wrappers and its inert default."""

import json
import pkgutil
from types import SimpleNamespace

import pytest

from sglang_dsv4.perf import host_trace


@pytest.fixture
def trace(tmp_path, monkeypatch):
    tr = host_trace._Trace(tmp_path)
    monkeypatch.setattr(host_trace, "_TRACE", tr)
    return tr


def test_register_is_inert_without_the_env(monkeypatch):
    from sglang.srt.plugins.hook_registry import HookRegistry

    monkeypatch.delenv(host_trace.ENV, raising=False)
    before = {k: list(v) for k, v in HookRegistry._hooks.items()}
    host_trace.register()
    assert {k: list(v) for k, v in HookRegistry._hooks.items()} == before
    assert host_trace._TRACE is None


def test_targets_resolve_in_sglang_0_5_17():
    """Every wrapped function exists (a renamed one would be skipped with only a log line)."""
    for plugins in ("", "dsv4_hosttrace"):
        for target, _ in host_trace.targets(plugins):
            obj, attr = target.rsplit(".", 1)
            assert hasattr(pkgutil.resolve_name(obj), attr), target


def test_targets_split_ours_and_native():
    ours = {t for t, _ in host_trace.targets("")}
    native = {t for t, _ in host_trace.targets("dsv4_hosttrace")}
    assert any(t.startswith("sglang_dsv4.") for t in ours)
    assert not any(t.startswith("sglang_dsv4.") for t in native)
    assert any("deepseek_v4_backend" in t for t in native)
    assert ours == {t for t, _ in host_trace.targets("dsv4,dsv4_hosttrace")}


def test_timed_records_the_call_and_passes_results(trace):
    hook = host_trace._timed("phase_a")
    assert hook(lambda x, y=1: x + y, 2, y=3) == 5
    with pytest.raises(ValueError):
        hook(lambda: (_ for _ in ()).throw(ValueError("boom")))
    assert trace.phases == ["phase_a"]
    assert len(trace.records) == 2
    i, t0, t1, info = trace.records[0]
    assert i == 0 and t1 >= t0 and info is None


def test_run_batch_keeps_mode_and_size(trace):
    batch = SimpleNamespace(forward_mode=SimpleNamespace(name="DECODE"), batch_size=lambda: 3)
    out = host_trace._run_batch(lambda s, b: "result", SimpleNamespace(), batch)
    assert out == "result"
    (rec,) = trace.records
    assert trace.phases[rec[0]] == "run_batch" and rec[3] == "DECODE:3"


def test_flush_writes_and_clears(trace, tmp_path):
    host_trace._timed("p")(lambda: None)
    path = trace.flush()
    doc = json.loads(path.read_text())
    assert doc["phases"] == ["p"] and len(doc["records"]) == 1 and doc["marks"] == []
    assert trace.records == [] and trace.flush() is None


def test_wrappers_pass_through_when_off(monkeypatch):
    monkeypatch.setattr(host_trace, "_TRACE", None)
    assert host_trace._timed("p")(lambda: 7) == 7
    assert host_trace._replay(lambda: 8) == 8
    assert host_trace._fill_from(lambda: 9) == 9


def test_capture_one_keeps_the_graph(trace, monkeypatch):
    """The capture wrapper's graphs reach the census: keep_graph is passed where torch's pybind
    base reads it (``__init__``), not only to ``__new__`` (the H100 run of 2026-12-07 failed
    capture with "instantiate() ... only when keep_graph=true")."""
    import torch

    class PybindLike:  # torch._C._CUDAGraph: __new__ ignores arguments, __init__ reads them
        def __new__(cls, keep_graph=False):
            return object.__new__(cls)

        def __init__(self, keep_graph=False):
            self.keep_graph, self.instantiated = keep_graph, False

        def raw_cuda_graph(self):
            return 1234

        def instantiate(self):
            if not self.keep_graph:
                raise RuntimeError("instantiate() ... only when keep_graph=true")
            self.instantiated = True

    monkeypatch.setattr(torch.cuda, "CUDAGraph", PybindLike)
    monkeypatch.setattr(host_trace, "graph_census", lambda handle: {"handle": handle})

    def capture_one(backend, shape_key):  # SGLang's FullCudaGraphBackend.capture_one, reduced
        backend._graphs[shape_key] = torch.cuda.CUDAGraph()
        return "captured"

    backend = SimpleNamespace(_graphs={})
    assert host_trace._capture_one(capture_one, backend, 8) == "captured"
    graph = backend._graphs[8]
    assert graph.keep_graph and graph.instantiated
    assert trace.graphs["8"] == {"handle": 1234}
    assert torch.cuda.CUDAGraph is PybindLike  # restored after the capture


@pytest.mark.gpu
def test_graph_census_straight_line_and_fork():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    x = torch.zeros(16, device="cuda")
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):  # warm the ops outside the capture
        x.add_(1)
        x.mul_(2)
    torch.cuda.synchronize()

    chain = torch.cuda.CUDAGraph(keep_graph=True)
    with torch.cuda.graph(chain, stream=s):
        x.add_(1)
        x.mul_(2)
    c = host_trace.graph_census(chain.raw_cuda_graph())
    assert c["nodes"] == 2 and c["types"] == {"Kernel": 2} and c["straight_line"]

    side = torch.cuda.Stream()
    fork = torch.cuda.CUDAGraph(keep_graph=True)
    with torch.cuda.graph(fork, stream=s):
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            x.add_(1)
        x.mul_(2)
        torch.cuda.current_stream().wait_stream(side)
    f = host_trace.graph_census(fork.raw_cuda_graph())
    assert f["types"].get("Kernel") == 2 and not f["straight_line"]


@pytest.mark.gpu
def test_marks_give_gpu_times(tmp_path):
    """Two marks around GPU work: the second's GPU time is the work's (> 0), in stream order."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    tr = host_trace._Trace(tmp_path)
    x = torch.ones(1 << 24, device="cuda")
    tr.mark("a")
    for _ in range(20):
        x.mul_(1.0001)
    tr.mark("b")
    doc = json.loads(tr.flush().read_text())
    (a, ta, ga), (b, tb, gb) = doc["marks"]
    assert (a, b) == ("a", "b") and ga == 0.0 and gb > 0.0 and tb >= ta
