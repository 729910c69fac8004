"""TP1 vs TP-N on several GPUs: a Flash-dims DSV4 with 8 layers (configs/dsv4-flash-dims.json
widened to SWA, CSA, HCA, CSA, HCA, CSA, HCA, CSA; hidden 4096, 64 heads of 512, 8 output
groups, Flash compressor / indexer sizes; random weights, bf16) served with ``--tp 1`` and each
``--tp N``, on the same checkpoint:

* KL(TP-N || TP1) over the TP-N top-20 tokens of every prompt and output position, greedy
  agreement, max |Δ logprob| of the actual tokens (prompts of 5 / 300 / 1000 / 3000 tokens, 16
  greedy tokens each);
* speed: SGLang's ``bench_one_batch_server`` (random ids, ``--input-len``, batch sizes
  ``--batch-sizes``): prefill (input tok/s, TTFT) and decode (output tok/s).

    python scripts/gpu_tp.py --work /tmp/tp --tp 1 2 [4]

Writes ``$OUT/tp_flash_dims.json`` and prints the table. Exit 1 when a KL gate (mean <= 0.01,
i.e. TP-N is the one-GPU model up to bf16 summation order) or greedy agreement (>= 0.9) fails.
"""

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
from gpu_flash_dims import bench, build  # scripts/ (the running script's directory)

from sglang_dsv4.server_process import Server

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = (5, 300, 1000, 3000)
DECODE = 16
KL_GATE, GREEDY_GATE = 0.01, 0.9


def eight_layer_config(work: Path) -> Path:
    """configs/dsv4-flash-dims.json with 8 layers (c4 / c128 alternating after one SWA)."""
    cfg = json.loads((ROOT / "configs" / "dsv4-flash-dims.json").read_text())
    cfg["num_hidden_layers"] = 8
    cfg["compress_ratios"] = [0, 4, 128, 4, 128, 4, 128, 4, 0]  # + the MTP layer's
    work.mkdir(parents=True, exist_ok=True)
    path = work / "flash-dims-8l.json"
    path.write_text(json.dumps(cfg, indent=2))
    return path


def sample(server: Server) -> list[dict]:
    """Greedy tokens with every position's logprob and top-20 alternatives, per prompt."""
    out = []
    for n in PROMPTS:
        ids = torch.randint(2, 129000, (n,), generator=torch.Generator().manual_seed(n)).tolist()
        r = server.generate(ids, DECODE, top_logprobs_num=20)
        m = r["meta_info"]
        out.append(
            {
                "prompt": n,
                "tokens": r["output_ids"],
                "logprobs": [lp for lp, _, _ in m["input_token_logprobs"][1:]]
                + [lp for lp, _, _ in m["output_token_logprobs"]],
                "top": m["input_top_logprobs"][1:] + m["output_top_logprobs"],
            }
        )
    return out


def compare(run: list[dict], base: list[dict]) -> list[dict]:
    """KL(run || base) on run's top-20 of each position (base's logprob of a token outside its
    own top-20 is taken as its 20th: a lower bound on the gap), greedy agreement, |Δ logprob|."""
    rows = []
    for a, b in zip(run, base, strict=True):
        kl = []
        for top_a, top_b in zip(a["top"], b["top"], strict=True):
            if not top_a:
                continue
            lp_b = {t: lp for lp, t, _ in top_b}
            floor = min(lp_b.values())
            kl.append(sum(math.exp(lp) * (lp - lp_b.get(t, floor)) for lp, t, _ in top_a))
        n = min(len(a["logprobs"]), len(b["logprobs"]))
        dlp = (torch.tensor(a["logprobs"][:n]) - torch.tensor(b["logprobs"][:n])).abs()
        agree = sum(x == y for x, y in zip(a["tokens"], b["tokens"], strict=True)) / DECODE
        rows.append(
            {
                "prompt": a["prompt"],
                "kl_top20_mean": sum(kl) / len(kl),
                "kl_top20_max": max(kl),
                "greedy_agreement": agree,
                "max_abs_dlogprob": float(dlp.max()),
            }
        )
    return rows


def serve(model: Path, tp: int, args, out_dir: Path):
    """(samples, bench rows) of ``model`` served with ``--tp tp``."""
    context = max(8192, -(-(args.input_len + args.output_len + 1) // 1024) * 1024)
    server_args = ["--model-path", str(model), "--context-length", str(context), "--tp", str(tp)]
    server_args += ["--sampling-backend", "pytorch", "--mem-fraction-static", "0.6"]
    server_args += ["--cuda-graph-max-bs-decode", str(max(args.batch_sizes))]
    server = Server(server_args, out_dir / f"server_tp{tp}.log", timeout=600)
    try:
        samples = sample(server)
        perf = []
        if args.batch_sizes:
            perf = bench(
                model, server.url, args.input_len, args.batch_sizes, args.output_len, out_dir
            )
    finally:
        server.stop()
    return samples, perf


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, default=Path("/tmp/tp_flash_dims"))
    ap.add_argument("--tp", type=int, nargs="+", default=[1, 2], help="TP sizes; 1 first")
    ap.add_argument("--input-len", type=int, default=2048)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--batch-sizes", type=int, nargs="*", default=[1, 32])
    args = ap.parse_args()
    if args.tp[0] != 1:
        ap.error("the first --tp is the baseline and must be 1")
    out_dir = Path(os.environ.get("OUT", args.work))
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    model = build(eight_layer_config(args.work), args.work / "ckpt-8l-bf16", "bf16")
    report = {"build_s": time.time() - t0, "device": torch.cuda.get_device_name()}
    report |= {"gpus": torch.cuda.device_count(), "date": time.strftime("%Y-%m-%d"), "runs": {}}
    base = None
    for tp in args.tp:
        t = time.time()
        samples, perf = serve(model, tp, args, out_dir)
        base = base or samples
        report["runs"][tp] = {"compare": compare(samples, base), "bench": perf}
        report["runs"][tp]["wall_s"] = time.time() - t
        print(f"tp {tp} done in {time.time() - t:.0f} s", flush=True)
    (out_dir / "tp_flash_dims.json").write_text(json.dumps(report, indent=2))
    return 0 if print_report(report) else 1


def print_report(report: dict) -> bool:
    print(f"\n== Flash-dims DSV4, 8 layers, bf16, random: TP vs TP1 on {report['device']} ==")
    print(f"{'tp':>3} {'prompt':>7} {'KL top20 mean':>14} {'max':>9} {'greedy':>7} {'max|dlp|':>9}")
    ok = True
    for tp, run in report["runs"].items():
        for r in run["compare"]:
            print(
                f"{tp:>3} {r['prompt']:>7} {r['kl_top20_mean']:>14.2e} {r['kl_top20_max']:>9.2e}"
                f" {r['greedy_agreement']:>7.2f} {r['max_abs_dlogprob']:>9.2e}"
            )
            ok &= r["kl_top20_mean"] <= KL_GATE and r["greedy_agreement"] >= GREEDY_GATE
    head = f"{'tp':>3} {'batch':>6} {'input':>6} {'TTFT s':>8} {'prefill tok/s':>14}"
    print(f"{head} {'decode tok/s':>13}")
    for tp, run in report["runs"].items():
        for p in run["bench"]:
            print(
                f"{tp:>3} {p['batch_size']:>6} {p['input_len']:>6} {p['ttft_s']:>8.3f} "
                f"{p['input_tok_s']:>14.1f} {p['decode_tok_s']:>13.1f}"
            )
    print("PASS" if ok else "FAIL")
    return ok


if __name__ == "__main__":
    sys.exit(main())
