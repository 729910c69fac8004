"""Greedy decode vs re-prefill: do decoded tokens get the same logprobs when scored by a prefill?

As upstream SGLang's ``kl_test_utils``: decode ``max_new_tokens`` greedy tokens per prompt
(output logprobs), flush the cache, prefill prompt + output and read the input logprobs of the
same tokens; per sequence the mean of ``exp(r) - 1 - r`` with ``r = logp_prefill - logp_decode``
(an unbiased KL estimate), averaged over sequences; upstream gates on < 0.015.

Two variants: ``plain`` (cold cache) and ``cache_hit`` (each prompt is prefilled once first, so
decoding starts from a prefix-cache hit: cached KV, compressor tails and entries reused).
The re-prefill asks logprobs only from the last prompt position on (``logprob_start_len`` =
prompt length - 1; that first value comes back as None), not from position 0 (which would turn
SGLang's prefix cache off for the request); the shape of what comes back is checked.
"""

from __future__ import annotations

import numpy as np

from sglang_dsv4.evals.perplexity import TEXT
from sglang_dsv4.progress import track

__all__ = ["run_consistency"]


def _prompts(tokenizer, base_len: int, n: int, seed: int) -> list[list[int]]:
    ids = tokenizer.encode(TEXT.read_text(), add_special_tokens=False)
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        length = int(base_len * rng.uniform(0.5, 1.5))
        start = int(rng.integers(0, len(ids) - length))
        out.append(ids[start : start + length])
    return out


def _rescore(server, prompt: list[int], output: list[int]) -> list[float]:
    # The first position of the requested range comes back as None (SGLang does not keep the
    # logits before it): start one token early and drop it.
    start = len(prompt) - 1
    meta = server.generate(prompt + output, 0, return_logprob=True, logprob_start_len=start)
    lps = [lp for lp, _, _ in meta["meta_info"]["input_token_logprobs"]]
    if len(lps) != len(output) + 1 or lps[0] is not None or None in lps[1:]:
        raise RuntimeError(f"re-prefill gave {len(lps)} logprobs for {len(output)} tokens")
    return lps[1:]


def run_consistency(
    server, tokenizer, base_len: int, n: int, max_new_tokens: int, seed: int = 0
) -> dict:
    prompts = _prompts(tokenizer, base_len, n, seed)
    result = {}
    for variant in track(("plain", "cache_hit"), "decode vs re-prefill", "pass"):
        server.flush_cache()
        if variant == "cache_hit":
            server.generate(prompts, 0)
        outs = server.generate(prompts, max_new_tokens, return_logprob=True)
        rows = []
        for prompt, out in zip(prompts, outs, strict=True):
            decode_lp = [lp for lp, _, _ in out["meta_info"]["output_token_logprobs"]]
            rows.append((prompt, out["output_ids"], decode_lp, out["meta_info"]["cached_tokens"]))
        server.flush_cache()
        kls, max_diff = [], 0.0
        for prompt, output, decode_lp, _ in rows:
            r = np.asarray(_rescore(server, prompt, output)) - np.asarray(decode_lp)
            kls.append(float(np.mean(np.exp(r) - 1 - r)))
            max_diff = max(max_diff, float(np.abs(r).max()))
        result[variant] = {
            "kl": float(np.mean(kls)),
            "per_prompt_kl": kls,
            "max_abs_dlogprob": max_diff,
            "prompt_tokens": [len(p) for p, *_ in rows],
            "cached_tokens": [c for *_, c in rows],
            "decoded_tokens": max_new_tokens,
        }
    return result
