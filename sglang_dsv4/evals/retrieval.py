"""Long-context retrieval: one fact planted at a random depth of held-out text, asked at the end.

A prompt of ``length`` tokens is held-out text with the line ``The secret word of KEY is VALUE.``
inserted at a random line break at relative depth 0.1-0.9, followed by ``The secret word of KEY
is``; greedy decoding must produce `` VALUE``. KEY comes from the key list the tiny model was
trained with, VALUE from the eval half of the value words (never a training value), so a correct
answer needs copying from thousands of tokens back: through c4 entries picked by the indexer or
c128 entries, beyond the 128-token window. Chance level is ``1 / len(values)``.
"""

from __future__ import annotations

import numpy as np

from sglang_dsv4.evals.perplexity import TEXT
from sglang_dsv4.progress import track
from sglang_dsv4.train.data import FACT_KEYS, newline_ids, plant_facts, retrieval_words

__all__ = ["build_prompts", "run_retrieval"]


def build_prompts(tokenizer, length: int, n: int, seed: int) -> list[dict]:
    """``n`` prompts of exactly ``length`` tokens (question included) with their answers."""

    def encode(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False)

    text_ids = np.asarray(encode(TEXT.read_text()))
    _, values = retrieval_words(tokenizer)
    breaks = newline_ids(tokenizer.get_vocab())
    rng = np.random.default_rng(seed + length)
    prompts = []
    for _ in range(n):
        key, value = str(rng.choice(FACT_KEYS)), str(rng.choice(values))
        depth = float(rng.uniform(0.1, 0.9))
        # size the haystack so that fact + question land the prompt on ``length`` tokens
        probe, _ = plant_facts(np.zeros(0, np.int64), [(key, value)], [0.0], [key], encode, breaks)
        extra = len(probe) - len(encode(" " + value + "."))
        if len(text_ids) < length:
            raise ValueError(f"held-out text has {len(text_ids)} tokens, fewer than {length}")
        start = int(rng.integers(0, len(text_ids) - length + extra + 1))
        haystack = text_ids[start : start + length - extra]
        ids, answer_at = plant_facts(haystack, [(key, value)], [depth], [key], encode, breaks)
        prompt = ids[: answer_at[0] + 1]
        prompts.append(
            {
                "ids": prompt,
                "answer": encode(" " + value),
                "key": key,
                "value": value,
                "depth": depth,
                "chance": 1 / len(values),
            }
        )
    return prompts


def run_retrieval(server, tokenizer, lengths: list[int], n: int, seed: int = 0) -> dict:
    """Accuracy per length (greedy answer tokens equal to the planted value's)."""
    per_length = {}
    for length in lengths:
        rows = []
        for p in track(build_prompts(tokenizer, length, n, seed), f"retrieval {length}", "prompt"):
            out = server.generate(p["ids"], len(p["answer"]))
            got = out["output_ids"][: len(p["answer"])]
            rows.append(
                {
                    "tokens": len(p["ids"]),
                    "depth": round(p["depth"], 3),
                    "value": p["value"],
                    "output": tokenizer.decode(got),
                    "correct": got == p["answer"],
                }
            )
        per_length[length] = {
            "accuracy": sum(r["correct"] for r in rows) / len(rows),
            "n": len(rows),
            "samples": rows,
        }
    chance = 1 / len(retrieval_words(tokenizer)[1])
    return {"per_length": per_length, "chance": chance}
