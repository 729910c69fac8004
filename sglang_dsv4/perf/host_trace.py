"""Host microseconds of SGLang's scheduler loop, per phase and per decode step, unprofiled: a
debug plugin (entry point ``dsv4_hosttrace``), inert unless ``SGLANG_DSV4_HOST_TRACE=DIR``.

Why: the torch profiler (``/start_profile``) shows one long GPU idle gap per decode step between
SGLang's input copy and the graph's first kernel, but CUPTI slows every launch it traces, so the
profile cannot say how long the host really takes, nor where. This wraps the loop's phases
(``Scheduler.run_batch``, ``DecodeCudaGraphRunner.load_batch``, the graph ``replay`` ...) with
``perf_counter_ns`` and records CUDA events on the forward stream at five points of each step
(``run_batch`` entry and exit, after the input copy, around ``replay()``): an event's GPU time is
when the stream reached it, so ``fill -> rp0`` is the GPU idle between the copy and the graph and
``rp0 -> rp1`` the graph's own time (launch latency included). Each captured decode graph is also
described (node types, edges: does it launch as a straight line?) through ``cuda.bindings``.

Records stay in memory and are written when the scheduler goes idle (``Scheduler.on_idle``):
``DIR/host_trace_<pid>_<n>.json``; ``perf.host_phases`` turns them into per-step rows. The
wrappers cost ~1 us each (~20 per step) and the events ~2 us each (5 per step).

Our own targets (the DSV4 allocator and backend) are wrapped only where our main plugin loads
(``SGLANG_PLUGINS`` unset or naming ``dsv4``); native's backend only where it does not (native
runs with ``SGLANG_PLUGINS=dsv4_hosttrace``).
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from pathlib import Path

__all__ = ["ENV", "MARKS", "graph_census", "register", "targets"]

ENV = "SGLANG_DSV4_HOST_TRACE"
MARKS = ("rb0", "fill", "rp0", "rp1", "rb1")  # GPU marks of one step, in stream order
_S = "sglang.srt"
_SCHED = f"{_S}.managers.scheduler.Scheduler"
_RUNNER = f"{_S}.model_executor.runner.decode_cuda_graph_runner.DecodeCudaGraphRunner"
_FULL = f"{_S}.model_executor.runner_backend.full_cuda_graph_backend.FullCudaGraphBackend"
_COMMON = (  # (target, phase): timed wherever SGLang runs
    (f"{_SCHED}.process_input_requests", "input"),
    (f"{_SCHED}.get_next_batch_to_run", "schedule"),
    (f"{_S}.managers.schedule_batch.ScheduleBatch.prepare_for_decode", "prepare_decode"),
    (f"{_S}.mem_cache.allocation.alloc_for_decode", "alloc_for_decode"),
    (f"{_S}.managers.overlap_utils.resolve_forward_inputs", "resolve"),
    (f"{_S}.model_executor.forward_batch_info.ForwardBatch.init_new", "fb_init"),
    (f"{_S}.model_executor.model_runner.ModelRunner.forward", "forward"),
    (f"{_RUNNER}.can_run_graph", "can_run_graph"),
    (f"{_RUNNER}.load_batch", "load_batch"),
    (f"{_S}.model_executor.model_runner.ModelRunner.sample", "sample"),
    (f"{_SCHED}._apply_war_barrier", "war"),
    (f"{_SCHED}.process_batch_result", "result"),
    ("torch.cuda.streams.Event.synchronize", "event_sync"),
    (f"{_SCHED}.launch_batch_sample_if_needed", "sample_launch"),
)
_OURS = (
    ("sglang_dsv4.mem.allocator.DSV4SWAAllocator.alloc_decode", "alloc_decode"),
    ("sglang_dsv4.attention.backend.DSV4AttnBackend.init_forward_metadata_out_graph", "attn_prep"),
)
_NATIVE = (
    (
        f"{_S}.layers.attention.deepseek_v4_backend.DeepseekV4AttnBackend."
        "init_forward_metadata_out_graph",
        "attn_prep",
    ),
)


class _Trace:
    """The process's records: ``(phase index, t0 ns, t1 ns, info)`` per wrapped call and
    ``(mark, host ns, event)`` per GPU mark; written out by :meth:`flush`."""

    MAX_RECORDS = 400_000
    POOL = 8192  # timing events, reused after each flush

    def __init__(self, out: Path):
        self.out = out
        self.phases: list[str] = []
        self.records: list[tuple] = []
        self.marks: list[tuple] = []
        self.graphs: dict[str, dict] = {}
        self._events: list = []
        self._cuda: bool | None = None  # whether marks can be recorded (CUDA present)
        self._flushes = 0

    def phase(self, name: str) -> int:
        if name not in self.phases:
            self.phases.append(name)
        return self.phases.index(name)

    def full(self) -> bool:
        return len(self.records) >= self.MAX_RECORDS

    def mark(self, name: str, stream=None) -> None:
        import torch

        if self._cuda is None:
            self._cuda = torch.cuda.is_available()
        if not self._cuda or len(self.marks) >= self.POOL:
            return
        if torch.cuda.is_current_stream_capturing():  # a timing event cannot join a graph
            return
        if not self._events:  # made once, outside the timed steps' way
            self._events = [torch.cuda.Event(enable_timing=True) for _ in range(self.POOL)]
        event = self._events[len(self.marks)]
        event.record(stream)
        self.marks.append((name, time.perf_counter_ns(), event))

    def flush(self) -> Path | None:
        if not self.records and not self.marks:
            return None
        marks = []
        if self.marks:
            base = self.marks[0][2]
            self.marks[-1][2].synchronize()  # stream order: the last is reached last
            marks = [(m, ns, base.elapsed_time(e) * 1e3) for m, ns, e in self.marks]
        doc = {"pid": os.getpid(), "phases": self.phases, "records": self.records,
               "marks": marks, "graphs": self.graphs}  # fmt: skip
        self.out.mkdir(parents=True, exist_ok=True)
        path = self.out / f"host_trace_{os.getpid()}_{self._flushes}.json"
        path.write_text(json.dumps(doc))
        self._flushes += 1
        self.records, self.marks = [], []
        return path


_TRACE: _Trace | None = None


def _timed(phase: str):
    def hook(original, *args, **kwargs):
        tr = _TRACE
        if tr is None or tr.full():
            return original(*args, **kwargs)
        i = tr.phase(phase)
        t0 = time.perf_counter_ns()
        try:
            return original(*args, **kwargs)
        finally:
            tr.records.append((i, t0, time.perf_counter_ns(), None))

    return hook


def _run_batch(original, scheduler, batch, *args, **kwargs):
    """``Scheduler.run_batch``: timed, its mode and size kept, GPU marks at entry and exit on the
    forward stream (the overlap scheduler's; the current stream without overlap)."""
    tr = _TRACE
    if tr is None or tr.full():
        return original(scheduler, batch, *args, **kwargs)
    stream = getattr(scheduler, "forward_stream", None)
    info = f"{batch.forward_mode.name}:{batch.batch_size()}"
    i = tr.phase("run_batch")
    t0 = time.perf_counter_ns()
    tr.mark("rb0", stream)
    try:
        return original(scheduler, batch, *args, **kwargs)
    finally:
        tr.mark("rb1", stream)
        tr.records.append((i, t0, time.perf_counter_ns(), info))


_FILL, _LAUNCH = _timed("fill_from"), _timed("replay")


def _fill_from(original, *args, **kwargs):
    """The input copy (``CudaGraphBufferRegistry.fill_from``): timed, a GPU mark after it."""
    out = _FILL(original, *args, **kwargs)
    if _TRACE is not None and not _TRACE.full():
        _TRACE.mark("fill")
    return out


def _replay(original, *args, **kwargs):
    """``FullCudaGraphBackend.replay`` (``CUDAGraph.replay()``: the graph launch): timed, GPU
    marks before and after."""
    tr = _TRACE
    if tr is None or tr.full():
        return original(*args, **kwargs)
    tr.mark("rp0")
    out = _LAUNCH(original, *args, **kwargs)
    tr.mark("rp1")
    return out


def _on_idle(original, *args, **kwargs):
    out = original(*args, **kwargs)
    if _TRACE is not None:
        _TRACE.flush()
    return out


def _capture_one(original, backend, shape_key, *args, **kwargs):
    """``FullCudaGraphBackend.capture_one``: the graph captured with ``keep_graph=True`` so that
    its nodes can be described (:func:`graph_census`), then instantiated as SGLang's would be."""
    import torch

    plain = torch.cuda.CUDAGraph

    class Kept(plain):
        # torch's pybind base reads keep_graph in __init__ (its Python __new__ passes it too):
        # both must get True, or capture_end instantiates and drops the cudaGraph_t
        def __new__(cls, keep_graph: bool = True):
            return super().__new__(cls, True)

        def __init__(self, keep_graph: bool = True):
            super().__init__(True)

    torch.cuda.CUDAGraph = Kept
    try:
        out = original(backend, shape_key, *args, **kwargs)
    finally:
        torch.cuda.CUDAGraph = plain
    graph = backend._graphs.get(shape_key)
    if isinstance(graph, Kept) and _TRACE is not None:
        key = str(getattr(shape_key, "size", shape_key))
        try:
            _TRACE.graphs[key] = graph_census(graph.raw_cuda_graph())
        except Exception as e:  # a description is optional; the graph is not
            _TRACE.graphs[key] = {"error": f"{type(e).__name__}: {e}"}
        graph.instantiate()
    return out


def graph_census(handle: int) -> dict:
    """Node types and dependency shape of a ``cudaGraph_t``: a graph whose nodes form one chain
    (one root, every node at most one dependency and one dependent) launches in constant time
    on CUDA 12.6+; forks (multi-stream capture) and event / memset nodes add launch work."""
    from cuda.bindings import runtime as rt

    def call(fn, *args):
        res = fn(*args)
        if res[0] != rt.cudaError_t.cudaSuccess:
            raise RuntimeError(f"{fn.__name__}: {res[0]!r}")
        return res

    graph = rt.cudaGraph_t(init_value=handle)
    n = call(rt.cudaGraphGetNodes, graph)[-1]
    nodes = call(rt.cudaGraphGetNodes, graph, n)[1][:n]
    types = Counter(
        call(rt.cudaGraphNodeGetType, x)[1].name.removeprefix("cudaGraphNodeType") for x in nodes
    )
    n_edges = call(rt.cudaGraphGetEdges, graph)[-1]
    edges = call(rt.cudaGraphGetEdges, graph, n_edges)  # (err, from, to, edge data, count)
    src, dst = [int(x) for x in edges[1][:n_edges]], [int(x) for x in edges[2][:n_edges]]
    fan_in, fan_out = Counter(dst), Counter(src)
    roots = call(rt.cudaGraphGetRootNodes, graph)[-1]
    most_in, most_out = max(fan_in.values(), default=0), max(fan_out.values(), default=0)
    return {
        "nodes": n,
        "types": dict(types),
        "edges": n_edges,
        "roots": roots,
        "max_deps": most_in,
        "max_dependents": most_out,
        "straight_line": roots == 1 and most_in <= 1 and most_out <= 1,
    }


def targets(plugins: str) -> list[tuple]:
    """``(target, hook)`` for the server whose ``SGLANG_PLUGINS`` is ``plugins``."""
    names = {p.strip() for p in plugins.split(",") if p.strip()}
    ours = not names or "dsv4" in names
    timed = [*_COMMON, *(_OURS if ours else _NATIVE)]
    special = [
        (f"{_SCHED}.run_batch", _run_batch),
        (f"{_S}.model_executor.cuda_graph_buffer_registry.CudaGraphBufferRegistry.fill_from",
         _fill_from),
        (f"{_FULL}.replay", _replay),
        (f"{_FULL}.capture_one", _capture_one),
        (f"{_SCHED}.on_idle", _on_idle),
    ]  # fmt: skip
    return [(t, _timed(p)) for t, p in timed] + special


def register() -> None:
    """The plugin entry point: the hooks, only when ``SGLANG_DSV4_HOST_TRACE`` names a folder."""
    global _TRACE
    out = os.environ.get(ENV)
    if not out:
        return
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    _TRACE = _Trace(Path(out))
    for target, hook in targets(os.environ.get("SGLANG_PLUGINS", "")):
        HookRegistry.register(target, hook, HookType.AROUND)
