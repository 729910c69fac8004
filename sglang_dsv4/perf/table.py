"""Merge side-by-side JSONs (one per implementation and server start, written by
``scripts/side_by_side.py``) into one record and a markdown table with ours / native ratios.

Per implementation and cell, the newest file that has at least one timed run of the cell wins
(a re-run replaces an older one; a run cut by its deadline does not erase an earlier result).
Capacity is compared per context length: the pools are sized at server start and both depend on
it (and on ``--mem-fraction-static``, which the table prints)."""

from __future__ import annotations

import json
from pathlib import Path

from sglang_dsv4.perf.cells import METRICS

__all__ = ["IMPLS", "load_runs", "markdown", "merge"]

IMPLS = ("ours", "native")


def load_runs(paths) -> list[dict]:
    """The side-by-side JSONs among ``paths`` (other JSON files are ignored, with a note)."""
    docs = []
    for p in map(Path, paths):
        doc = json.loads(p.read_text())
        if not (isinstance(doc, dict) and doc.get("kind") == "side_by_side"):
            print(f"perf_table: {p} is not a side-by-side run JSON, ignored")
            continue
        doc["file"] = str(p)
        docs.append(doc)
    if not docs:
        raise ValueError(f"no side-by-side run JSONs among {list(map(str, paths))}")
    return docs


def merge(docs: list[dict]) -> dict:
    """``{"cells": {impl: {key: record}}, "capacity": [...], "runs": [...]}``."""
    cells = {impl: {} for impl in IMPLS}
    for doc in sorted(docs, key=lambda d: d["time"]):
        impl = doc["impl"]
        for key, rec in doc["cells"].items():
            old = cells[impl].get(key)
            if old is None or rec["summary"]["n"] > 0 or old["summary"]["n"] == 0:
                cells[impl][key] = {**rec, "context_length": doc["context_length"]}
    capacity = [  # servers that came up
        {"impl": d["impl"], "context_length": d["context_length"], **d["capacity"]}
        for d in sorted(docs, key=lambda d: d["time"])
        if d.get("capacity")
    ]
    runs = [
        {k: d.get(k) for k in ("impl", "date", "gpu", "command", "status", "file", "startup_s")}
        for d in sorted(docs, key=lambda d: d["time"])
    ]
    profiles = [
        {"impl": d["impl"], "context_length": d["context_length"], **d["profile"]}
        for d in sorted(docs, key=lambda d: d["time"])
        if d.get("profile", {}).get("batches")
    ]
    return {
        "kind": "side_by_side_merged",
        "cells": cells,
        "capacity": capacity,
        "runs": runs,
        "profiles": profiles,
    }


def _num(x, digits: int | None = None) -> str:
    """``digits`` fixed, or by size: 12.3K / 512 / 3.4 / 0.123."""
    if x is None:
        return "-"
    if digits is not None:
        return f"{x:.{digits}f}"
    if abs(x) >= 1e7:
        return f"{x / 1e6:.2f}M"
    if abs(x) >= 1e4:
        return f"{x / 1e3:.1f}K"
    return f"{x:.0f}" if abs(x) >= 100 else f"{x:.1f}" if abs(x) >= 1 else f"{x:.3f}"


def _ratio(a, b) -> str:
    return f"{a / b:.2f}x" if a is not None and b else "-"


def _cell_row(key: str, ours: dict | None, native: dict | None) -> str:
    inp, bs = key.split("x")
    s = [(r or {}).get("summary", {}) for r in (ours, native)]
    cols = [inp, bs]
    for m in METRICS:
        a, b = s[0].get(m), s[1].get(m)
        cols += [_num(a), _num(b), _ratio(a, b)]
    notes = []
    for impl, r in zip(IMPLS, (ours, native), strict=True):
        if r is None:
            continue
        errors = [x["error"] for x in r["runs"] if "error" in x]
        if errors or r.get("skipped") or r.get("does_not_fit"):
            notes.append(
                f"{impl}: "
                + "; ".join(filter(None, [r.get("does_not_fit"), *r.get("skipped", [])]))
                + (f" {len(errors)} failed" if errors else "")
            )
    runs = f"{s[0].get('n', 0)}/{s[1].get('n', 0)}"
    cols.append(runs + (f" ({'; '.join(notes)})" if notes else ""))
    return "| " + " | ".join(cols) + " |"


def _capacity_rows(capacity: list[dict]) -> list[str]:
    latest = {}
    for c in capacity:  # oldest first: the newest start of each (impl, context) wins
        latest[(c["impl"], c["context_length"])] = c
    out = [
        "| server | context | full tokens | swa tokens | KV pool GB | mem-fraction | swa ratio "
        "| page | KV dtype |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for (impl, ctx), c in sorted(latest.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        full = c.get("token_capacity") or c.get("max_total_num_tokens")
        out.append(
            f"| {impl} | {ctx} | {_num(full)} | {_num(c.get('token_capacity_swa'))} "
            f"| {_num(c.get('kvcache_gb'), 2)} | {c.get('mem_fraction_static')} "
            f"| {c.get('swa_full_tokens_ratio')} | {c.get('page_size')} "
            f"| {c.get('kv_dtype_logged') or c.get('kv_cache_dtype')} |"
        )
    for ctx in sorted({ctx for _, ctx in latest}):
        o, n = latest.get(("ours", ctx)), latest.get(("native", ctx))
        if o and n:
            fo = o.get("token_capacity") or o.get("max_total_num_tokens")
            fn = n.get("token_capacity") or n.get("max_total_num_tokens")
            out.append(f"\nfull tokens ours / native at context {ctx}: {_ratio(fo, fn)}")
    return out


def markdown(merged: dict) -> str:
    """The table for docs/perf.md: runs (date, GPU, command), cells, capacity."""
    lines = []
    for r in merged["runs"]:
        lines.append(
            f"- {r['impl']}: {r['date']} on {r['gpu']}, server up in {_num(r['startup_s'])} s, "
            f"status {r['status']}; `{r['command']}`"
        )
    lines += [
        "",
        "Ratios are ours / native: above 1 is better for ours in decode and prefill tok/s, worse "
        "in TTFT. Medians of the timed runs (`runs` = ours/native count).",
        "",
        "| input | batch | decode tok/s ours | native | ratio | TTFT s ours | native | ratio "
        "| prefill tok/s ours | native | ratio | runs |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    cells = merged["cells"]
    keys = {k for impl in IMPLS for k in cells[impl]}
    for key in sorted(keys, key=lambda k: tuple(map(int, k.split("x")))):
        lines.append(_cell_row(key, cells["ours"].get(key), cells["native"].get(key)))
    lines += ["", *_capacity_rows(merged["capacity"]), *_profile_rows(merged.get("profiles", []))]
    return "\n".join(lines)


def _profile_rows(profiles: list[dict]) -> list[str]:
    """Decode-step profile per server and batch size (scripts/profile_decode.py's numbers)."""
    if not profiles:
        return []
    out = [
        "",
        "| server | batch | kernels / step | kernels / layer | GPU ms / step (sum) "
        "| first-to-last ms | top kernel (share) |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for p in profiles:
        server = p["impl"] + (" (CPU ops)" if p.get("kind") == "cpu" else "")
        for b in p["batches"]:
            if "error" in b:
                out.append(f"| {server} | {b['batch_size']} | failed: {b['error'][:80]} |")
                continue
            top = b["top"][0] if b["top"] else {"name": "-", "share": 0}
            per_layer = b["kernels_per_layer"]
            out.append(
                f"| {server} | {b['batch_size']} | {b['kernels_per_step']:g} "
                f"| {_num(per_layer)} | {b['device_us_per_step'] / 1e3:.3f} "
                f"| {b['span_us_per_step'] / 1e3:.3f} | {top['name'][:60]} "
                f"({100 * top['share']:.0f}%) |"
            )
    return out
