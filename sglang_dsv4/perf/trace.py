"""Decode-step statistics from a torch-profiler chrome trace (SGLang's ``/start_profile``).

SGLang wraps every forward pass in a ``record_function`` span named ``step[DECODE bs=N]``
(``sglang/srt/utils/profile_utils.py: build_step_span_name``, entered in
``ModelRunner.forward``; extend passes are ``step[EXTEND bs=N toks=T]``). A GPU operation
(kernel, memcpy, memset) belongs to a decode step when the CUDA runtime or driver call that
launched it -- same ``correlation`` id; a CUDA-graph replay is one ``cudaGraphLaunch`` and every
kernel of the graph carries its id -- ran on the span's thread inside the span. Operations
launched outside every decode span (sampling after the forward, cache flushes) are counted
apart, as are operations whose launch is not in the trace.

Extend passes (``EXTEND_STEP``) are eager: each kernel has its own launch, and the time the GPU
sits idle inside a step (first-to-last op minus the union of op intervals) is host time the GPU
waited for: Python, launches, syncs (``perf.host_gaps`` says where).

``kind="cpu"`` counts top-level ``cpu_op`` events (aten ops not nested in another op) inside the
spans instead: what a CPU server runs per step, and what the CPU tests check the parser with.
"""

from __future__ import annotations

import bisect
import gzip
import json
import re
import statistics
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

__all__ = ["DECODE_STEP", "EXTEND_STEP", "format_stats", "load_trace", "step_ops", "step_stats"]

DECODE_STEP = r"^step\[DECODE bs=(\d+)\]$"
EXTEND_STEP = r"^step\[EXTEND bs=(\d+) toks=(\d+)\]$"
KERNEL_CAT = "kernel"
COPY_CATS = ("gpu_memcpy", "gpu_memset")
LAUNCH_CATS = ("cuda_runtime", "cuda_driver")


@dataclass(frozen=True)
class Op:
    """One timed operation: a GPU kernel / copy, or a top-level CPU op."""

    name: str
    cat: str
    start: float  # us, on the timeline the op ran on
    dur: float  # us
    thread: tuple  # (pid, tid) of the launching thread
    launch_ts: float  # us, CPU time of the launch (the op's own start for CPU ops)


def load_trace(path: str | Path) -> list[dict]:
    """The ``traceEvents`` of a chrome trace file (``.json`` or ``.json.gz``)."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    if not isinstance(events, list):
        raise ValueError(f"{path}: no traceEvents list in this file")
    return events


def _complete(events: list[dict], cats) -> list[dict]:
    return [e for e in events if e.get("ph") == "X" and e.get("cat") in cats]


def gpu_ops(events: list[dict]) -> tuple[list[Op], int]:
    """GPU kernels and copies with the thread and CPU time of their launch; and how many
    GPU operations had no launch event in the trace (dropped from the statistics)."""
    launches = {}
    for e in _complete(events, LAUNCH_CATS):
        corr = e.get("args", {}).get("correlation")
        if corr is not None:
            launches[corr] = e
    ops, unlinked = [], 0
    for e in _complete(events, (KERNEL_CAT, *COPY_CATS)):
        launch = launches.get(e.get("args", {}).get("correlation"))
        if launch is None:
            unlinked += 1
            continue
        thread = (launch["pid"], launch["tid"])
        ops.append(Op(e["name"], e["cat"], float(e["ts"]), float(e["dur"]), thread, launch["ts"]))
    return ops, unlinked


def cpu_ops(events: list[dict]) -> list[Op]:
    """Top-level ``cpu_op`` events: those not nested inside another ``cpu_op`` of their thread."""
    by_thread = defaultdict(list)
    for e in _complete(events, ("cpu_op",)):
        by_thread[(e["pid"], e["tid"])].append(e)
    ops = []
    for thread, evs in by_thread.items():
        evs.sort(key=lambda e: (float(e["ts"]), -float(e["dur"])))
        open_until = float("-inf")  # end of the enclosing top-level op
        for e in evs:
            ts, dur = float(e["ts"]), float(e["dur"])
            if ts >= open_until:
                ops.append(Op(e["name"], "cpu_op", ts, dur, thread, ts))
                open_until = ts + dur
    return ops


def _spans(events: list[dict], pattern: str) -> list[dict]:
    rx = re.compile(pattern)
    spans = [e for e in _complete(events, ("user_annotation",)) if rx.match(e["name"])]
    if not spans:
        seen = sorted({e["name"] for e in _complete(events, ("user_annotation",))})[:20]
        raise ValueError(
            f"no step spans matching {pattern!r} in the trace (was a decode batch running while "
            f"the profiler was on?); user annotations present: {seen}"
        )
    return sorted(spans, key=lambda e: float(e["ts"]))


def _attribute(ops: list[Op], spans: list[dict]) -> tuple[list[list[Op]], list[Op]]:
    """Ops per span (launch inside the span, same thread) and the ops outside every span."""
    per_thread = span_windows(spans)
    starts = {k: [v[0] for v in vs] for k, vs in per_thread.items()}
    inside, outside = [[] for _ in spans], []
    for op in ops:
        rows = per_thread.get(op.thread, [])
        j = bisect.bisect_right(starts.get(op.thread, []), op.launch_ts) - 1
        if j >= 0 and op.launch_ts <= rows[j][1]:
            inside[rows[j][2]].append(op)
        else:
            outside.append(op)
    return inside, outside


def _top(step_ops: list[list[Op]], top: int) -> list[dict]:
    total = defaultdict(float)
    count = defaultdict(int)
    for ops in step_ops:
        for op in ops:
            total[op.name] += op.dur
            count[op.name] += 1
    all_us = sum(total.values()) or 1.0
    rows = sorted(total, key=total.get, reverse=True)[:top]
    n = len(step_ops)
    return [
        {
            "name": name,
            "count": count[name],
            "per_step": count[name] / n,
            "total_us": total[name],
            "share": total[name] / all_us,
        }
        for name in rows
    ]


def step_ops(events: list[dict], kind: str = "gpu", pattern: str = DECODE_STEP):
    """``(spans, ops per span, ops outside every span, ops without a launch event)`` of the step
    spans matching ``pattern`` (sorted by start); ``kind`` "gpu" (kernels and copies) or "cpu"
    (top-level CPU ops)."""
    if kind == "gpu":
        ops, unlinked = gpu_ops(events)
        if not ops:
            raise ValueError(
                f"no GPU kernels with a launch event in the trace ({unlinked} without one): "
                "profile with activities CPU and GPU on a GPU server, or pass kind='cpu'"
            )
    elif kind == "cpu":
        ops, unlinked = cpu_ops(events), 0
    else:
        raise ValueError(f"kind must be 'gpu' or 'cpu', got {kind!r}")
    spans = _spans(events, pattern)
    inside, outside = _attribute(ops, spans)
    return spans, inside, outside, unlinked


def busy_us(ops: list[Op]) -> float:
    """Length of the union of the ops' intervals (overlapping streams counted once)."""
    return sum(max(0.0, op.start + op.dur - max(op.start, end)) for op, end, _ in sweep(ops))


def sweep(ops: list[Op]):
    """``(op, end, last)`` for the ops in start order: ``end`` the latest end of the ops before
    it (-inf for the first), ``last`` the op that ends there (the timeline's one walk: busy time
    here, idle gaps in ``host_gaps``)."""
    end, last = float("-inf"), None
    for op in sorted(ops, key=lambda o: o.start):
        yield op, end, last
        if op.start + op.dur >= end:
            end, last = op.start + op.dur, op


def span_windows(spans: list[dict]) -> dict[tuple, list[tuple[float, float, int]]]:
    """Per host thread, ``(start, end, span index)`` of its step spans, in span order."""
    per_thread = defaultdict(list)
    for i, s in enumerate(spans):
        per_thread[(s["pid"], s["tid"])].append((float(s["ts"]), float(s["ts"]) + s["dur"], i))
    return per_thread


def _row(span: dict, step: list[Op]) -> dict:
    bs, toks = re.search(r"bs=(\d+)", span["name"]), re.search(r"toks=(\d+)", span["name"])
    first = min((o.start for o in step), default=0.0)
    span_us = max(o.start + o.dur for o in step) - first if step else 0.0
    return {
        "name": span["name"],
        "bs": int(bs.group(1)) if bs else None,
        "toks": int(toks.group(1)) if toks else None,
        "kernels": sum(op.cat in (KERNEL_CAT, "cpu_op") for op in step),
        "copies": sum(op.cat in COPY_CATS for op in step),
        "device_us": sum(op.dur for op in step),
        "span_us": span_us,
        "idle_us": span_us - busy_us(step),  # inside the step, nothing ran: host time
        "host_us": float(span["dur"]),  # the forward's CPU span
    }


def step_stats(
    events: list[dict],
    kind: str = "gpu",
    pattern: str = DECODE_STEP,
    top: int = 15,
    layers: int | None = None,
) -> dict:
    """Per-step counts and times of the operations launched inside the step spans.

    Returns medians over the steps (a step cut short by the profiler's stop does not move them),
    the per-step rows, the top ``top`` operations by total time (name, count, per step, total
    us, share of the steps' time) and the per-layer kernel count ``kernels / layers`` (the LM
    head and sampling prologue included: an upper bound per layer)."""
    spans, inside, outside, unlinked = step_ops(events, kind, pattern)
    rows = [_row(span, step) for span, step in zip(spans, inside, strict=True)]
    kernels = statistics.median(r["kernels"] for r in rows)
    toks = [r["toks"] for r in rows if r["toks"]]
    return {
        "kind": kind,
        "steps": len(rows),
        "batch_sizes": sorted({r["bs"] for r in rows if r["bs"] is not None}),
        "tokens_per_step": statistics.median(toks) if toks else None,
        "kernels_per_step": kernels,
        "kernels_per_step_min": min(r["kernels"] for r in rows),
        "kernels_per_step_max": max(r["kernels"] for r in rows),
        "copies_per_step": statistics.median(r["copies"] for r in rows),
        "device_us_per_step": statistics.median(r["device_us"] for r in rows),
        "span_us_per_step": statistics.median(r["span_us"] for r in rows),
        "idle_us_per_step": statistics.median(r["idle_us"] for r in rows),
        "host_us_per_step": statistics.median(r["host_us"] for r in rows),
        "layers": layers,
        "kernels_per_layer": kernels / layers if layers else None,
        "outside_steps": len(outside),
        "unlinked": unlinked,
        "per_step": rows,
        "top": _top(inside, top),
    }


def _short(name: str, width: int) -> str:
    name = name.removeprefix("void ")
    return name if len(name) <= width else name[: width - 3] + "..."


def format_stats(stats: dict, title: str = "", width: int = 90) -> str:
    """The printed summary: counts and times per step, then the top operations."""
    unit = "GPU" if stats["kind"] == "gpu" else "CPU"
    what = "kernels" if stats["kind"] == "gpu" else "top-level ops"
    toks = stats.get("tokens_per_step")
    toks = f", {toks:g} tokens per step" if toks else ""
    lines = [f"== {title or 'steps'} ({stats['steps']} steps, bs {stats['batch_sizes']}{toks})"]
    lines.append(
        f"{what} per step: {stats['kernels_per_step']:g} (min {stats['kernels_per_step_min']},"
        f" max {stats['kernels_per_step_max']}); copies/memsets per step: "
        f"{stats['copies_per_step']:g}"
    )
    if stats["kernels_per_layer"] is not None:
        lines.append(
            f"{what} per layer: {stats['kernels_per_layer']:.1f} ({stats['layers']} layers, "
            "head and step prologue included)"
        )
    lines.append(
        f"{unit} time per step: {stats['device_us_per_step'] / 1e3:.3f} ms (sum of op times), "
        f"{stats['span_us_per_step'] / 1e3:.3f} ms first-to-last op"
    )
    if "idle_us_per_step" in stats:
        lines.append(
            f"idle inside a step (first-to-last minus busy): "
            f"{stats['idle_us_per_step'] / 1e3:.3f} ms; host span of the step: "
            f"{stats['host_us_per_step'] / 1e3:.3f} ms"
        )
    lines.append(
        f"outside the steps: {stats['outside_steps']} ops; without a launch event: "
        f"{stats['unlinked']}"
    )
    in_steps = sum(r["kernels"] + r["copies"] for r in stats["per_step"])
    if stats["unlinked"] > in_steps:
        lines.append(
            f"WARNING: {stats['unlinked']} GPU ops have no launch event in the trace, more than "
            f"the {in_steps} attributed to steps: the counts above are incomplete"
        )
    lines.append(f"{'share':>6} {'total us':>10} {'count':>7} {'/step':>6}  name")
    for r in stats["top"]:
        lines.append(
            f"{100 * r['share']:>5.1f}% {r['total_us']:>10.1f} {r['count']:>7} "
            f"{r['per_step']:>6.1f}  {_short(r['name'], width)}"
        )
    return "\n".join(lines)
