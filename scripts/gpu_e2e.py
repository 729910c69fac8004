"""End-to-end check of the served model on one machine (GPU or CPU), printing a short table.

Starts ``python -m sglang.launch_server --model dsv4`` (the embedded checkpoint, fp32), checks
greedy tokens, logprobs and top-20 KL of a few prompts against the reference forward of the
same checkpoint (``RefDSV4``, fp32; ``sglang_dsv4.evals.reference``), then measures time to
first token and decode speed at batch 1, 8 and 32, then runs the robustness checks
(``server_checks.robustness``: bad requests, request fuzz, structured output, no slot leaked).
With ``--graph-check`` it then serves the same requests with ``--disable-cuda-graph`` and checks
that the greedy tokens are identical with and without CUDA graphs (and logprobs within 1e-4).
Exit status 1 when a correctness gate fails. Results also go to ``$OUT/gpu_e2e.json`` if set.

    python scripts/gpu_e2e.py [--graph-check] [--extra-server-args "..."]
"""

import argparse
import concurrent.futures
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from sglang_dsv4.checkpoint import load_state_dict
from sglang_dsv4.config import DSV4Config
from sglang_dsv4.embedded import embedded_checkpoint
from sglang_dsv4.evals.reference import compare_with_reference
from sglang_dsv4.ref.model import RefDSV4
from sglang_dsv4.server_checks import robustness
from sglang_dsv4.server_process import Server

PROMPT_LENS = (5, 300, 1000)
DECODE = 16


def measure(server: Server) -> dict:
    def generate(ids: list[int], n: int) -> dict:
        return server.generate(ids, n, return_logprob=False, logprob_start_len=-1)

    ids = list(range(100, 116))
    for _ in range(2):
        generate(ids, 1)
    ttft = []
    for _ in range(5):
        t = time.perf_counter()
        generate(ids, 1)
        ttft.append(time.perf_counter() - t)
    t = time.perf_counter()
    generate(ids, 129)
    decode_b1 = 128 / (time.perf_counter() - t - statistics.median(ttft))
    out = {"ttft_ms": 1000 * statistics.median(ttft), "decode_tok_s_bs1": decode_b1}
    for bs in (8, 32):
        prompts = [list(range(200 + i, 216 + i)) for i in range(bs)]
        t = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(bs) as pool:
            outs = list(pool.map(lambda p: generate(p, 128), prompts))
        out[f"decode_tok_s_bs{bs}"] = bs * 128 / (time.perf_counter() - t)
        out[f"batch{bs}_tokens"] = [o["output_ids"] for o in outs]
    return out


def serve_and_check(extra: list[str], log: Path, ref: RefDSV4, device: str, robust=False):
    """Reference comparison and speed; with ``robust``, then the robustness checks
    (``server_checks.robustness``: bad requests, request fuzz, structured output, no leak)."""
    args = ["--model", "dsv4", "--dtype", "float32", "--max-total-tokens", "65536", *extra]
    server = Server(args, log, timeout=600)
    try:
        rows = compare_with_reference(server, ref, PROMPT_LENS, DECODE, device)
        for r in rows:
            r["greedy_equal"] = r["greedy_agreement"] == 1.0
        perf = measure(server)
        return rows, perf, robustness(server.url, ref.cfg.vocab_size) if robust else None
    finally:
        server.stop()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--extra-server-args", default="")
    ap.add_argument("--log", default="/tmp/gpu_e2e_server.log")
    ap.add_argument("--graph-check", action="store_true")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ckpt = embedded_checkpoint()
    # fp32 reference of the (bf16-stored) checkpoint, like the fp32 server
    weights = {
        k: (v.float() if v.is_floating_point() else v).to(device)
        for k, v in load_state_dict(ckpt).items()
    }
    ref = RefDSV4(DSV4Config.from_json(ckpt), weights)
    extra = args.extra_server_args.split()
    rows, perf, robust = serve_and_check(extra, Path(args.log), ref, device, robust=True)
    graph = None
    if args.graph_check:
        eager_log = Path(args.log).with_suffix(".eager.log")
        eager_rows, eager_perf, _ = serve_and_check(
            [*extra, "--disable-cuda-graph"], eager_log, ref, device
        )
        graph = {
            "tokens_equal": all(
                a["tokens"] == b["tokens"] for a, b in zip(rows, eager_rows, strict=True)
            )
            and all(perf[k] == eager_perf[k] for k in ("batch8_tokens", "batch32_tokens")),
            "max_abs_dlogprob": max(
                (torch.tensor(a["logprobs"]) - torch.tensor(b["logprobs"])).abs().max().item()
                for a, b in zip(rows, eager_rows, strict=True)
            ),
            "eager_perf": {k: v for k, v in eager_perf.items() if not k.endswith("tokens")},
        }
        graph["captured"] = "cuda graph: true" in Path(args.log).read_text().lower()
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    perf = {k: v for k, v in perf.items() if not k.endswith("tokens")}
    result = {"device": name, "checks": rows, "perf": perf, "graph_check": graph}
    result["robustness"] = robust
    result["date"] = time.strftime("%Y-%m-%d")
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "gpu_e2e.json").write_text(json.dumps(result, indent=2))
    print(f"\n== sglang-dsv4 e2e on {name} (embedded dsv4, fp32) ==")
    print(f"{'prompt':>8} {'greedy==ref':>12} {'max|dlogprob|':>14} {'KL top20 mean':>14}")
    for r in rows:
        print(
            f"{r['prompt']:>8} {r['greedy_equal']!s:>12} {r['max_abs_dlogprob']:>14.2e} "
            f"{r['kl_top20_mean']:>14.2e}"
        )

    def speed(p):
        return (
            f"TTFT {p['ttft_ms']:.0f} ms (16-token prompt) | decode tok/s: "
            f"{p['decode_tok_s_bs1']:.1f} bs1, {p['decode_tok_s_bs8']:.1f} bs8, "
            f"{p['decode_tok_s_bs32']:.1f} bs32"
        )

    print(speed(perf))
    ok = all(r["greedy_equal"] and r["max_abs_dlogprob"] <= 1e-3 for r in rows)
    if graph is not None:
        print(f"without CUDA graphs: {speed(graph['eager_perf'])}")
        print(
            f"CUDA graph vs eager: tokens identical {graph['tokens_equal']}, "
            f"max |dlogprob| {graph['max_abs_dlogprob']:.1e}"
        )
        ok = ok and graph["tokens_equal"] and graph["max_abs_dlogprob"] <= 1e-4
    fuzz, bad = robust["fuzz"], robust["bad_requests"]
    print(
        f"robustness: bad requests refused {sum(r['refused_with_reason'] for r in bad)}"
        f"/{len(bad)}, fuzz {fuzz['cases']} requests {fuzz['statuses']} "
        f"failures {len(fuzz['failures'])}, structured output "
        f"{[r['name'] for r in robust['structured_output'] if r['ok']]}, "
        f"slots left {robust['used_tokens']} -> {'ok' if robust['ok'] else 'FAIL'}"
    )
    for f in fuzz["failures"][:5]:
        print("  fuzz failure:", f)
    ok = ok and robust["ok"]
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
