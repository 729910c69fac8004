"""Side-by-side benchmark: our server and SGLang's native DSV4 path on the same checkpoint,
``sglang.bench_one_batch_server``'s ``run_one_case`` per cell (random token ids, prefix cache
flushed before each case), an untimed warm pass at every cell, then the median of ``--repeats``
timed runs; decode tok/s, TTFT and prefill tok/s per cell, pool capacity per server.

    python scripts/side_by_side.py build --work /tmp/fd           # Flash-dims bf16 checkpoint
    python scripts/side_by_side.py run --impl ours --model-path /tmp/fd/ckpt-bf16 \\
        --cells 4096x1,4096x32,4096x128 --repeats 3 --out /tmp/sbs
    python scripts/side_by_side.py run --impl native ...          # same, SGLang's own DSV4 path
    python scripts/perf_table.py /tmp/sbs/sbs_*.json              # merged table, ours / native

One JSON per implementation and server start, ``OUT/sbs_<impl>_<context>.json``, rewritten
after every run (a call killed at its time limit keeps what it measured). The native server
gets the recipe of ../shared/device/README.md: our plugin off, its DSV4 env flags, a copy of the
checkpoint directory whose config.json lacks ``quantization_config`` / ``expert_dtype``
(symlinked weights), page size 256. Both servers get the same context length, memory fraction,
chunked-prefill size and decode CUDA-graph batch sizes. GPU commands: docs/perf.md.
"""

import argparse
import contextlib
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import requests

from sglang_dsv4.perf.cells import (
    Cell,
    capacity,
    capacity_log_lines,
    context_length,
    does_not_fit,
    logged_kv_dtype,
    measure,
    parse_cells,
)
from sglang_dsv4.server_process import Server

ROOT = Path(__file__).resolve().parents[1]
T0 = float(os.environ.get("SBS_T0", time.time()))  # the device call's start (set by the .sh)

NATIVE_ENV = {
    "SGLANG_PLUGINS": "none",
    "SGLANG_DSV4_FP4_EXPERTS": "0",
    "SGLANG_OPT_FP8_WO_A_GEMM": "0",
    # without it the mHC pre-norm prewarm JIT-compiles 21 buckets (> 6 min)
    "SGLANG_DSV4_MHC_PREWARM": "0",
}
IMPL_ARGS = {
    # FP8 rows by default: upstream's swa ratio (0.1) as native; the 2026-12-06 4K speed run
    # still used 0.5 (a bf16-era setting; it only moves the pool split, see docs/perf.md)
    "ours": [],
    "native": ["--moe-runner-backend", "triton", "--page-size", "256"],
}
STARTUP_S = {"ours": 90, "native": 150}  # observed upper ends on the H100, for the deadline


def gpu_name() -> str:
    """The GPU's name without touching CUDA in this process (its context would cost memory the
    server's --mem-fraction-static then does not get)."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 else "unknown GPU"
    except (OSError, subprocess.TimeoutExpired, IndexError):
        return "cpu (no nvidia-smi)"


def gpu_used_mib() -> int | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        return int(out.stdout.split()[0]) if out.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired, IndexError, ValueError):
        return None


def native_model_dir(model: Path) -> Path:
    """``<model>-native/``: config.json without ``quantization_config`` / ``expert_dtype``
    (native reads them as the released FP8 / FP4 format), every other file symlinked."""
    out = model.parent / f"{model.name}-native"
    out.mkdir(exist_ok=True)
    for f in model.iterdir():
        dst = out / f.name
        if f.name == "config.json":
            config = json.loads(f.read_text())
            config.pop("quantization_config", None)
            config.pop("expert_dtype", None)
            dst.write_text(json.dumps(config, indent=2) + "\n")
        elif not dst.exists():
            dst.symlink_to(f.resolve())
    return out


def build(args) -> int:
    sys.path.insert(0, str(ROOT / "scripts"))
    from gpu_flash_dims import build as build_checkpoint

    t = time.time()
    model = build_checkpoint(args.config, args.work / "ckpt-bf16", "bf16", args.device)
    native = native_model_dir(model)
    print(f"checkpoint {model} ready in {time.time() - t:.0f} s; native copy {native}")
    return 0


def add_server_options(ap: argparse.ArgumentParser) -> None:
    """The server settings both implementations share (also used by profile_decode.py)."""
    ap.add_argument("--mem-fraction", type=float, default=0.6, help="--mem-fraction-static")
    ap.add_argument("--chunked-prefill-size", type=int, default=8192)
    ap.add_argument("--cuda-graph-max-bs", type=int, default=128)
    ap.add_argument("--startup-timeout", type=float, default=400)
    ap.add_argument("--server-args", default="", help="extra args for both servers")
    ap.add_argument("--ours-args", default="", help="extra args for our server")
    ap.add_argument("--native-args", default="", help="extra args for the native server")
    ap.add_argument("--native-env", nargs="*", default=[], help="KEY=VALUE overrides")


def server_env(args, impl: str) -> dict:
    if impl != "native":
        return {}
    return {**NATIVE_ENV, **dict(kv.split("=", 1) for kv in args.native_env)}


def server_args(args, impl: str, model: Path, context: int) -> list[str]:
    common = ["--model-path", str(model), "--context-length", str(context)]
    common += ["--sampling-backend", "pytorch", "--mem-fraction-static", str(args.mem_fraction)]
    common += ["--chunked-prefill-size", str(args.chunked_prefill_size)]
    common += ["--cuda-graph-max-bs-decode", str(args.cuda_graph_max_bs)]
    extra = getattr(args, f"{impl}_args")
    return [*common, *IMPL_ARGS[impl], *shlex.split(args.server_args), *shlex.split(extra)]


def stop(server: Server) -> None:
    """Stop the server and every process it started (the scheduler holds the GPU memory)."""
    import psutil

    try:
        children = psutil.Process(server.proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    server.stop()
    for child in children:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()
    psutil.wait_procs(children, timeout=30)


def wait_gpu_released(limit_mib: int = 4096, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while (used := gpu_used_mib()) is not None and used > limit_mib and time.time() < deadline:
        time.sleep(2)
    if used is not None and used > limit_mib:
        print(f"WARNING: {used} MiB still in use on the GPU after the server stopped")


def load_client() -> bool:
    """Import bench_one_batch_server before any server starts, so that whatever the import does
    to the GPU happens before every server sizes its pool (the same for ours and native);
    returns whether it created a CUDA context here (recorded in the JSON)."""
    sys.path.insert(0, str(ROOT / "scripts" / "bench_shims"))  # its `datasets` import
    import sglang.benchmark.one_batch_server  # noqa: F401
    import torch

    return torch.cuda.is_initialized()


def case_runner(server: Server, url: str, output_len: int, log, jsonl: Path):
    """One ``run_one_case`` of bench_one_batch_server per call, its printout to ``log``."""
    from sglang.benchmark.one_batch_server import run_one_case
    from sglang.benchmark.utils import get_tokenizer

    info = requests.get(url + "/server_info", timeout=60).json()
    tokenizer = get_tokenizer(info["tokenizer_path"])

    def run(cell: Cell) -> dict:
        if server is not None and server.proc.poll() is not None:
            raise RuntimeError(f"server exited with {server.proc.returncode}")
        with contextlib.redirect_stdout(log):
            r = run_one_case(
                url,
                cell.batch_size,
                cell.input_len,
                output_len,
                temperature=0.0,
                return_logprob=False,
                stream_interval=1,
                input_len_step_percentage=0.0,
                run_name=cell.key,
                result_filename=str(jsonl),
                tokenizer=tokenizer,
                dataset_name="random-ids",
            )
        return {
            "decode_tok_s": r.output_throughput,
            "ttft_s": r.last_ttft,
            "prefill_tok_s": r.input_throughput,
            "latency_s": r.latency,
            "last_gen_throughput": r.last_gen_throughput,
        }

    return run


def write_json(path: Path, doc: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=2))
    tmp.replace(path)


def run_impl(args, impl: str, cells: list[Cell], deadline: float, client_cuda: bool) -> dict:
    """Start the server (or attach to ``--url``), measure the cells, stop it; the JSON doc."""
    context = args.context_length or context_length(cells, args.output_len)
    model = args.model_path
    if impl == "native" and model is not None:
        model = native_model_dir(model)
    cmd_args = server_args(args, impl, model, context) if model is not None else []
    env = server_env(args, impl)
    stem = f"sbs_{impl}_{context}"
    out_json = args.out / f"{stem}.json"
    doc = {
        "kind": "side_by_side",
        "impl": impl,
        "time": time.time(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "gpu": gpu_name(),
        "command": os.environ.get("SBS_COMMAND") or shlex.join(sys.argv),
        "server_args": cmd_args,
        "env": env,
        "client_cuda_context": client_cuda,
        "context_length": context,
        "output_len": args.output_len,
        "repeats": args.repeats,
        "status": "starting",
        "cells": {},
    }
    write_json(out_json, doc)
    left = deadline - time.time()
    if args.url is None and left < STARTUP_S[impl] + 30:
        doc["status"] = f"not started: {left:.0f} s left before the deadline"
        print(f"SKIPPED {impl}: {doc['status']}")
        write_json(out_json, doc)
        return doc
    server, url = None, args.url
    t = time.time()
    if url is None:
        print(f"[{time.time() - T0:5.0f} s] starting {impl}: {shlex.join(cmd_args)}", flush=True)
        log = args.out / f"{stem}.server.log"
        try:
            server = Server(cmd_args, log, env=env, timeout=args.startup_timeout)
        except (RuntimeError, TimeoutError) as e:
            doc["status"] = f"failed: server did not start ({type(e).__name__})"
            doc["server_log_tail"] = log.read_text()[-6000:]
            write_json(out_json, doc)
            print(f"FAILED {impl}: server did not start; log tail:\n{doc['server_log_tail']}")
            return doc
        url = server.url
    doc["startup_s"] = time.time() - t
    try:
        doc |= measure_server(args, impl, cells, server, url, deadline, doc, out_json)
    finally:
        if server is not None:
            doc["capacity_log"] = capacity_log_lines(server.log)
            if doc.get("capacity"):
                doc["capacity"]["kv_dtype_logged"] = logged_kv_dtype(doc["capacity_log"])
            stop(server)
            wait_gpu_released()
        write_json(out_json, doc)
    return doc


def measure_server(args, impl, cells, server, url, deadline, doc, out_json) -> dict:
    info = requests.get(url + "/server_info", timeout=60).json()
    cap = capacity(info)
    doc["capacity"] = cap
    print(
        f"[{time.time() - T0:5.0f} s] {impl} up in {doc['startup_s']:.0f} s: full tokens "
        f"{cap['token_capacity']}, swa tokens {cap['token_capacity_swa']}, "
        f"KV {cap['kvcache_gb']} GB",
        flush=True,
    )
    runnable, rejected = [], {}
    for cell in cells:
        reason = does_not_fit(cell, args.output_len, cap)
        if reason:
            rejected[cell.key] = reason
            print(f"DOES NOT FIT {impl} {cell.key}: {reason}")
        else:
            runnable.append(cell)

    def update(records):
        doc["cells"] = records | {
            k: {"does_not_fit": r, "runs": [], "skipped": [], "summary": {"n": 0}}
            for k, r in rejected.items()
        }
        doc["status"] = "running"
        write_json(out_json, doc)

    with open(args.out / f"sbs_{impl}_{doc['context_length']}.bench.log", "a") as log:
        run_case = case_runner(server, url, args.output_len, log, args.out / f"{impl}.jsonl")

        def timed(cell):
            row = run_case(cell)
            print(
                f"[{time.time() - T0:5.0f} s] {impl} {cell.key}: decode {row['decode_tok_s']:.1f} "
                f"tok/s, TTFT {row['ttft_s']:.3f} s, prefill {row['prefill_tok_s']:.0f} tok/s",
                flush=True,
            )
            return row

        records = measure(
            runnable,
            args.repeats,
            timed,
            deadline=deadline - profile_reserve_s(args),
            warm=not args.no_warm,
            margin_s=10.0,
            on_update=update,
        )
    update(records)
    errors = [
        f"{k}: {r['error']}" for k, rec in records.items() for r in rec["runs"] if "error" in r
    ]
    for e in errors:
        print(f"FAILED run {impl} {e}")
    for k, rec in records.items():
        for s in rec["skipped"]:
            print(f"SKIPPED {impl} {k} {s}")
    unmeasured = [k for k, rec in records.items() if rec["summary"]["n"] == 0]
    status = "done"
    if errors:
        status += f", {len(errors)} failed runs"
    if unmeasured:  # the deadline or failures left a cell without any timed run
        status += f", no timed run of {','.join(unmeasured)}"
    if args.profile_bs:
        doc["profile"], failed = profile(args, impl, url, deadline)
        status += ", profile failed" if failed else ""
    if args.profile_prefill:
        doc["profile_prefill"], failed = profile_prefill(args, impl, url, deadline)
        status += ", prefill profile failed" if failed else ""
    return {"status": status}


def profile_reserve_s(args) -> float:
    """Seconds kept before the deadline for the profiles asked for (the cells' timed runs stop
    that early): without it the last round of runs used the time and every profile was skipped."""
    sizes = [b for b in args.profile_bs.split(",") if b] if args.profile_bs else []
    prefill = parse_cells(args.profile_prefill) if args.profile_prefill else []
    return 50.0 * len(sizes) + 40.0 * len(prefill)


def profile(args, impl: str, url: str, deadline: float) -> tuple[dict, bool]:
    """scripts/profile_decode.py on this server (saves a second server start)."""
    from profile_decode import profile_options, profile_server

    sizes = [int(b) for b in args.profile_bs.split(",")]
    left = deadline - time.time()
    if left < 45 * len(sizes):
        print(f"SKIPPED profile {impl}: {left:.0f} s left before the deadline")
        return {"skipped": f"{left:.0f} s left"}, False
    print(f"[{time.time() - T0:5.0f} s] profiling {impl} decode at bs {sizes}", flush=True)
    return profile_server(url, sizes, profile_options(args, "profile_"), impl)


def profile_prefill(args, impl: str, url: str, deadline: float) -> tuple[dict, bool]:
    """scripts/profile_prefill.py on this server."""
    from profile_prefill import prefill_options, profile_server

    cells = parse_cells(args.profile_prefill)
    left = deadline - time.time()
    if left < 30 * len(cells):
        print(f"SKIPPED prefill profile {impl}: {left:.0f} s left before the deadline")
        return {"skipped": f"{left:.0f} s left"}, False
    keys = ",".join(c.key for c in cells)
    print(f"[{time.time() - T0:5.0f} s] profiling {impl} extend at {keys}", flush=True)
    return profile_server(url, cells, prefill_options(args, "profile_prefill_"), impl)


def run(args) -> int:
    cells = parse_cells(args.cells)
    deadline = T0 + args.deadline_s
    args.out.mkdir(parents=True, exist_ok=True)
    if args.model_path is None and args.url is None:
        raise SystemExit("give --model-path (start a server) or --url (attach to one)")
    if args.model_path is not None and not (args.model_path / "config.json").exists():
        raise SystemExit(f"{args.model_path}/config.json not found: build the checkpoint first")
    client_cuda = load_client()
    if client_cuda:
        print("WARNING: importing the bench client created a CUDA context in this process")
    failed = False
    for impl in args.impl.split(","):
        if impl not in IMPL_ARGS:
            raise SystemExit(f"--impl: ours and/or native, got {impl!r}")
        doc = run_impl(args, impl, cells, deadline, client_cuda)
        failed |= doc["status"] != "done"
    return 1 if failed else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build the Flash-dims bf16 checkpoint (gpu_flash_dims.build)")
    b.add_argument("--work", type=Path, default=Path("/tmp/fd"))
    b.add_argument("--config", type=Path, default=ROOT / "configs" / "dsv4-flash-dims.json")
    b.add_argument("--device", default="cuda", help="where the random model is made")
    r = sub.add_parser("run", help="measure one or both implementations")
    r.add_argument("--impl", default="ours", help="ours, native, or ours,native (in that order)")
    r.add_argument("--model-path", type=Path, help="checkpoint dir (native gets a -native copy)")
    r.add_argument("--url", help="attach to a running server instead of starting one")
    r.add_argument("--cells", default="4096x1,4096x32,4096x128", help="INPUTxBATCH,...")
    r.add_argument("--repeats", type=int, default=3, help="timed runs per cell (median)")
    # 256, not 64: decode tok/s is batch * output_len / (latency - last TTFT), and at 64 tokens
    # the batch-1 window is ~0.1 s, where host jitter swung single runs 397-630 tok/s in both
    # servers (H100, 2026-12-06 late lease: docs/gpu/sbs_20261206d); 256 costs ~0.3-3 s a run.
    r.add_argument("--output-len", type=int, default=256, help="tokens out per request")
    r.add_argument("--no-warm", action="store_true", help="skip the untimed warm pass")
    r.add_argument("--out", type=Path, default=Path(os.environ.get("SBS", "/tmp/sbs")))
    r.add_argument("--deadline-s", type=float, default=540, help="s after SBS_T0 (the call start)")
    r.add_argument("--context-length", type=int, help="default: what the cells need, >= 8192")
    add_server_options(r)
    r.add_argument("--profile-bs", default="", help="e.g. 1,32: profile_decode.py after the cells")
    from profile_decode import add_profile_options

    add_profile_options(r, "profile-")
    r.add_argument(
        "--profile-prefill", default="", help="e.g. 4096x1,4096x16: profile_prefill.py after"
    )
    from profile_prefill import add_prefill_options

    add_prefill_options(r, "profile-prefill-")
    args = ap.parse_args()
    return build(args) if args.cmd == "build" else run(args)


if __name__ == "__main__":
    sys.exit(main())
