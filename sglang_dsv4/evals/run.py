"""Offline accuracy checks of a served DSV4 model (``scripts/run_eval.sh`` runs this).

    python -m sglang_dsv4.evals.run [--model dsv4|PATH] [--port N] [--quick] [--out DIR]

Starts ``python -m sglang.launch_server`` for ``--model`` (or uses the server already answering
on ``--port``) and measures, with no network access:

* held-out perplexity and next-token top-1 through the server's prompt logprobs, next to HF
  transformers (fp32, same checkpoint); gate: perplexity within 1 % relative;
* long-context retrieval: a fact planted at a random depth of 2K-16K tokens of held-out text,
  asked at the end; accuracy per length (no gate);
* greedy decode vs re-prefill KL, cold and after a prefix-cache hit; gate < 0.015 (upstream's);
* GSM8K 5-shot through ``sglang.test.run_eval`` (real DSV4 checkpoints only; no gate).

Prints a table, writes ``eval_results/<model>-<time>.json`` and ``.png`` (and ``latest.*``),
and exits 1 when a gate fails. Sample sizes (:data:`PLANS`): ``full`` on a GPU (or ``--full``),
``cpu`` by default without one, ``--quick`` for the CPU CI test.
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import sys
import time
from pathlib import Path

import requests
import torch

from sglang_dsv4.evals import consistency, gsm8k, perplexity, retrieval
from sglang_dsv4.evals.plot import Figure, Panel
from sglang_dsv4.evals.server import attach_or_start

PPL_GATE = 0.01
KL_GATE = 0.015
# (chunk_len, n_chunks, retrieval lengths, retrieval samples, consistency prompts, base len, decode)
PLANS = {
    "full": (4096, 20, [2048, 4096, 8192, 16384], 16, 8, 1024, 128),
    "cpu": (2048, 8, [2048, 4096, 8192, 16384], 2, 4, 512, 32),  # default without a GPU
    "quick": (384, 2, [2048], 1, 2, 300, 8),
}


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="dsv4", help="dsv4 (embedded), a path or a repo id")
    ap.add_argument("--port", type=int, help="use the server on this port if one answers")
    ap.add_argument("--quick", action="store_true", help="reduced sample (the CPU CI run)")
    ap.add_argument("--full", action="store_true", help="the GPU sample, also on CPU (slow)")
    ap.add_argument("--out", type=Path, default=Path("eval_results"))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--gsm8k-examples", type=int, default=1319)
    ap.add_argument("--gsm8k-data", type=Path, default=gsm8k.DATA, help="GSM8K test.jsonl")
    ap.add_argument("--server-args", default="", help="extra launch_server arguments")
    return ap.parse_args(argv)


def _local_config(model: str) -> dict:
    from sglang_dsv4.embedded import resolve_model_name

    path = Path(resolve_model_name(model) or model) / "config.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _is_real_dsv4(config: dict) -> bool:
    return config.get("vocab_size") == 129280 and config.get("num_hidden_layers", 0) >= 40


def gates_pass(report: dict) -> bool:
    return bool(report["gates"]) and all(g["pass"] for g in report["gates"].values())


def main(argv=None) -> int:
    args = parse_args(argv)
    # a terminated run still stops the server it started (``finally`` below)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    args.mode = "quick" if args.quick else ("full" if args.full or args.device != "cpu" else "cpu")
    plan = PLANS[args.mode]
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    max_tokens = 8192 if args.quick else 65536
    server_args = ["--max-total-tokens", str(max_tokens), *args.server_args.split()]
    local = _local_config(args.model)
    if "--dtype" not in server_args and local and not _is_real_dsv4(local):
        # the reference is HF in fp32 ("auto" would pick float16 for a float32 config)
        server_args += ["--dtype", "float32"]
    t0 = time.time()
    server = attach_or_start(args.model, args.port, server_args, args.out / f"server-{stamp}.log")
    startup = time.time() - t0
    try:
        report = _run_all(server, args, plan)
    finally:
        server.stop()
    report["meta"] |= {
        "model": args.model,
        "model_path": server.model_path,
        "mode": args.mode,
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "server_startup_s": round(startup, 1),
        "total_s": round(time.time() - t0, 1),
    }
    name = Path(server.model_path).name or "model"
    for stem in (f"{name}-{stamp}", "latest"):
        (args.out / f"{stem}.json").write_text(json.dumps(report, indent=1) + "\n")
        plot(report, args.out / f"{stem}.png")
    print(table(report))
    print(f"\nwrote {args.out / f'{name}-{stamp}.json'} and .png")
    return 0 if gates_pass(report) else 1


def _run_all(server, args, plan) -> dict:
    from transformers import AutoTokenizer

    chunk_len, n_chunks, lengths, n_retrieval, n_prompts, base_len, decode = plan
    tok = AutoTokenizer.from_pretrained(server.info.get("tokenizer_path") or server.model_path)
    config = _local_config(server.model_path)
    info = requests.get(server.url + "/server_info", timeout=30).json()
    report: dict = {"meta": {"server_dtype": info.get("dtype")}, "gates": {}, "skipped": {}}

    chunks = perplexity.heldout_chunks(tok, chunk_len, n_chunks)
    t = time.time()
    served = perplexity.server_scores(server, chunks)
    ppl = {"server": perplexity.summarize(served, chunks), "server_s": round(time.time() - t, 1)}
    if not config or _is_real_dsv4(config) or config.get("quantization_config"):
        report["skipped"]["hf_reference"] = (
            "HF fp32 reference skipped: not a small local checkpoint (no perplexity gate)"
        )
    else:
        t = time.time()
        ref = perplexity.hf_scores(server.model_path, chunks, args.device)
        ppl["hf_fp32"] = perplexity.summarize(ref, chunks)
        ppl["hf_s"] = round(time.time() - t, 1)
        ppl |= perplexity.compare(served, ref)
        rel = abs(ppl["server"]["ppl"] - ppl["hf_fp32"]["ppl"]) / ppl["hf_fp32"]["ppl"]
        report["gates"]["ppl_vs_hf"] = {"value": rel, "limit": PPL_GATE, "pass": rel < PPL_GATE}
    ppl["chunk_len"], ppl["chunks"] = chunk_len, len(chunks)
    report["perplexity"] = ppl

    t = time.time()
    report["retrieval"] = retrieval.run_retrieval(server, tok, lengths, n_retrieval)
    report["retrieval"]["seconds"] = round(time.time() - t, 1)

    t = time.time()
    report["consistency"] = consistency.run_consistency(server, tok, base_len, n_prompts, decode)
    report["consistency"]["seconds"] = round(time.time() - t, 1)
    for variant in ("plain", "cache_hit"):
        kl = report["consistency"][variant]["kl"]
        report["gates"][f"decode_kl_{variant}"] = {
            "value": kl,
            "limit": KL_GATE,
            "pass": bool(kl < KL_GATE),
        }

    if not _is_real_dsv4(config):
        report["skipped"]["gsm8k"] = (
            "GSM8K skipped: only for a real DSV4 checkpoint given with --model "
            f"(this one has {config.get('num_hidden_layers')} layers, "
            f"vocab {config.get('vocab_size')})"
        )
    elif not args.gsm8k_data.exists():
        report["skipped"]["gsm8k"] = f"GSM8K skipped: {args.gsm8k_data} is missing"
    else:
        port = int(server.url.rsplit(":", 1)[1])
        log = args.out / "gsm8k.log"
        report["gsm8k"] = gsm8k.run_gsm8k(port, args.gsm8k_examples, log, args.gsm8k_data)
    for reason in report["skipped"].values():
        print(reason)
    return report


def table(report: dict) -> str:
    meta, ppl = report["meta"], report["perplexity"]
    lines = [
        f"\n== sglang-dsv4 evals: {meta['model']} ({meta['mode']}, server dtype "
        f"{meta.get('server_dtype')}) on {meta['device']}, {meta['date']} ==",
        f"{'check':<44} {'served':>12} {'reference':>12} {'gate':>16}",
    ]

    def gate(key: str) -> str:
        g = report["gates"].get(key)
        if g is None:
            return "-"
        return f"{'PASS' if g['pass'] else 'FAIL'} < {g['limit']:g}"

    hf = ppl.get("hf_fp32", {})
    n_tok = ppl["server"]["tokens"]
    label = f"held-out ppl ({n_tok} tok, ctx {ppl['chunk_len']})"
    lines.append(
        f"{label:<44} {ppl['server']['ppl']:>12.4f} {hf.get('ppl', math.nan):>12.4f} "
        f"{gate('ppl_vs_hf'):>16}"
    )
    lines.append(
        f"{'held-out next-token top-1':<44} {ppl['server']['top1']:>12.4f} "
        f"{hf.get('top1', math.nan):>12.4f} {'-':>16}"
    )
    if "ppl_vs_hf" in report["gates"]:
        rel = report["gates"]["ppl_vs_hf"]["value"]
        lines.append(f"{'  relative ppl difference':<44} {rel:>12.2e}")
        label = f"  max |dlogprob| ({ppl['tokens_over_1e-3']} tok > 1e-3)"
        lines.append(f"{label:<44} {ppl['max_abs_dlogprob']:>12.2e}")
        lines.append(f"{'  top-1 agreement server vs HF':<44} {ppl['top1_agree']:>12.4f}")
    ret = report["retrieval"]
    chance = f"chance {ret['chance']:.4f}"
    for length, r in ret["per_length"].items():
        label = f"retrieval @ {length} tokens (n={r['n']})"
        lines.append(f"{label:<44} {r['accuracy']:>12.3f} {chance:>12} {'-':>16}")
    for variant in ("plain", "cache_hit"):
        c = report["consistency"][variant]
        label = f"decode vs re-prefill KL ({variant}, {c['decoded_tokens']} tok)"
        lines.append(f"{label:<44} {c['kl']:>12.2e} {'':>12} {gate(f'decode_kl_{variant}'):>16}")
    if "gsm8k" in report:
        g = report["gsm8k"]
        label = f"GSM8K 5-shot (n={g['n']})"
        lines.append(f"{label:<44} {g['accuracy']:>12.3f}")
    ok = gates_pass(report)
    lines.append(f"{'ALL GATES PASS' if ok else 'GATE FAILED'} ({meta['total_s']:.0f} s)")
    return "\n".join(lines)


def plot(report: dict, png: Path) -> None:
    meta, ppl = report["meta"], report["perplexity"]
    fig = Figure(cols=3, rows=1, title=f"sglang-dsv4 evals: {meta['model']} on {meta['device']}")
    bars = {"server": [ppl["server"]["ppl"], 100 * ppl["server"]["top1"]]}
    if "hf_fp32" in ppl:
        bars["HF fp32"] = [ppl["hf_fp32"]["ppl"], 100 * ppl["hf_fp32"]["top1"]]
    fig.add(Panel("held-out text", groups=["perplexity", "top-1 %"], bars=bars))
    ret = report["retrieval"]["per_length"]
    xs = [math.log2(int(k)) for k in ret]
    fig.add(
        Panel(
            "planted-fact retrieval accuracy",
            xlabel="log2(context tokens)",
            lines={"accuracy": (xs, [r["accuracy"] for r in ret.values()])},
            y_range=(0.0, 1.0),
        )
    )
    cons = report["consistency"]
    fig.add(
        Panel(
            f"decode vs re-prefill KL (gate {KL_GATE})",
            log_y=True,
            groups=[f"prompt {i}" for i in range(len(cons["plain"]["per_prompt_kl"]))],
            bars={
                v: [max(k, 1e-12) for k in cons[v]["per_prompt_kl"]] for v in ("plain", "cache_hit")
            },
        )
    )
    fig.save(png)


if __name__ == "__main__":
    sys.exit(main())
