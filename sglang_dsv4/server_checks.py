"""Robustness checks against a running server, shared by the CPU tests and the GPU run.

* :func:`check_bad_requests`: requests that must be refused (prompt past the context, token id
  outside the vocabulary, invalid sampling parameters, empty prompt) get a 4xx whose message
  names the problem, and a normal request right after each one is still answered;
* :func:`shared_prefix_load`: a burst of concurrent requests over a few shared prefixes finishes
  without an error, and the radix cache serves the shared prefixes;
* :func:`used_tokens`: slots still held once the cache is flushed (0 when nothing leaked).
"""

import concurrent.futures
import random
import time
from dataclasses import dataclass

import requests

__all__ = ["BadRequest", "check_bad_requests", "shared_prefix_load", "used_tokens"]


@dataclass(frozen=True)
class BadRequest:
    name: str
    body: dict
    words: tuple[str, ...]  # the error message names the problem with one of these


def bad_requests(context_len: int, vocab_size: int) -> list[BadRequest]:
    def req(ids, **params) -> dict:
        return {"input_ids": ids, "sampling_params": {"max_new_tokens": 4, **params}}

    return [
        BadRequest("prompt longer than the context", req([5] * (context_len + 1)),
                   ("context", "longer")),
        BadRequest("token id past the vocabulary", req([5, vocab_size + 7, 6]), ("vocab",)),
        BadRequest("negative token id", req([5, -3, 6]), ("vocab",)),
        BadRequest("negative temperature", req([5, 6], temperature=-1.0), ("temperature",)),
        BadRequest("top_p above 1", req([5, 6], top_p=1.5), ("top_p",)),
        BadRequest("negative max_new_tokens", req([5, 6], max_new_tokens=-2),
                   ("max_new_tokens",)),
        BadRequest("empty prompt", req([]), ("empty", "input")),
    ]  # fmt: skip


def check_bad_requests(url: str, context_len: int, vocab_size: int) -> list[dict]:
    """Send each bad request, then a good one. Rows: name, status, refused-with-a-named-reason,
    served-after, the message head."""
    rows = []
    for bad in bad_requests(context_len, vocab_size):
        r = requests.post(url + "/generate", json=bad.body, timeout=300)
        text = r.text.lower()
        good = requests.post(
            url + "/generate",
            json={"input_ids": [5, 6, 7], "sampling_params": {"max_new_tokens": 4}},
            timeout=300,
        )
        served = good.status_code == 200 and len(good.json().get("output_ids", [])) == 4
        rows.append(
            {
                "request": bad.name,
                "status": r.status_code,
                "refused_with_reason": 400 <= r.status_code < 500
                and any(w in text for w in bad.words),
                "served_after": served,
                "message": r.text[:160],
            }
        )
    return rows


def shared_prefix_load(
    url: str,
    vocab_size: int,
    n_requests: int = 64,
    n_prefixes: int = 4,
    prefix_len: int = 1024,
    suffix_len: int = 32,
    max_new_tokens: int = 32,
    seed: int = 0,
    timeout: float = 1800,
) -> dict:
    """``n_requests`` at once, request ``i`` = prefix ``i % n_prefixes`` + its own suffix.
    Returns counts of errors / short outputs, the wall time and how many prompt tokens the radix
    cache served (``cached_tokens`` of each answer)."""
    rng = random.Random(seed)

    def ids(n: int) -> list[int]:
        return [rng.randrange(2, vocab_size) for _ in range(n)]

    prefixes = [ids(prefix_len) for _ in range(n_prefixes)]
    prompts = [prefixes[i % n_prefixes] + ids(suffix_len) for i in range(n_requests)]

    def one(prompt: list[int]) -> dict:
        body = {
            "input_ids": prompt,
            "sampling_params": {"temperature": 0, "max_new_tokens": max_new_tokens,
                                "ignore_eos": True},
        }  # fmt: skip
        try:
            r = requests.post(url + "/generate", json=body, timeout=timeout)
        except requests.RequestException as e:
            return {"error": repr(e)}
        if r.status_code != 200:
            return {"error": f"{r.status_code} {r.text[:200]}"}
        out = r.json()
        return {"n_out": len(out["output_ids"]), "cached": out["meta_info"]["cached_tokens"]}

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(n_requests) as pool:
        results = list(pool.map(one, prompts))
    wall = time.perf_counter() - start
    errors = [r["error"] for r in results if "error" in r]
    done = [r for r in results if "error" not in r]
    return {
        "requests": n_requests,
        "prefix_len": prefix_len,
        "suffix_len": suffix_len,
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "short_outputs": sum(r["n_out"] != max_new_tokens for r in done),
        "cached_tokens": sum(r["cached"] for r in done),
        "prompt_tokens": sum(len(p) for p in prompts),
        "hits": sum(r["cached"] > 0 for r in done),
        "wall_s": wall,
    }


def used_tokens(url: str) -> list[int]:
    """Token slots in use per data-parallel rank after ``/flush_cache`` (retried while busy)."""
    for _ in range(30):
        if requests.post(url + "/flush_cache", timeout=60).status_code == 200:
            break
        time.sleep(1)
    loads = requests.get(url + "/v1/loads", timeout=30).json()
    if "loads" in loads:
        return [d["num_used_tokens"] for d in loads["loads"]]
    return [loads["num_used_tokens"]]
