"""Where the decode step's host time goes (issue 13): one server with the host-trace debug plugin
(``sglang_dsv4.perf.host_trace``, env ``SGLANG_DSV4_HOST_TRACE``), one batch-1 request of
``--input-len`` random tokens decoding ``--output-len`` tokens (streamed, like
bench_one_batch_server), then the per-phase host us and GPU-mark us per decode step (median /
p90, ``perf.host_phases``), the captured decode graphs' node census, and the client's decode
tok/s. With ``--profile-steps N`` a second request is profiled (``/start_profile``, CPU + GPU,
``with_stack``) and the trace's graph launches are reported (``cudaGraphLaunch`` host us, launch
to first graph kernel, the previous launch to the graph launch): what CUPTI adds to the launch.

    python scripts/dgap.py --impl ours --model-path /tmp/fd/ckpt-bf16 --out /tmp/dgap
    python scripts/dgap.py --impl native --model-path /tmp/fd/ckpt-bf16 --out /tmp/dgap
    # CPU dry run (the tiny embedded model; no graphs, no GPU marks):
    python scripts/dgap.py --model-path sglang_dsv4/models/dsv4-tiny --input-len 64 \\
        --output-len 24 --context-length 4096 --server-args "--dtype float32"

Writes ``OUT/dgap_<impl>.json`` (rows, summaries, census, launches) and
``OUT/dgap_<impl>.server.log``.
"""

import argparse
import bisect
import json
import os
import random
import shutil
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import requests
from profile_decode import stream_generate, wait_trace
from side_by_side import add_server_options, native_model_dir, server_args, server_env, stop

from sglang_dsv4.perf.host_phases import decode_rows, format_summary, load, summarize
from sglang_dsv4.perf.host_trace import ENV
from sglang_dsv4.perf.trace import load_trace
from sglang_dsv4.server_process import Server


def stream_request(url: str, ids: list[int], output_len: int) -> dict:
    """One streamed ``/generate``: the chunks' arrival times, split by :func:`client_times`."""
    body = {"input_ids": ids, "stream": True,
            "sampling_params": {"temperature": 0, "max_new_tokens": output_len,
                                "ignore_eos": True}}  # fmt: skip
    t0, arrivals, n = time.perf_counter(), [], 0
    for data in stream_generate(url, body, timeout=600):
        n = data["meta_info"]["completion_tokens"]
        arrivals.append(time.perf_counter())
    return client_times(t0, arrivals, time.perf_counter(), n)


def client_times(t0: float, arrivals: list[float], end: float, n: int) -> dict:
    """Client-side split of one streamed request: ``decode_tok_s`` = (n - 1) tokens between the
    first and last chunks (the steady decode); ``bench_tok_s`` as ``bench_one_batch_server``
    reports decode (n tokens over the first chunk to the stream's end); the two differ by
    ``second_chunk_s`` (the first decode step after the prefill, with whatever runs before it)
    and ``tail_s`` (the last chunk to the end of the stream: the request's finish)."""
    first, last = (arrivals[0], arrivals[-1]) if arrivals else (None, None)
    if first is None:
        return {"tokens": n, "ttft_s": None, "decode_tok_s": None, "bench_tok_s": None,
                "second_chunk_s": None, "tail_s": None}  # fmt: skip
    return {
        "tokens": n,
        "ttft_s": first - t0,
        "decode_tok_s": (n - 1) / (last - first) if n > 1 and last > first else None,
        "bench_tok_s": n / (end - first) if end > first else None,
        "second_chunk_s": arrivals[1] - first if len(arrivals) > 1 else None,
        "tail_s": end - last,
    }


def collect(trace_dir: Path, dest: Path, timeout: float = 30) -> list[Path]:
    """The scheduler's trace files (written when it goes idle), moved to ``dest``."""
    deadline = time.time() + timeout
    while not list(trace_dir.glob("host_trace_*.json")) and time.time() < deadline:
        time.sleep(0.5)
    time.sleep(1.0)  # a flush in progress
    dest.mkdir(parents=True, exist_ok=True)
    moved = []
    for f in sorted(trace_dir.glob("host_trace_*.json")):
        moved.append(Path(shutil.move(str(f), dest / f.name)))
    return moved


def phase_report(files: list[Path], title: str) -> dict:
    docs = load(files)
    rows = [r for d in docs for r in decode_rows(d, batch_size=1)]
    graphs = {k: v for d in docs for k, v in d.get("graphs", {}).items()}
    summary = summarize(rows) if rows else {"steps": 0, "median_us": {}, "p90_us": {}}
    print(format_summary(summary, title), flush=True)
    return {"summary": summary, "rows": rows, "graphs": graphs}


def launch_report(events: list[dict], top: int = 12) -> dict:
    """Graph launches in a profiler trace: ``cudaGraphLaunch`` host us, host us from the
    previous kernel launch's end on that thread (the input copy's), us from the launch's
    start to its graph's first kernel (CPU and GPU times share kineto's clock), and the Python
    frames (``with_stack``) that ran between the previous call and the launch, by total us."""
    calls = ("cuda_runtime", "cuda_driver")
    rt = sorted((e for e in events if e.get("ph") == "X" and e.get("cat") in calls),
                key=lambda e: float(e["ts"]))  # fmt: skip
    first_kernel = {}
    for e in events:
        corr = e.get("args", {}).get("correlation")
        if e.get("ph") == "X" and e.get("cat") == "kernel" and corr is not None:
            first_kernel[corr] = min(first_kernel.get(corr, float("inf")), float(e["ts"]))
    rows, windows, prev_end = [], [], {}
    for e in rt:
        key, ts = (e["pid"], e["tid"]), float(e["ts"])
        if e["name"] == "cudaGraphLaunch":
            corr = e.get("args", {}).get("correlation")
            rows.append({"launch_us": float(e["dur"]),
                         "after_prev_launch_us": ts - prev_end.get(key, ts),
                         "to_first_kernel_us": first_kernel.get(corr, ts) - ts})  # fmt: skip
            windows.append((key, prev_end.get(key, ts), ts))
        elif "LaunchKernel" in e["name"]:  # cudaLaunchKernel(ExC), cuLaunchKernel(Ex)
            prev_end[key] = ts + float(e["dur"])
    keys = ("launch_us", "after_prev_launch_us", "to_first_kernel_us")
    med = {k: sorted(r[k] for r in rows)[len(rows) // 2] for k in keys} if rows else {}
    frames = _frames_in(events, windows)
    return {"launches": len(rows), "median_us": med, "rows": rows[:64],
            "frames_before_launch_us_per_launch": dict(frames.most_common(top))}  # fmt: skip


def _frames_in(events: list[dict], windows) -> Counter:
    """Python frames and CPU ops that start inside each ``(thread, lo, hi)`` window: their us
    inside it by name, averaged over the windows (nested frames each count)."""
    by_thread = defaultdict(list)
    for e in events:
        if e.get("ph") == "X" and e.get("cat") in ("python_function", "cpu_op"):
            by_thread[(e["pid"], e["tid"])].append((float(e["ts"]), float(e["dur"]), e["name"]))
    for evs in by_thread.values():
        evs.sort()
    out = Counter()
    for key, lo, hi in windows:
        evs = by_thread.get(key, [])
        for ts, dur, name in evs[bisect.bisect_left(evs, (lo,)) :]:
            if ts >= hi:
                break
            out[name] += (min(hi, ts + dur) - ts) / len(windows)
    return out


def profiled(url: str, ids: list[int], steps: int, trace_dir: Path) -> dict:
    """A second request profiled for ``steps`` forward passes once it decodes."""
    import threading

    prefix = f"dgap-{int(time.time())}"
    result = {}
    th = threading.Thread(target=lambda: result.update(stream_request(url, ids, 64 + steps)))
    th.start()
    time.sleep(1.0)  # past the prefill (32K tokens: ~0.2 s)
    body = {"output_dir": str(trace_dir), "num_steps": steps, "activities": ["CPU", "GPU"],
            "with_stack": True, "record_shapes": False, "profile_prefix": prefix}  # fmt: skip
    r = requests.post(url + "/start_profile", json=body, timeout=120)
    trace = wait_trace(trace_dir, prefix, 120, th.is_alive) if r.status_code == 200 else None
    th.join(300)
    if trace is None:
        return {"error": f"no trace (/start_profile {r.status_code}: {r.text[:200]})"}
    rep = launch_report(load_trace(trace))
    print(f"profiled graph launches (median us): {rep['median_us']}", flush=True)
    print("python frames / CPU ops between the previous launch and the graph launch (us):")
    for name, us in rep["frames_before_launch_us_per_launch"].items():
        print(f"  {us:8.1f}  {name[:110]}")
    return rep | {"trace": str(trace)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--impl", choices=["ours", "native"], default="ours")
    ap.add_argument("--model-path", type=Path, required=True)
    ap.add_argument("--context-length", type=int, default=33792)
    ap.add_argument("--input-len", type=int, default=32768)
    ap.add_argument("--output-len", type=int, default=200)
    ap.add_argument("--profile-steps", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp/dgap")))
    add_server_options(ap)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    trace_dir = args.out / f"host_trace_{args.impl}"
    shutil.rmtree(trace_dir, ignore_errors=True)
    model = native_model_dir(args.model_path) if args.impl == "native" else args.model_path
    env = server_env(args, args.impl) | {ENV: str(trace_dir)}
    if args.impl == "native":
        env["SGLANG_PLUGINS"] = "dsv4_hosttrace"  # the trace only: our plugin stays off
    cmd = server_args(args, args.impl, model, args.context_length)
    print(f"starting {args.impl}: {' '.join(cmd)}", flush=True)
    t = time.time()
    server = Server(cmd, args.out / f"dgap_{args.impl}.server.log", env=env,
                    timeout=args.startup_timeout)  # fmt: skip
    doc = {"impl": args.impl, "command": " ".join(sys.argv), "startup_s": time.time() - t}
    print(f"server up in {doc['startup_s']:.0f} s", flush=True)
    info = requests.get(server.url + "/server_info", timeout=60).json()
    keys = ("sampling_backend", "attention_backend", "page_size", "disable_overlap_schedule",
            "kv_cache_dtype", "context_length")  # fmt: skip
    doc["server_info"] = {k: info.get(k) for k in keys}
    print(f"server: {doc['server_info']}", flush=True)
    try:
        collect(trace_dir, trace_dir / "startup", timeout=5)  # the server's own warm-up
        ids = [random.Random(0).randrange(100, 1000) for _ in range(args.input_len)]
        doc["client"] = stream_request(server.url, ids, args.output_len)
        print(f"client: {doc['client']}", flush=True)
        files = collect(trace_dir, trace_dir / "plain")
        doc["plain"] = phase_report(files, f"{args.impl} unprofiled, bs=1, {args.input_len} in")
        if args.profile_steps:
            ids2 = [random.Random(1).randrange(100, 1000) for _ in range(args.input_len)]
            doc["profile"] = profiled(server.url, ids2, args.profile_steps, args.out / "prof")
            files = collect(trace_dir, trace_dir / "profiled")
            doc["profiled"] = phase_report(files, f"{args.impl} request 2 (profiled steps in it)")
    finally:
        stop(server)
        (args.out / f"dgap_{args.impl}.json").write_text(json.dumps(doc, indent=1))
    for size, census in sorted(doc["plain"]["graphs"].items(), key=lambda kv: int(kv[0])):
        if size in ("1", "32"):
            print(f"decode graph bs={size}: {census}")
    return 0 if doc["plain"]["summary"]["steps"] else 1


if __name__ == "__main__":
    sys.exit(main())
