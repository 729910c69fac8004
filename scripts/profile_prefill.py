"""Where an extend (prefill) pass goes: kernels per extend step, GPU time per step, the top
kernels by time, and the host's share (GPU idle inside a step, the longest gaps and every host
sync with the code that caused it), from SGLang's own torch profiler (``/start_profile``).

Per cell INPUTxBATCH: one untimed warm batch of the same shape (Triton JIT of new shapes), then
``/start_profile`` (no step count), one ``/generate`` of BATCH random-id prompts of INPUT tokens
with ``max_new_tokens`` 1 (the prefill samples the only token: no decode
step), ``/stop_profile``. SGLang splits the batch into ``step[EXTEND bs=N toks=T]`` forwards of
at most ``--chunked-prefill-size`` tokens; every one of them is in the trace, parsed by
``sglang_dsv4.perf.trace.step_stats`` and ``sglang_dsv4.perf.host_gaps.gap_report``. The
profiler's own per-op cost inflates host time (more so ``--with-stack``, which names the
Python frame of each gap and sync).

    python scripts/profile_prefill.py --model-path /tmp/fd/ckpt-bf16 --cells 4096x1,4096x16
    python scripts/profile_prefill.py --impl native --model-path /tmp/fd/ckpt-bf16
    python scripts/profile_prefill.py --url http://127.0.0.1:30000 --with-stack
    # CPU dry run (top-level CPU ops instead of kernels):
    python scripts/profile_prefill.py --model-path sglang_dsv4/models/dsv4-tiny --kind cpu \\
        --cells 300x2 --chunked-prefill-size 256 \\
        --server-args "--dtype float32 --max-total-tokens 16384 --sleep-on-idle"

Writes ``OUT/profile_prefill.json`` (``--out``, default $OUT or /tmp/profile_prefill) and
prints one report per cell (also: ``side_by_side.py run --profile-prefill 4096x1,4096x16``).
"""

import argparse
import random
import shutil
import sys
import time
from pathlib import Path

import requests
from profile_decode import add_common_options, model_shape, serve_and_profile, wait_trace

from sglang_dsv4.perf.cells import Cell, parse_cells
from sglang_dsv4.perf.host_gaps import format_gaps, gap_report
from sglang_dsv4.perf.trace import EXTEND_STEP, format_stats, load_trace, step_stats


def generate(url: str, prompts: list[list[int]], timeout: float) -> float:
    """One blocking ``/generate`` of the batch, one new token each; its wall seconds."""
    body = {"input_ids": prompts, "sampling_params": {"temperature": 0, "max_new_tokens": 1}}
    t = time.time()
    r = requests.post(url + "/generate", json=body, timeout=timeout)
    if r.status_code != 200:
        raise RuntimeError(f"/generate answered {r.status_code}: {r.text[:500]}")
    return time.time() - t


def prompts(bs: int, n: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, vocab) for _ in range(n)] for _ in range(bs)]


def profile_batch(url: str, cell: Cell, vocab: int, layers: int | None, opts) -> dict:
    """Profile the extend steps of one batch of ``cell``; the parsed statistics."""
    bs, n = cell.batch_size, cell.input_len
    requests.post(url + "/flush_cache", timeout=60)
    warm_s = generate(url, prompts(bs, n, vocab, 1000 + bs), opts.timeout)
    requests.post(url + "/flush_cache", timeout=60)  # no prefix hit on the profiled batch
    prefix = f"extend-{n}x{bs}-{int(time.time())}"
    body = {
        "output_dir": str(opts.trace_dir),
        "activities": ["CPU", "GPU"] if opts.kind == "gpu" else ["CPU"],
        "with_stack": opts.with_stack,
        "record_shapes": False,
        "profile_prefix": prefix,
    }
    r = requests.post(url + "/start_profile", json=body, timeout=120)
    if r.status_code != 200:
        raise RuntimeError(f"/start_profile answered {r.status_code}: {r.text}")
    try:
        profiled_s = generate(url, prompts(bs, n, vocab, bs), opts.timeout)
    finally:
        requests.post(url + "/stop_profile", timeout=600)
    trace = wait_trace(opts.trace_dir, prefix, opts.timeout)
    if trace is None:
        raise RuntimeError(f"no trace {prefix}-*.trace.json.gz in {opts.trace_dir}")
    events = load_trace(trace)
    stats = step_stats(events, kind=opts.kind, pattern=EXTEND_STEP, top=opts.top, layers=layers)
    gaps = gap_report(events, kind=opts.kind, pattern=EXTEND_STEP, top=opts.top,
                      min_gap_us=opts.min_gap_us)  # fmt: skip
    if opts.keep_dir is not None:
        shutil.copy(trace, Path(opts.keep_dir) / trace.name)
    return {
        "batch_size": bs,
        "input_len": n,
        "trace": str(trace),
        "warm_s": warm_s,
        "profiled_s": profiled_s,
        **stats,
        "host_gaps": gaps,
    }


def report_text(row: dict, title: str) -> str:
    toks = sum(r["toks"] or 0 for r in row["per_step"])
    busy_ms = sum(r["device_us"] for r in row["per_step"]) / 1e3
    unit = "GPU" if row["kind"] == "gpu" else "CPU"
    lines = [
        format_stats(row, title),
        f"all {row['steps']} extend steps: {toks} tokens, {unit} {busy_ms:.1f} ms "
        f"({toks / max(busy_ms, 1e-9):.0f} tok/ms of {unit} time); wall of the profiled batch "
        f"{row['profiled_s']:.3f} s (warm batch unprofiled: {row['warm_s']:.3f} s)",
        format_gaps(row["host_gaps"]),
        f"per step: {'bs':>4} {'toks':>6} {'kernels':>7} {unit + ' ms':>8} {'idle ms':>8} "
        f"{'host ms':>8}",
    ]
    for r in row["per_step"][:24]:
        lines.append(
            f"          {r['bs'] or 0:>4} {r['toks'] or 0:>6} {r['kernels']:>7} "
            f"{r['device_us'] / 1e3:>8.2f} {r['idle_us'] / 1e3:>8.2f} {r['host_us'] / 1e3:>8.2f}"
        )
    return "\n".join(lines)


def profile_server(url: str, cells: list[Cell], opts, title: str) -> tuple[dict, bool]:
    """Every cell on one server: ``({"model_path", "batches": [...]}, any failed)``; prints one
    report per cell (also run by side_by_side.py --profile-prefill)."""
    opts.trace_dir.mkdir(parents=True, exist_ok=True)
    vocab, layers, model_path = model_shape(url)
    out, failed = {"model_path": model_path, "kind": opts.kind, "batches": []}, False
    for cell in cells:
        try:
            row = profile_batch(url, cell, vocab, layers, opts)
            print(report_text(row, f"{title} extend, {cell.key}") + "\n", flush=True)
        except Exception as e:  # report it, go on with the next cell
            failed = True
            row = {"cell": cell.key, "error": f"{type(e).__name__}: {e}"}
            print(f"FAILED prefill profile {title} {cell.key}: {row['error']}", flush=True)
        out["batches"].append(row)
    return out, failed


def add_prefill_options(ap: argparse.ArgumentParser, prefix: str = "") -> None:
    """Profiling knobs (``prefix`` = "profile-prefill-" in side_by_side.py's options)."""
    ap.add_argument(f"--{prefix}kind", choices=["gpu", "cpu"], default="gpu", help="kernels/ops")
    ap.add_argument(f"--{prefix}with-stack", action="store_true", help="Python frames of gaps")
    ap.add_argument(f"--{prefix}top", type=int, default=20)
    ap.add_argument(f"--{prefix}min-gap-us", type=float, default=20.0)
    ap.add_argument(f"--{prefix}timeout", type=float, default=600)
    default = Path("/tmp/profile_prefill/traces")
    ap.add_argument(f"--{prefix}trace-dir", type=Path, default=default)


def prefill_options(args, prefix: str = "", keep_dir=None) -> argparse.Namespace:
    names = ("kind", "with_stack", "top", "min_gap_us", "timeout", "trace_dir")
    return argparse.Namespace(**{n: getattr(args, prefix + n) for n in names}, keep_dir=keep_dir)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--cells", default="4096x1,4096x16", help="INPUTxBATCH,...")
    add_prefill_options(ap)
    add_common_options(ap, "/tmp/profile_prefill")
    args = ap.parse_args()
    opts = prefill_options(args, keep_dir=args.out if args.keep_traces else None)
    cells = parse_cells(args.cells)
    return serve_and_profile(
        args, "profile_prefill", lambda url: profile_server(url, cells, opts, args.impl)
    )


if __name__ == "__main__":
    sys.exit(main())
