"""GPU timing for the bench scripts (``scripts/bench_*.py``): CUDA-graph replays and eager calls
timed with CUDA events, medians per call, GB/s, the JSON a bench writes.

A decode step runs as a CUDA graph, so most benches time graph replays: the calls are warmed up
once outside the capture (compile / autotune, lazily allocated workspaces), captured in order, the
graph replayed once, then timed ``reps`` times. Benches that rotate inputs across copies (so one
call's bytes are not served from L2) pass one closure per copy. The pure parts (:func:`per_call`,
:func:`gbps`, :func:`write_json`) run on CPU; importing this module needs no GPU.
"""

import json
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch


def per_call(elapsed_ms: Sequence[float], calls: int) -> float:
    """Median seconds per call over repeats that each took ``elapsed_ms`` for ``calls`` calls."""
    if not elapsed_ms or calls < 1:
        raise ValueError(f"need repeats and calls >= 1: got {len(elapsed_ms)} repeats, {calls}")
    return statistics.median(ms * 1e-3 / calls for ms in elapsed_ms)


def gbps(nbytes: float, seconds: float) -> float:
    """GB/s (1e9 bytes) of ``nbytes`` moved in ``seconds``."""
    return nbytes / seconds / 1e9


def write_json(path, obj, indent: int = 1) -> Path:
    """Write ``obj`` as JSON to ``path`` (its folder made if missing); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=indent))
    return path


def capture(calls: Sequence[Callable]) -> torch.cuda.CUDAGraph:
    """A CUDA graph of ``calls`` in order, replayed once; each distinct callable is warmed up
    once first, on a side stream (as torch's capture recipe asks)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for fn in dict.fromkeys(calls):  # [fn] * n: warm once
            fn()  # compile / autotune outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in calls:
            fn()
    graph.replay()
    torch.cuda.synchronize()
    return graph


def replay_ms(graph: torch.cuda.CUDAGraph, reps: int, replays: int = 1) -> list[float]:
    """CUDA-event milliseconds of ``replays`` back-to-back replays, ``reps`` times."""
    out = []
    for _ in range(reps):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(replays):
            graph.replay()
        stop.record()
        stop.synchronize()
        out.append(start.elapsed_time(stop))
    return out


def graph_seconds(calls: Sequence[Callable], reps: int, replays: int = 1) -> float:
    """Median seconds per call of ``calls`` captured in one CUDA graph (see :func:`capture`)."""
    graph = capture(calls)
    return per_call(replay_ms(graph, reps, replays), replays * len(calls))


def event_seconds(fn: Callable, reps: int) -> float:
    """Median seconds of eager ``fn()`` (CUDA events), after one warm-up call."""
    fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(reps):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        out.append(start.elapsed_time(stop))
    return per_call(out, 1)


def host_seconds(fn: Callable, reps: int) -> float:
    """Median wall seconds of ``fn()`` including a device sync (host work: plans)."""
    out = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def kernel_count(fn: Callable) -> int:
    """CUDA kernels one eager call of ``fn`` launches (torch profiler), after one warm-up call."""
    from torch.profiler import ProfilerActivity, profile  # the profiler only where counted

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type.name == "CUDA")
