"""Robustness checks against a running server, shared by the CPU tests and the GPU run.

* :func:`check_bad_requests`: requests that must be refused (prompt past the context, token id
  outside the vocabulary, invalid sampling parameters, empty prompt) get a 4xx whose message
  names the problem, and a normal request right after each one is still answered;
* :func:`shared_prefix_load`: a burst of concurrent requests over a few shared prefixes finishes
  without an error, and the radix cache serves the shared prefixes;
* :func:`used_tokens`: slots still held once the cache is flushed (0 when nothing leaked);
* :func:`fuzz_server`: generated requests over the ``/generate`` and OpenAI schemas
  (:mod:`sglang_dsv4.request_fuzz`): each one gets a 2xx, or a 4xx with a message, and a normal
  request right after it is answered;
* :func:`check_structured_output`: JSON schema, regex and EBNF outputs through the OpenAI
  client, each valid under its grammar;
* :func:`robustness`: all of the above against one server (the GPU run's entry point).
"""

import concurrent.futures
import json
import random
import re
import time
from collections import Counter
from dataclasses import dataclass

import requests

from sglang_dsv4.request_fuzz import Case, fuzz_cases

__all__ = [
    "BadRequest",
    "check_bad_requests",
    "check_structured_output",
    "fuzz_server",
    "robustness",
    "shared_prefix_load",
    "used_tokens",
]


@dataclass(frozen=True)
class BadRequest:
    name: str
    body: object  # a JSON value: a /generate request, or not an object at all
    words: tuple[str, ...]  # the error message names the problem with one of these
    path: str = "/generate"
    content_type: str = "application/json"


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
        # SGLang 0.5.17 alone: a 500 from the chat model's validators (sglang_dsv4.http_body)
        BadRequest("chat body not an object", [1, 2], ("json object",), "/v1/chat/completions"),
        BadRequest("completions body not an object", "x", ("json object",), "/v1/completions"),
        BadRequest("chat body sent as a form (curl -d)",
                   {"model": "m", "messages": [{"role": "user", "content": "hi"}]},
                   ("application/json",), "/v1/chat/completions",
                   "application/x-www-form-urlencoded"),
    ]  # fmt: skip


def check_bad_requests(url: str, context_len: int, vocab_size: int) -> list[dict]:
    """Send each bad request, then a good one. Rows: name, status, refused-with-a-named-reason,
    served-after, the message head."""
    rows = []
    for bad in bad_requests(context_len, vocab_size):
        r = requests.post(
            url + bad.path,
            data=json.dumps(bad.body),
            headers={"Content-Type": bad.content_type},
            timeout=300,
        )
        text = r.text.lower()
        good = requests.post(
            url + "/generate",
            # greedy and ignore_eos: a sampled EOS would end it short of 4 tokens and read as
            # "not served" (the CPU CI's one flaky failure of 2026-12-07)
            json={
                "input_ids": [5, 6, 7],
                "sampling_params": {"max_new_tokens": 4, "temperature": 0, "ignore_eos": True},
            },
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
                # what the good request got, so that a False above says why
                "after": f"{good.status_code} {good.text[:160]}",
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


def _serves(url: str) -> bool:
    """A normal one-token request is answered."""
    body = {"input_ids": [5, 6, 7], "sampling_params": {"max_new_tokens": 1, "temperature": 0}}
    try:
        r = requests.post(url + "/generate", json=body, timeout=300)
    except requests.RequestException:
        return False
    return r.status_code == 200 and len(r.json().get("output_ids", [])) == 1


def _error_message(text: str) -> str:
    """The message of an error answer (SGLang's ``{"error": {"message"}}``, the OpenAI
    ``{"message"}``, FastAPI's ``{"detail"}``), else the raw text."""
    try:
        body = json.loads(text)
    except ValueError:
        return text.strip()
    if isinstance(body, dict):
        inner = body.get("error")
        msg = inner.get("message") if isinstance(inner, dict) else inner
        return str(msg or body.get("message") or body.get("detail") or "").strip()
    return text.strip()


def _send(url: str, case: Case) -> tuple[int, str]:
    try:
        r = requests.post(
            url + case.path,
            data=case.body,
            headers={"Content-Type": "application/json"},
            timeout=300,
            stream=case.stream,
        )
        text = r.content.decode("utf-8", "replace")  # a stream is read to its end
    except requests.RequestException as e:
        return 0, f"no answer: {e!r}"
    return r.status_code, text


def fuzz_server(
    url: str,
    vocab_size: int,
    context_len: int,
    model: str | None = None,
    seed: int = 0,
    count: int = 150,
    time_budget_s: float = 90.0,
) -> dict:
    """Send up to ``count`` generated requests (stopping once ``time_budget_s`` is spent), each
    followed by a normal one. A failure: no answer, a 5xx, a 4xx without a message, or the
    normal request not answered after it."""
    model = model or requests.get(url + "/v1/models", timeout=30).json()["data"][0]["id"]
    start, statuses, failures, ran = time.perf_counter(), Counter(), [], 0
    for case in fuzz_cases(seed, count, vocab_size, context_len, model):
        if time.perf_counter() - start > time_budget_s:
            break
        status, text = _send(url, case)
        ran += 1
        statuses[status // 100 * 100] += 1
        answered = 200 <= status < 300 or (400 <= status < 500 and _error_message(text))
        served = _serves(url)
        if not (answered and served):
            failures.append({"path": case.path, "change": case.note, "status": status,
                             "served_after": served, "answer": text[:300]})  # fmt: skip
    return {
        "cases": ran,
        "statuses": dict(statuses),
        "failures": failures,
        "wall_s": round(time.perf_counter() - start, 1),
    }


# (name, how it is asked, a check of the text it returns)
_JSON_SCHEMA = {"type": "string", "enum": ["yes", "no"]}
_REGEX = r"(yes|no|maybe) [a-z]{1,8}\."
_EBNF = 'root ::= "My lord, " ("yes" | "no") "."'


def check_structured_output(url: str, model: str | None = None) -> list[dict]:
    """JSON schema (``response_format``), regex and EBNF through the OpenAI client: each
    answer is a 200 whose text the grammar accepts. Rows: name, ok, text (or the error)."""
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key="none", timeout=300, max_retries=0)
    model = model or client.models.list().data[0].id
    chat = [{"role": "user", "content": "Who goes there?"}]
    asks = [
        ("json_schema", lambda: client.chat.completions.create(
            model=model, messages=chat, max_tokens=16, temperature=0,
            response_format={"type": "json_schema",
                             "json_schema": {"name": "answer", "schema": _JSON_SCHEMA}},
        ).choices[0].message.content, lambda t: json.loads(t) in ("yes", "no")),
        ("regex", lambda: client.completions.create(
            model=model, prompt="KING HENRY:", max_tokens=24, temperature=0,
            extra_body={"regex": _REGEX},
        ).choices[0].text, lambda t: re.fullmatch(_REGEX, t) is not None),
        ("ebnf", lambda: client.completions.create(
            model=model, prompt="KING HENRY:", max_tokens=16, temperature=0,
            extra_body={"ebnf": _EBNF},
        ).choices[0].text, lambda t: t in ("My lord, yes.", "My lord, no.")),
    ]  # fmt: skip
    rows = []
    for name, ask, valid in asks:
        try:
            text = ask()
            ok = valid(text)
        except (openai.OpenAIError, ValueError) as e:
            text, ok = f"error: {e!r}", False
        rows.append({"name": name, "ok": ok, "text": text})
    return rows


def robustness(
    url: str, vocab_size: int, context_len: int | None = None, model: str | None = None
) -> dict:
    """Every robustness check against one running server (the GPU run's entry point): bad
    requests, the request fuzz, structured output, and no slot held at the end. ``ok`` when all
    pass. ``context_len`` defaults to the server's (``max_model_len`` of ``/v1/models``)."""
    if context_len is None or model is None:
        card = requests.get(url + "/v1/models", timeout=30).json()["data"][0]
        context_len, model = context_len or card["max_model_len"], model or card["id"]
    bad = check_bad_requests(url, context_len, vocab_size)
    fuzz = fuzz_server(url, vocab_size, context_len, model)
    grammar = check_structured_output(url, model)
    used = used_tokens(url)
    ok = (
        all(r["refused_with_reason"] and r["served_after"] for r in bad)
        and not fuzz["failures"]
        and all(r["ok"] for r in grammar)
        and set(used) == {0}
    )
    return {"ok": ok, "bad_requests": bad, "fuzz": fuzz, "structured_output": grammar,
            "used_tokens": used}  # fmt: skip


if __name__ == "__main__":
    import argparse
    import sys

    ap = argparse.ArgumentParser(description="robustness checks against a running server")
    ap.add_argument("url", help="e.g. http://127.0.0.1:30000")
    ap.add_argument("--vocab-size", type=int, required=True)
    a = ap.parse_args()
    report = robustness(a.url.rstrip("/"), a.vocab_size)
    print(json.dumps(report, indent=2))
    print("robustness:", "PASS" if report["ok"] else "FAIL")
    sys.exit(0 if report["ok"] else 1)
