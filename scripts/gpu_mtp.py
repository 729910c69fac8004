"""MTP speculative decoding on the GPU (issue 15, point 5): accept length and decode tok/s with
and without MTP at batch 1 and 8, CUDA graphs on, for the embedded ``dsv4`` (trained MTP layer,
held-out text) and the Flash-dims checkpoint with a random MTP layer (random token ids: the cost
of drafting, drafts almost never accepted); optionally SGLang's native MTP on the same Flash-dims
checkpoint. One server per (model, mode), MTP first (plain after: the path never measured
goes first); a table last, JSON to ``--out`` (rewritten after every measurement, so a call
stopped at its time limit keeps what it measured). ``--deadline-s`` (``gpu_mtp.sh`` passes what
is left of the device call): a server start, a request or the next run is cut short there (the
server log's last lines printed), so the table still prints inside the call.

    bash scripts/gpu_mtp.sh [--models dsv4,flash] [--steps 3] [--batches 1,8] [--native]
    bash scripts/gpu_mtp.sh --models "" --native       # SGLang's native MTP only (Flash dims)

(``gpu_mtp.sh`` installs this package into /tmp/site and builds the Flash-dims checkpoint.)
Decode tok/s of a batch: its requests start together (streamed, greedy, ``ignore_eos``),
after an untimed 8-token pass at the same batch size (Triton JIT of new shapes, e.g. the eager
draft extend's); ``sum(tokens - 1) / (last token - last first token)``. Accept length:
SGLang's (``meta_info`` of a finished request: ``spec_verify_ct``, verify passes, beside
``completion_tokens``), completion tokens / verify passes pooled over the batch.
``output = plain``: the batch-1 greedy output with MTP equals the output without it (exact in
fp32; in bf16 verify and decode GEMMs of other shapes may round near-ties apart).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from mtp_accept import spec_flags  # noqa: E402

from sglang_dsv4.server_process import Server  # noqa: E402

COMMON = ["--max-running-requests", "16", "--cuda-graph-max-bs-decode", "16"]
MIN_RUN_S = 90  # a server start with graph captures and a few requests: no less
COMMON += ["--mem-fraction-static", "0.6", "--sampling-backend", "pytorch"]


def with_random_mtp(ckpt: Path) -> Path:
    """``<ckpt>-mtp``: the checkpoint's files (symlinked) plus a random MTP layer
    (``weights.make.mtp_tensors``, in the checkpoint's float dtype) as one more shard."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    from sglang_dsv4.config import DSV4Config
    from sglang_dsv4.weights.make import mtp_tensors

    out = ckpt.parent / f"{ckpt.name}-mtp"
    if (out / "model.safetensors.index.json").exists():
        return out
    out.mkdir(exist_ok=True)
    config = json.loads((ckpt / "config.json").read_text())
    dtype = getattr(torch, config.get("torch_dtype", "bfloat16"))
    weight_map = {}
    for f in ckpt.iterdir():
        if f.name == "model.safetensors.index.json":
            continue
        if not (out / f.name).exists():
            (out / f.name).symlink_to(f.resolve())
        if f.suffix == ".safetensors":
            with safe_open(str(f), "pt") as st:
                weight_map |= dict.fromkeys(st.keys(), f.name)
    mtp = mtp_tensors(DSV4Config.from_dict(config), seed=2)
    mtp = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in mtp.items()}
    save_file(mtp, out / "mtp.safetensors", metadata={"format": "pt"})
    weight_map |= dict.fromkeys(mtp, "mtp.safetensors")
    index = {"metadata": {}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=1) + "\n")
    return out


def left() -> float:
    """Seconds to the deadline (``--deadline-s``), at least 1."""
    return max(1.0, DEADLINE - time.time())


def stream_one(url: str, ids: list[int], new: int, results: list, i: int) -> None:
    body = {
        "input_ids": ids,
        "sampling_params": {"temperature": 0, "max_new_tokens": new, "ignore_eos": True},
        "stream": True,
    }
    first = last = None
    final = None
    with requests.post(url + "/generate", json=body, stream=True, timeout=left()) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line or not line.startswith(b"data:") or line.strip() == b"data: [DONE]":
                continue
            now = time.perf_counter()
            final = json.loads(line[5:])
            if first is None and final["meta_info"].get("completion_tokens", 0) >= 1:
                first = now
            last = now
    results[i] = {"first": first, "last": last, "out": final}


def run_batch(url: str, prompts: list[list[int]], new: int) -> dict:
    """The prompts at once: decode tok/s, accept length, outputs."""
    import threading

    results: list = [None] * len(prompts)
    threads = [
        threading.Thread(target=stream_one, args=(url, p, new, results, i), daemon=True)
        for i, p in enumerate(prompts)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(left())
    if any(t.is_alive() for t in threads):
        raise TimeoutError("--deadline-s reached during a batch")
    if any(r is None for r in results):
        raise RuntimeError("a request failed (see the traceback above)")
    metas = [r["out"]["meta_info"] for r in results]
    tokens = [m["completion_tokens"] for m in metas]
    span = max(r["last"] for r in results) - max(r["first"] for r in results)
    verifies = sum(m.get("spec_verify_ct", 0) for m in metas)
    return {
        "decode_tok_s": sum(n - 1 for n in tokens) / span if span > 0 else None,
        "accept_length": sum(tokens) / verifies if verifies else None,
        "verify_passes": verifies,
        "tokens": sum(tokens),
        "output_ids": [r["out"]["output_ids"] for r in results],
    }


def prompts_for(model: str, n: int, length: int) -> list[list[int]]:
    if model == "dsv4":  # held-out text: the trained MTP layer's drafts are accepted
        return held_out_prompts(n, length)
    import random

    rng = random.Random(0)
    return [[rng.randrange(100, 100000) for _ in range(length)] for _ in range(n)]


def held_out_prompts(n: int, length: int) -> list[list[int]]:
    """``n`` chunks of ``length`` tokens of the held-out plays shipped with the package (the
    embedded tokenizer; no corpus download on the device)."""
    from transformers import AutoTokenizer

    from sglang_dsv4.embedded import embedded_checkpoint
    from sglang_dsv4.evals.perplexity import heldout_chunks

    tok = AutoTokenizer.from_pretrained(str(embedded_checkpoint()))
    return heldout_chunks(tok, length, n)


def server_setup(args, model: str, mode: str) -> tuple[list[str], dict]:
    """(server args, env) of ``model`` (dsv4 / flash) in ``mode`` (plain / mtp / native
    plain / native mtp)."""
    from side_by_side import IMPL_ARGS, NATIVE_ENV, native_model_dir

    if model == "dsv4":
        base = ["--model", "dsv4", "--dtype", args.dsv4_dtype]
    else:
        path = with_random_mtp(args.work / "ckpt-bf16")
        if mode.startswith("native"):
            path = native_model_dir(path)
        base = ["--model-path", str(path), "--context-length", "8192"]
    env = {}
    if mode.startswith("native"):
        base += IMPL_ARGS["native"]
        env = dict(NATIVE_ENV)
    if mode.endswith("mtp"):
        base += spec_flags(args.steps)
    return [*base, *COMMON], env


def measure(args, model: str, mode: str, doc: dict, save) -> None:
    server_args, env = server_setup(args, model, mode)
    log = args.out / f"{model}_{mode.replace(' ', '_')}.server.log"
    key = f"{model} {mode}"
    row = doc["runs"].setdefault(key, {"server_args": server_args, "env": env, "batches": {}})
    t = time.time()
    print(f"[{time.time() - T0:5.0f} s] {key}: starting ({' '.join(server_args)})", flush=True)
    srv = Server(server_args, log, env=env or None, timeout=min(900, left()))
    try:
        row["startup_s"] = round(time.time() - t, 1)
        # SGLang's "Engine startup timings" line: seconds of each graph capture (target_verify,
        # draft_decode, draft_extend), 0 where none was captured
        lines = srv.log.splitlines()
        row["graph_captures"] = [line for line in lines if "cuda_graph={" in line][-1:]
        prompts = prompts_for(model, max(args.batches), args.prompt_len)
        for bs in args.batches:
            run_batch(srv.url, prompts[:bs], 8)  # untimed: JIT of this batch size's shapes
            r = run_batch(srv.url, prompts[:bs], args.new)
            row["batches"][str(bs)] = r
            acc = r["accept_length"]
            print(
                f"[{time.time() - T0:5.0f} s] {key} batch {bs}: decode {r['decode_tok_s']:.1f} "
                f"tok/s, accept length {acc if acc is None else round(acc, 3)}",
                flush=True,
            )
            save()
    finally:
        srv.stop()
        from side_by_side import wait_gpu_released

        wait_gpu_released(timeout=min(60.0, max(0.0, DEADLINE - time.time())))


def table(doc: dict, steps: int) -> str:
    lines = [
        f"| model | batch | plain tok/s | MTP ({steps} steps) tok/s | speedup | accept length "
        "| output = plain (batch 1) |",
        "|---|---|---|---|---|---|---|",
    ]
    for model, (plain_key, mtp_key) in (
        ("dsv4", ("dsv4 plain", "dsv4 mtp")),
        ("flash", ("flash plain", "flash mtp")),
        ("flash (native SGLang)", ("flash native plain", "flash native mtp")),
    ):
        plain = doc["runs"].get(plain_key, {}).get("batches", {})
        mtp = doc["runs"].get(mtp_key, {}).get("batches", {})
        for bs in sorted(set(plain) | set(mtp), key=int):
            p, m = plain.get(bs, {}), mtp.get(bs, {})
            pt, mt = p.get("decode_tok_s"), m.get("decode_tok_s")
            speed = f"{mt / pt:.2f}x" if pt and mt else "-"
            acc = m.get("accept_length")
            same = "-"
            if bs == "1" and p and m:
                same = "yes" if p["output_ids"] == m["output_ids"] else "no"
            lines.append(
                f"| {model} | {bs} | {_f(pt)} | {_f(mt)} | {speed} | "
                f"{'-' if acc is None else f'{acc:.2f}'} | {same} |"
            )
    return "\n".join(lines)


def _f(x) -> str:
    return "-" if x is None else f"{x:.1f}"


T0 = time.time()
DEADLINE = T0 + 86400.0  # main() sets it from --deadline-s (finite: socket timeouts)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--models", default="dsv4,flash")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--prompt-len", type=int, default=200)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--dsv4-dtype", default="bfloat16", help="--dtype of the embedded model")
    ap.add_argument("--native", action="store_true", help="also SGLang's native MTP (flash)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/fd"))
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "/tmp/gpu_mtp"))
    ap.add_argument("--deadline-s", type=float, help="stop runs this many seconds from now")
    args = ap.parse_args()
    global DEADLINE
    if args.deadline_s:
        DEADLINE = T0 + args.deadline_s
    args.batches = [int(b) for b in args.batches.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    doc = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "args": vars(args)}
    doc["args"] = {k: str(v) for k, v in doc["args"].items()}
    doc["runs"] = {}
    out_json = args.out / "gpu_mtp.json"

    def save():
        out_json.write_text(json.dumps(doc, indent=1) + "\n")

    failed = []
    models = [m for m in args.models.split(",") if m]  # --models "" --native: native only
    jobs = [(m, mode) for m in models for mode in ("mtp", "plain")]
    if args.native:
        jobs += [("flash", "native plain"), ("flash", "native mtp")]
    for model, mode in jobs:
        if left() < MIN_RUN_S:
            print(f"[{time.time() - T0:5.0f} s] {model} {mode}: skipped, {left():.0f} s left")
            failed.append(f"{model} {mode} (skipped: --deadline-s)")
            continue
        try:
            measure(args, model, mode, doc, save)
        except Exception:  # the next run still goes; the traceback in full
            traceback.print_exc()
            failed.append(f"{model} {mode}")
            doc["runs"].setdefault(f"{model} {mode}", {})["error"] = traceback.format_exc()
            log = args.out / f"{model}_{mode.replace(' ', '_')}.server.log"
            if log.exists():
                print(f"--- last lines of {log}:\n" + "\n".join(log.read_text().splitlines()[-60:]))
        save()
    text = table(doc, args.steps)
    doc["table"] = text
    for row in doc["runs"].values():  # keep the JSON small: output lengths only
        for r in row.get("batches", {}).values():
            r["output_ids"] = [len(o) for o in r.get("output_ids", [])]
    save()
    print(f"\nfailed: {failed}" if failed else "\nall runs done")
    print(f"JSON: {out_json}\n\n{text}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
