"""Prefix-cache benchmark: a shared-prefix trace served with the radix cache off and on.

Trace: ``--systems`` system prompts of 700-3000 tokens, ``--requests`` requests each made of
one system prompt (random choice) + a random 20-300-token suffix, ``--new-tokens`` greedy
tokens. Requests go one at a time (``--concurrency``), so the latency of a 1-token request is
its time to first token. Reported per mode: hit rate (cached / prompt tokens), prompt tokens
actually prefilled, TTFT mean / p50 / p90, and whether the first tokens agree between modes.

Next to the measured hit rate, the same trace is replayed through two prefix policies over an
unbounded cache: ours (hits at every 128-token block end) and upstream SGLang's DSV4 policy
(256-token pages, no cached c128 state, so hits only at 256-token boundaries).

    python scripts/bench_prefix_cache.py --model dsv4 --out eval_results/prefix_cache.json
"""

import argparse
import concurrent.futures
import json
import random
import statistics
import time
from pathlib import Path

from sglang_dsv4.server_process import Server


def make_trace(n_requests: int, n_systems: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)

    def tokens(n: int) -> list[int]:
        return [rng.randrange(2, vocab) for _ in range(n)]

    systems = [tokens(rng.randint(700, 3000)) for _ in range(n_systems)]
    return [rng.choice(systems) + tokens(rng.randint(20, 300)) for _ in range(n_requests)]


def policy_hits(trace: list[list[int]], align: int) -> list[int]:
    """Cached tokens per request if every earlier prompt were cached at ``align``-token steps."""
    hits, seen = [], []
    for prompt in trace:
        best = 0
        for other in seen:
            n = 0
            for a, b in zip(prompt, other, strict=False):
                if a != b:
                    break
                n += 1
            best = max(best, n)
        # a request always prefills at least its last token
        hits.append(min(best, len(prompt) - 1) // align * align)
        seen.append(prompt)
    return hits


def serve_trace(server: Server, trace, new_tokens: int, concurrency: int) -> list[dict]:
    def one(prompt):
        t0 = time.perf_counter()
        out = server.generate(prompt, new_tokens, logprob_start_len=-1)
        return {
            "latency_s": time.perf_counter() - t0,
            "cached": out["meta_info"]["cached_tokens"],
            "prompt": len(prompt),
            "output_ids": out["output_ids"],
        }

    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(one, trace))


def summarize(results: list[dict]) -> dict:
    lat = sorted(r["latency_s"] for r in results)
    prompt = sum(r["prompt"] for r in results)
    cached = sum(r["cached"] for r in results)
    return {
        "hit_rate": cached / prompt,
        "prompt_tokens": prompt,
        "prefilled_tokens": prompt - cached,
        "ttft_mean_ms": 1e3 * statistics.mean(lat),
        "ttft_p50_ms": 1e3 * lat[len(lat) // 2],
        "ttft_p90_ms": 1e3 * lat[int(0.9 * (len(lat) - 1))],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="dsv4")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--systems", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=1)
    ap.add_argument("--concurrency", type=int, default=1)
    ap.add_argument("--vocab", type=int, default=1000, help="token ids are drawn below this")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--server-args", default="", help="extra launch_server flags, one string")
    ap.add_argument("--out", type=Path, default=Path("eval_results/prefix_cache.json"))
    args = ap.parse_args()

    trace = make_trace(args.requests, args.systems, args.vocab, args.seed)
    base = ["--model", args.model, *args.server_args.split()]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    modes = {}
    for mode, flags in (("cache off", ["--disable-radix-cache"]), ("cache on", [])):
        log = args.out.with_name(f"prefix_cache_{mode.replace(' ', '_')}.log")
        server = Server([*base, *flags], log)
        try:
            server.generate([1] * 300, 1)  # warm-up; shares no prefix with the trace
            results = serve_trace(server, trace, args.new_tokens, args.concurrency)
        finally:
            server.stop()
        modes[mode] = {"summary": summarize(results), "results": results}

    prompt_tokens = sum(len(p) for p in trace)
    sims = {
        "ours: 128-token block ends (simulated, unbounded)": policy_hits(trace, 128),
        "upstream: 256-token pages (simulated, unbounded)": policy_hits(trace, 256),
    }
    same = all(
        a["output_ids"] == b["output_ids"]
        for a, b in zip(modes["cache off"]["results"], modes["cache on"]["results"], strict=True)
    )
    report = {
        "trace": {"requests": len(trace), "systems": args.systems, "prompt_tokens": prompt_tokens},
        "measured": {m: v["summary"] for m, v in modes.items()},
        "simulated_hit_rate": {k: sum(h) / prompt_tokens for k, h in sims.items()},
        "outputs_identical": same,
    }
    args.out.write_text(json.dumps(report, indent=2))

    print(f"trace: {len(trace)} requests, {args.systems} system prompts, {prompt_tokens} tokens")
    print(f"{'mode':<52} {'hit rate':>8} {'prefilled':>9} {'TTFT mean':>9} {'p50':>7} {'p90':>7}")
    for mode, s in report["measured"].items():
        print(
            f"{mode + ' (measured)':<52} {s['hit_rate']:>8.1%} {s['prefilled_tokens']:>9d} "
            f"{s['ttft_mean_ms']:>7.0f}ms {s['ttft_p50_ms']:>5.0f}ms {s['ttft_p90_ms']:>5.0f}ms"
        )
    for name, rate in report["simulated_hit_rate"].items():
        print(f"{name:<52} {rate:>8.1%}")
    print(f"first tokens identical with the cache off and on: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
