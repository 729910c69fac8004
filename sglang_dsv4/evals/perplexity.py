"""Held-out perplexity and next-token top-1 accuracy: the served model next to HF transformers.

The held-out text (``data/test_plays.txt``: plays never trained on) is cut into chunks of
``chunk_len`` tokens. The server scores each chunk through ``/generate`` with
``max_new_tokens=0``, ``logprob_start_len=0`` and ``top_logprobs_num=1``:
``input_token_logprobs[i]`` is ``log p(x_i | x_<i)`` (``None`` at ``i = 0``) and
``input_top_logprobs[i][0]`` the argmax
token at that position. HF ``DeepseekV4ForCausalLM`` loads the same checkpoint in fp32 and scores
the same chunks without a cache. Perplexity = ``exp(-mean log p)`` over all scored tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from sglang_dsv4.progress import track

__all__ = ["Scores", "heldout_chunks", "hf_scores", "server_scores", "summarize"]

TEXT = Path(__file__).resolve().parent / "data" / "test_plays.txt"


@dataclass
class Scores:
    logprobs: list[list[float]]  # per chunk, positions 1..L-1
    top1: list[list[int]]  # per chunk, argmax token predicted for positions 1..L-1


def heldout_chunks(tokenizer, chunk_len: int, n_chunks: int) -> list[list[int]]:
    """Up to ``n_chunks`` consecutive chunks of ``chunk_len`` tokens of the held-out plays."""
    ids = tokenizer.encode(TEXT.read_text(), add_special_tokens=False)
    n = min(n_chunks, len(ids) // chunk_len)
    return [ids[i * chunk_len : (i + 1) * chunk_len] for i in range(n)]


def server_scores(server, chunks: list[list[int]]) -> Scores:
    out = Scores([], [])
    for ids in track(chunks, "perplexity (server)", "chunk"):
        r = server.generate(ids, 0, return_logprob=True, logprob_start_len=0, top_logprobs_num=1)[
            "meta_info"
        ]
        lps, tops = r["input_token_logprobs"], r["input_top_logprobs"]
        if len(lps) != len(ids) or lps[0][0] is not None:
            want = len(ids)
            raise RuntimeError(f"expected {want} input logprobs from position 0, got {len(lps)}")
        out.logprobs.append([lp for lp, _, _ in lps[1:]])
        out.top1.append([top[0][1] for top in tops[1:]])
    return out


@torch.no_grad()
def hf_scores(model_path: str, chunks: list[list[int]], device: str) -> Scores:
    """The same numbers from HF transformers in fp32 (no cache)."""
    from transformers import DeepseekV4ForCausalLM

    model = DeepseekV4ForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    model = model.to(device).eval()
    out = Scores([], [])
    for ids in track(chunks, "perplexity (HF fp32)", "chunk"):
        x = torch.tensor([ids], device=device)
        logp = model(x, use_cache=False).logits[0].float().log_softmax(-1)  # [L, V]
        out.logprobs.append(logp[:-1].gather(1, x[0, 1:, None])[:, 0].tolist())
        out.top1.append(logp[:-1].argmax(-1).tolist())
    del model
    return out


def summarize(scores: Scores, chunks: list[list[int]]) -> dict:
    lps = [lp for chunk in scores.logprobs for lp in chunk]
    hits = [
        int(pred == tok)
        for preds, ids in zip(scores.top1, chunks, strict=True)
        for pred, tok in zip(preds, ids[1:], strict=True)
    ]
    return {
        "tokens": len(lps),
        "ppl": math.exp(-sum(lps) / len(lps)),
        "top1": sum(hits) / len(hits),
    }


def compare(a: Scores, b: Scores, tol: float = 1e-3) -> dict:
    """Token-level agreement: max |dlogprob|, the number of tokens that differ by more than
    ``tol`` (a near-tie in a c4 top-k choice, broken the other way, moves single tokens) and the
    top-1 agreement."""
    diffs = [
        abs(x - y)
        for ca, cb in zip(a.logprobs, b.logprobs, strict=True)
        for x, y in zip(ca, cb, strict=True)
    ]
    same = [
        x == y for ta, tb in zip(a.top1, b.top1, strict=True) for x, y in zip(ta, tb, strict=True)
    ]
    return {
        "max_abs_dlogprob": max(diffs),
        "tokens_over_1e-3": sum(d > tol for d in diffs),
        "top1_agree": sum(same) / len(same),
    }
