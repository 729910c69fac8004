"""Per-decode-step host and GPU times from the files ``perf.host_trace`` writes.

One scheduler loop iteration runs from one ``process_input_requests`` call to the next (SGLang
0.5.17 ``Scheduler.event_loop_overlap``: inputs, ``get_next_batch_to_run``, ``run_batch`` of
batch k, ``process_batch_result`` of batch k-1 -- which waits on k-1's copy-done event --, the
delayed sample). A decode iteration is one whose ``run_batch`` ran a ``DECODE`` batch. Per such
iteration: each phase's host us (calls summed), the loop period, the time blocked in
``Event.synchronize`` (waiting for the GPU) and the rest (``busy``: the host is the bottleneck
when busy >= the GPU's step), the host us from the end of the input copy to the graph launch,
and from the GPU marks (forward stream, in stream order):

* ``gpu_idle_before``: ``rb0`` minus the previous step's ``rb1`` -- the stream waited for the
  host to start the step;
* ``gpu_prep``: ``rb0 -> fill`` (future resolve, input copy, and what the stream waited on);
* ``gpu_idle_copy_graph``: ``fill -> rp0`` -- the gap the profile shows, unprofiled;
* ``gpu_graph``: ``rp0 -> rp1`` -- the graph, its launch latency included;
* ``gpu_after``: ``rp1 -> rb1`` (sampling);
* ``gpu_period``: ``rb1`` minus the previous ``rb1``.
"""

from __future__ import annotations

import bisect
import itertools
import json
import statistics
from collections import defaultdict
from pathlib import Path

__all__ = ["decode_rows", "format_summary", "load", "summarize"]

GPU_KEYS = ("gpu_idle_before", "gpu_prep", "gpu_idle_copy_graph", "gpu_graph", "gpu_after",
            "gpu_period")  # fmt: skip


def load(paths) -> list[dict]:
    """The trace documents of ``paths`` (files), in the order written."""
    docs = [json.loads(Path(p).read_text()) for p in paths]
    return sorted(docs, key=lambda d: d["records"][0][1] if d["records"] else 0)


def _iterations(doc: dict) -> list[tuple[int, int]]:
    """``(start ns, end ns)`` of every complete loop iteration."""
    phases = doc["phases"]
    if "input" not in phases:
        return []
    i = phases.index("input")
    starts = sorted(r[1] for r in doc["records"] if r[0] == i)
    return list(itertools.pairwise(starts))


def _marks_by_iteration(doc: dict, windows) -> list[dict]:
    """The GPU marks (name -> us) of each iteration window, by host time."""
    starts = [w[0] for w in windows]
    out = [{} for _ in windows]
    for name, ns, gpu_us in doc.get("marks", []):
        j = bisect.bisect_right(starts, ns) - 1
        if 0 <= j < len(windows) and ns < windows[j][1]:
            out[j].setdefault(name, gpu_us)  # the first of its kind in the iteration
    return out


def decode_rows(doc: dict, batch_size: int | None = None) -> list[dict]:
    """One row per decode iteration of ``doc`` (of ``batch_size`` requests when given)."""
    phases = doc["phases"]
    windows = _iterations(doc)
    starts = [w[0] for w in windows]
    per = [defaultdict(float) for _ in windows]
    first = [{} for _ in windows]  # phase -> (t0, t1) of its first call in the iteration
    modes = [None] * len(windows)
    for p, t0, t1, info in doc["records"]:
        j = bisect.bisect_right(starts, t0) - 1
        if j < 0 or j >= len(windows) or t0 >= windows[j][1]:
            continue
        name = phases[p]
        per[j][name] += (t1 - t0) / 1e3
        first[j].setdefault(name, (t0, t1))
        if name == "run_batch":
            modes[j] = info
    marks = _marks_by_iteration(doc, windows)
    rows, last_rb1 = [], None
    for j, (start, end) in enumerate(windows):
        mode = modes[j] or ""
        m = marks[j]
        rb1_prev, last_rb1 = last_rb1, m.get("rb1", None)
        if not mode.startswith("DECODE") or (
            batch_size is not None and mode != f"DECODE:{batch_size}"
        ):
            continue
        row = {"mode": mode, "period": (end - start) / 1e3, **per[j]}
        row["blocked"] = per[j].get("event_sync", 0.0)
        row["busy"] = row["period"] - row["blocked"]
        if "fill_from" in first[j] and "replay" in first[j]:
            row["host_copy_to_launch"] = (first[j]["replay"][0] - first[j]["fill_from"][1]) / 1e3
        row.update(_gpu(m, rb1_prev))
        rows.append(row)
    return rows


def _gpu(m: dict, rb1_prev: float | None) -> dict:
    out = {}
    pairs = {"gpu_prep": ("rb0", "fill"), "gpu_idle_copy_graph": ("fill", "rp0"),
             "gpu_graph": ("rp0", "rp1"), "gpu_after": ("rp1", "rb1")}  # fmt: skip
    for key, (a, b) in pairs.items():
        if a in m and b in m:
            out[key] = m[b] - m[a]
    if rb1_prev is not None and "rb0" in m:
        out["gpu_idle_before"] = m["rb0"] - rb1_prev
    if rb1_prev is not None and "rb1" in m:
        out["gpu_period"] = m["rb1"] - rb1_prev
    return out


def summarize(rows: list[dict], trim: int = 2) -> dict:
    """Median and 90th percentile per key over the rows, the first and last ``trim`` dropped
    (the first steps after prefill and the step the request ends in)."""
    rows = rows[trim : len(rows) - trim] if len(rows) > 2 * trim + 2 else rows
    keys = sorted({k for r in rows for k in r if k != "mode"})
    out = {"steps": len(rows), "median_us": {}, "p90_us": {}}
    for k in keys:
        vals = sorted(r.get(k, 0.0) for r in rows)
        out["median_us"][k] = statistics.median(vals)
        out["p90_us"][k] = vals[min(len(vals) - 1, int(0.9 * len(vals)))]
    return out


ORDER = ("period", "busy", "blocked", "input", "schedule", "prepare_decode", "alloc_for_decode",
         "alloc_decode", "run_batch", "resolve", "fb_init", "forward", "can_run_graph",
         "load_batch", "fill_from", "attn_prep", "host_copy_to_launch", "replay", "sample", "war",
         "result", "event_sync", "sample_launch", *GPU_KEYS)  # fmt: skip


def format_summary(summary: dict, title: str) -> str:
    """A table: key, median us, p90 us (the loop's order: phases nest as the code does)."""
    med, p90 = summary["median_us"], summary["p90_us"]
    keys = [k for k in ORDER if k in med] + sorted(k for k in med if k not in ORDER)
    lines = [f"== {title}: {summary['steps']} decode steps (median / p90 us per step)"]
    lines += [f"  {k:<22} {med[k]:9.1f} {p90[k]:9.1f}" for k in keys]
    return "\n".join(lines)
