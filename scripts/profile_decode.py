"""Where a decode step goes: GPU kernels per step, GPU time per step, kernels per layer and the
top kernels by time, from SGLang's own torch profiler (``/start_profile``) with CUDA graphs on.

Per batch size: a batch of random-id prompts is streamed with ``ignore_eos``; once every request
has ``--warm-tokens`` tokens (all of them decoding), ``/start_profile`` records ``--steps``
forward passes (activities CPU + GPU: the CPU side holds the ``step[DECODE bs=N]`` spans and the
launch calls the kernels are matched to) and SGLang writes the trace itself when they are done.
The trace is parsed by ``sglang_dsv4.perf.trace.step_stats`` and
``sglang_dsv4.perf.host_gaps.gap_report`` (idle gaps between the step's kernels: a histogram by
length and the longest gaps with the kernels on both sides).

    python scripts/profile_decode.py --model-path /tmp/fd/ckpt-bf16            # starts our server
    python scripts/profile_decode.py --impl native --model-path /tmp/fd/ckpt-bf16
    python scripts/profile_decode.py --url http://127.0.0.1:30000               # attach
    # CPU dry run (top-level CPU ops instead of kernels):
    python scripts/profile_decode.py --model-path sglang_dsv4/models/dsv4-tiny --kind cpu \\
        --batch-sizes 2 --input-len 64 --steps 3 \\
        --server-args "--dtype float32 --max-total-tokens 16384"

Writes ``OUT/profile_decode.json`` (``--out``, default $OUT or /tmp/profile_decode) and prints
one table per batch size; traces stay in ``--trace-dir`` unless ``--keep-traces``.
"""

import argparse
import json
import os
import random
import shutil
import sys
import threading
import time
from pathlib import Path

import requests
from side_by_side import add_server_options, native_model_dir, server_args, server_env, stop

from sglang_dsv4.perf.host_gaps import format_gaps, gap_report
from sglang_dsv4.perf.trace import format_stats, load_trace, step_stats
from sglang_dsv4.server_process import Server


def stream_generate(url: str, body: dict, timeout: float):
    """The chunks of a streamed ``/generate`` (parsed ``data:`` lines); an error chunk raises."""
    with requests.post(url + "/generate", json=body, stream=True, timeout=timeout) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith(b"data:") or line == b"data: [DONE]":
                continue
            data = json.loads(line[5:])
            if "error" in data:
                raise RuntimeError(data["error"])
            yield data


class DecodeBatch:
    """One streamed ``/generate`` of ``bs`` prompts in a thread, counting tokens per request;
    ``abort()`` ends it once the trace is written (request ids ``<rid>-<i>``)."""

    def __init__(self, url: str, prompts: list[list[int]], max_new_tokens: int, rid: str):
        self.url = url
        self.rids = [f"{rid}-{i}" for i in range(len(prompts))]
        self.tokens = [0] * len(prompts)
        self.error = None
        self.aborting = False
        body = {
            "input_ids": prompts,
            "rid": self.rids,
            "sampling_params": {"temperature": 0, "max_new_tokens": max_new_tokens},
            "stream": True,
        }
        body["sampling_params"]["ignore_eos"] = True
        self.thread = threading.Thread(target=self._run, args=(body,), daemon=True)
        self.thread.start()

    def _run(self, body: dict) -> None:
        try:
            for data in stream_generate(self.url, body, timeout=1800):
                i = data.get("index", 0)
                self.tokens[i] = max(self.tokens[i], data["meta_info"]["completion_tokens"])
        except Exception as e:
            if not self.aborting:
                self.error = f"{type(e).__name__}: {e}"

    def abort(self) -> None:
        self.aborting = True
        for rid in self.rids:
            requests.post(self.url + "/abort_request", json={"rid": rid}, timeout=60)
        self.thread.join(120)

    def wait_decoding(self, n: int, timeout: float) -> None:
        deadline = time.time() + timeout
        while min(self.tokens) < n:
            if self.error or not self.thread.is_alive():
                raise RuntimeError(f"batch ended before decoding {n} tokens: {self.error}")
            if time.time() > deadline:
                raise TimeoutError(f"not every request has {n} tokens after {timeout} s")
            time.sleep(0.05)


def wait_trace(trace_dir: Path, prefix: str, timeout: float, busy=lambda: False) -> Path | None:
    """The trace SGLang writes after the profiled steps; gives up ``timeout`` s from now, or 10 s
    after ``busy()`` turns false (nothing left running to reach the step count)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = sorted(trace_dir.glob(f"{prefix}-*.trace.json.gz"))
        # the export is written in one go; a file that stopped growing is complete
        if found and _stable(found[-1]):
            return found[-1]
        if not busy():
            deadline = min(deadline, time.time() + 10)
        time.sleep(1)
    return None


def _stable(path: Path) -> bool:
    size = path.stat().st_size
    time.sleep(1)
    return size > 0 and path.stat().st_size == size


def profile_batch(url: str, bs: int, vocab: int, layers: int | None, opts) -> dict:
    """Profile ``opts.steps`` decode steps of a ``bs``-request batch; the parsed statistics.
    ``opts``: input_len, steps, warm_tokens, margin_tokens, kind, top, timeout, trace_dir,
    keep_dir (copy the trace there, or None)."""
    rng = random.Random(bs)
    prompts = [[rng.randrange(100, vocab) for _ in range(opts.input_len)] for _ in range(bs)]
    prefix = f"decode-bs{bs}-{int(time.time())}"
    batch = DecodeBatch(url, prompts, opts.warm_tokens + opts.steps + opts.margin_tokens, prefix)
    batch.wait_decoding(opts.warm_tokens, opts.timeout)
    body = {
        "output_dir": str(opts.trace_dir),
        "num_steps": opts.steps,
        "activities": ["CPU", "GPU"] if opts.kind == "gpu" else ["CPU"],
        "with_stack": False,
        "record_shapes": False,
        "profile_prefix": prefix,
    }
    r = requests.post(url + "/start_profile", json=body, timeout=120)
    if r.status_code != 200:
        raise RuntimeError(f"/start_profile answered {r.status_code}: {r.text}")
    t0 = time.time()
    trace = wait_trace(opts.trace_dir, prefix, opts.timeout, batch.thread.is_alive)
    if trace is None:  # the batch ended before num_steps: stop by hand
        requests.post(url + "/stop_profile", timeout=120)
        trace = wait_trace(opts.trace_dir, prefix, 60)
    error = batch.error  # before the abort: errors after it are the abort's
    batch.abort()
    if error:
        raise RuntimeError(f"the decode batch failed: {error}")
    if trace is None:
        raise RuntimeError(f"no trace {prefix}-*.trace.json.gz in {opts.trace_dir}")
    events = load_trace(trace)
    stats = step_stats(events, kind=opts.kind, top=opts.top, layers=layers)
    gaps = gap_report(events, kind=opts.kind, top=opts.top)  # idle gaps between kernels
    if opts.keep_dir is not None:
        shutil.copy(trace, Path(opts.keep_dir) / trace.name)
    return {"batch_size": bs, "trace": str(trace), "trace_wait_s": time.time() - t0, **stats,
            "host_gaps": gaps}  # fmt: skip


def profile_server(url: str, batch_sizes, opts, title: str) -> tuple[dict, bool]:
    """Every batch size on one server: ``({"model_path", "batches": [...]}, any failed)``;
    prints one table per batch size."""
    opts.trace_dir.mkdir(parents=True, exist_ok=True)
    vocab, layers, model_path = model_shape(url)
    out, failed = {"model_path": model_path, "kind": opts.kind, "batches": []}, False
    for bs in batch_sizes:
        try:
            row = profile_batch(url, bs, vocab, layers, opts)
            text = format_stats(row, f"{title} decode, bs={bs}")
            print(text + "\n" + format_gaps(row["host_gaps"]) + "\n", flush=True)
        except Exception as e:  # report it, go on with the next batch size
            failed = True
            row = {"batch_size": bs, "error": f"{type(e).__name__}: {e}"}
            print(f"FAILED profile {title} bs={bs}: {row['error']}", flush=True)
        out["batches"].append(row)
    return out, failed


def add_profile_options(ap: argparse.ArgumentParser, prefix: str = "") -> None:
    """Profiling knobs (``prefix`` = "profile-" when added to side_by_side.py's options)."""
    ap.add_argument(f"--{prefix}input-len", type=int, default=512)
    ap.add_argument(f"--{prefix}steps", type=int, default=8, help="forward passes profiled")
    ap.add_argument(f"--{prefix}warm-tokens", type=int, default=16, help="tokens before it")
    ap.add_argument(f"--{prefix}margin-tokens", type=int, default=256, help="decode budget after")
    ap.add_argument(f"--{prefix}kind", choices=["gpu", "cpu"], default="gpu", help="kernels/ops")
    ap.add_argument(f"--{prefix}top", type=int, default=15)
    ap.add_argument(f"--{prefix}timeout", type=float, default=300)
    ap.add_argument(f"--{prefix}trace-dir", type=Path, default=Path("/tmp/profile_decode/traces"))


def profile_options(args, prefix: str = "", keep_dir=None) -> argparse.Namespace:
    names = ("input_len", "steps", "warm_tokens", "margin_tokens", "kind", "top", "timeout")
    opts = {n: getattr(args, prefix + n) for n in (*names, "trace_dir")}
    return argparse.Namespace(**opts, keep_dir=keep_dir)


def model_shape(url: str) -> tuple[int, int | None, str]:
    """(vocab size, layers, model path) of the served model, from its config.json."""
    info = requests.get(url + "/server_info", timeout=60).json()
    config = Path(info["model_path"]) / "config.json"
    cfg = json.loads(config.read_text()) if config.exists() else {}
    return cfg.get("vocab_size", 1000), cfg.get("num_hidden_layers"), info["model_path"]


def start_server(args, name: str) -> tuple[Server | None, str]:
    """``(server, url)``: a server for ``--model-path`` (log ``OUT/<name>_<impl>.server.log``),
    or ``(None, --url)`` to attach."""
    if (args.url is None) == (args.model_path is None):
        raise SystemExit("give exactly one of --url (attach) and --model-path (start a server)")
    if args.url is not None:
        return None, args.url
    model = native_model_dir(args.model_path) if args.impl == "native" else args.model_path
    cmd = server_args(args, args.impl, model, args.context_length)
    print(f"starting {args.impl}: {' '.join(cmd)}", flush=True)
    server = Server(cmd, args.out / f"{name}_{args.impl}.server.log",
                    env=server_env(args, args.impl), timeout=args.startup_timeout)  # fmt: skip
    return server, server.url


def add_common_options(ap: argparse.ArgumentParser, out: str) -> None:
    """Server / output options of profile_decode.py and profile_prefill.py."""
    ap.add_argument("--url", help="attach to a running server")
    ap.add_argument("--model-path", type=Path, help="start a server on this checkpoint")
    ap.add_argument("--impl", choices=["ours", "native"], default="ours")
    ap.add_argument("--context-length", type=int, default=8192)
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", out)))
    ap.add_argument("--keep-traces", action="store_true", help="copy the traces to --out")
    add_server_options(ap)


def serve_and_profile(args, name: str, run) -> int:
    """Start a server for ``--model-path`` (or attach to ``--url``), ``run(url) -> (result,
    any failed)``, stop it, write ``OUT/<name>.json`` (impl, date, command, result); the exit
    status. Shared with profile_prefill.py."""
    args.out.mkdir(parents=True, exist_ok=True)
    server, url = start_server(args, name)
    report = {"impl": args.impl, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    report["command"] = " ".join(sys.argv)
    try:
        result, failed = run(url)
        report |= result
    finally:
        if server is not None:
            stop(server)
    (args.out / f"{name}.json").write_text(json.dumps(report, indent=2))
    return 1 if failed else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    add_common_options(ap, "/tmp/profile_decode")
    add_profile_options(ap)
    args = ap.parse_args()
    opts = profile_options(args, keep_dir=args.out if args.keep_traces else None)
    return serve_and_profile(
        args, "profile_decode", lambda url: profile_server(url, args.batch_sizes, opts, args.impl)
    )


if __name__ == "__main__":
    sys.exit(main())
