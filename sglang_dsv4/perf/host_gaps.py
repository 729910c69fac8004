"""Where the host holds up a forward step: idle gaps on the GPU timeline and host syncs, from
the same torch-profiler trace as ``perf.trace`` (SGLang's ``/start_profile``).

An eager forward (every extend pass) keeps the GPU busy only while the host launches faster than
the GPU runs. Inside a step span, a *gap* is time between one op's end and the next op's start
with nothing running: the host was busy with Python, many small launches, or waiting on a
*sync* -- a device-to-host copy (``.item()``, ``.tolist()``, ``nonzero``, ``bool(t)``) or an
explicit ``cuda*Synchronize``, both of which block until the queue drains, so the GPU idles
after them until the host has launched the next kernel.

Each gap is named by the op after it and the host context of that op's launch: the innermost
``python_function`` frame of this package (traces taken ``with_stack``), else the enclosing
``cpu_op`` chain (``aten::index < aten::index_put_``). Each sync is the runtime call
(``cudaStreamSynchronize``, ``cudaMemcpyAsync`` of a ``Memcpy DtoH``) with the same context.
With ``kind="cpu"`` (CPU dry runs) gaps are between top-level CPU ops: Python time.
"""

from __future__ import annotations

import bisect
import itertools
from collections import defaultdict

from sglang_dsv4.perf.trace import DECODE_STEP, Op, _complete, span_windows, step_ops, sweep

__all__ = ["format_gaps", "gap_report"]

# gap histogram bins (us): < 2, 2-5, 5-20, >= 20
BINS = (2.0, 5.0, 20.0)
SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")
PACKAGE = "sglang_dsv4"
_LOOK_BACK = 4000


class HostContext:
    """The CPU ops and Python frames open on a thread at a given time."""

    def __init__(self, events: list[dict]):
        self._by_thread = defaultdict(list)  # thread -> [(ts, end, name, cat)] sorted by ts
        for e in _complete(events, ("cpu_op", "python_function")):
            ts = float(e["ts"])
            self._by_thread[(e["pid"], e["tid"])].append(
                (ts, ts + float(e["dur"]), e["name"], e["cat"])
            )
        for rows in self._by_thread.values():
            rows.sort(key=lambda r: r[0])
        self._starts = {k: [r[0] for r in v] for k, v in self._by_thread.items()}

    def at(self, thread: tuple, t: float) -> str:
        """The innermost frame of this package open at ``t`` ("file(line): function"), else the
        enclosing CPU ops outermost first ("aten::index_put_ > aten::index"), else "?"."""
        rows = self._by_thread.get(thread, [])
        j = bisect.bisect_right(self._starts.get(thread, []), t)
        # started before t and still running; a bounded look-back keeps this O(1) per query
        # (the frames that name a site open close before it)
        open_rows = [r for r in rows[max(0, j - _LOOK_BACK) : j] if r[1] >= t]
        frames = [r for r in open_rows if r[3] == "python_function" and PACKAGE in r[2]]
        if frames:
            return max(frames, key=lambda r: r[0])[2]
        ops = [r[2] for r in open_rows if r[3] == "cpu_op"]
        return " > ".join(ops[:3]) if ops else "?"


def _gaps(step: list[Op], min_us: float = 0.0) -> list[tuple[float, Op, Op]]:
    """(idle us, op before, op after) for every idle interval longer than 0 and at least
    ``min_us``."""
    return [
        (op.start - end, last, op)
        for op, end, last in sweep(step)
        if last is not None and op.start - end > 0 and op.start - end >= min_us
    ]


def _syncs(events: list[dict], spans: list[dict]) -> list[dict]:
    """Runtime calls that block the host inside the spans (same thread)."""
    windows = span_windows(spans)
    dtoh = set()  # correlation ids of device-to-host copies
    for e in _complete(events, ("gpu_memcpy",)):
        if "DtoH" in e["name"] or "Device -> Pageable" in e["name"]:
            dtoh.add(e.get("args", {}).get("correlation"))
    out = []
    for e in _complete(events, ("cuda_runtime", "cuda_driver")):
        corr = e.get("args", {}).get("correlation")
        if e["name"] not in SYNC_CALLS and corr not in dtoh:
            continue
        ts, thread = float(e["ts"]), (e["pid"], e["tid"])
        if any(lo <= ts <= hi for lo, hi, _ in windows.get(thread, ())):
            out.append(e)
    return out


def gap_report(
    events: list[dict],
    kind: str = "gpu",
    pattern: str = DECODE_STEP,
    top: int = 12,
    min_gap_us: float = 20.0,
) -> dict:
    """Idle gaps and syncs inside the step spans: a histogram of every gap by length, the gaps of
    at least ``min_gap_us`` per step, the ``top`` longest gaps (ops on both sides, the host context
    of the launch after), and the syncs grouped by host context (count, blocked us)."""
    spans, inside, _, _ = step_ops(events, kind, pattern)
    ctx = HostContext(events)
    every = sorted((g for step in inside for g in _gaps(step)), key=lambda g: -g[0])
    gaps = [g for g in every if g[0] >= min_gap_us]
    n = len(spans)
    rows = [
        {
            "idle_us": us,
            "before": before.name,
            "after": after.name,
            "site": ctx.at(after.thread, after.launch_ts),
        }
        for us, before, after in every[:top]  # the longest, whatever their length
    ]
    sites = defaultdict(lambda: [0, 0.0])
    for e in _syncs(events, spans):
        key = f"{e['name']} @ {ctx.at((e['pid'], e['tid']), float(e['ts']))}"
        sites[key][0] += 1
        sites[key][1] += float(e["dur"])
    syncs = [
        {"site": k, "count": c, "per_step": c / n, "blocked_us": us}
        for k, (c, us) in sorted(sites.items(), key=lambda kv: -kv[1][1])
    ]
    return {
        "steps": n,
        "histogram": _histogram([g[0] for g in every], n),
        "min_gap_us": min_gap_us,
        "gaps_per_step": len(gaps) / n,
        "gap_us_per_step": sum(g[0] for g in gaps) / n,
        "syncs_per_step": sum(s["count"] for s in syncs) / n,
        "top_gaps": rows,
        "syncs": syncs,
    }


def _name(name: str, width: int) -> str:
    name = name.removeprefix("void ")
    return name if len(name) <= width else name[: width - 3] + "..."


def _histogram(gaps_us: list[float], steps: int) -> list[dict]:
    """Per step: how many idle gaps and how much idle time fall in each bin of ``BINS``."""
    edges = (0.0, *BINS, float("inf"))
    rows = []
    for lo, hi in itertools.pairwise(edges):
        sel = [g for g in gaps_us if lo <= g < hi]
        label = f"< {hi:g} us" if lo == 0 else (f">= {lo:g} us" if hi == float("inf") else
                                                  f"{lo:g}-{hi:g} us")  # fmt: skip
        rows.append({"bin": label, "per_step": len(sel) / steps, "us_per_step": sum(sel) / steps})
    return rows


def format_gaps(report: dict, width: int = 60) -> str:
    hist = ", ".join(
        f"{h['bin']}: {h['per_step']:.1f} ({h['us_per_step']:.1f} us)" for h in report["histogram"]
    )
    lines = [
        f"idle gaps per step by length: {hist}",
        f"gaps >= {report['min_gap_us']:g} us per step: {report['gaps_per_step']:.1f} "
        f"({report['gap_us_per_step'] / 1e3:.3f} ms); host syncs per step: "
        f"{report['syncs_per_step']:.1f}",
    ]
    if report["syncs"]:
        lines.append(f"{'count':>7} {'/step':>6} {'blocked us':>11}  sync @ host context")
    for s in report["syncs"]:
        lines.append(
            f"{s['count']:>7} {s['per_step']:>6.1f} {s['blocked_us']:>11.1f}  {s['site'][:200]}"
        )
    if report["top_gaps"]:
        lines.append(f"{'idle us':>9}  op before -> op after  <- host context of its launch")
    for g in report["top_gaps"]:
        lines.append(
            f"{g['idle_us']:>9.1f}  {_name(g['before'], width)} -> {_name(g['after'], width)}"
            f"  <- {g['site'][:160]}"
        )
    return "\n".join(lines)
