"""Served model vs the reference forward of the same checkpoint, prompt by prompt.

For each prompt (seeded random token ids) the server decodes ``decode`` greedy tokens with
logprobs of every prompt and output position and its top-20 alternatives; ``RefDSV4`` (fp32,
any device) scores prompt + output in one pass. Per prompt:

* ``greedy_agreement``: share of the served tokens that are the reference's argmax after the
  same prefix (1.0 = identical greedy continuation);
* ``kl_top20_mean`` / ``max``: KL(served || reference) restricted to the served top-20 tokens of
  each position, ``sum p_s (log p_s - log p_r)`` (the gate for bf16 / FP8 servers);
* ``max_abs_dlogprob`` / ``mean``: |served - reference| logprob of the actual next tokens.
"""

import torch

from sglang_dsv4.ref.model import RefDSV4

__all__ = ["compare_with_reference"]


def compare_with_reference(
    server, ref: RefDSV4, prompt_lens, decode: int, device: str, vocab_hi: int | None = None
) -> list[dict]:
    """``server``: a :class:`sglang_dsv4.server_process.Server`. Rows as in the module doc,
    plus the served ``tokens`` and ``logprobs`` (prompt positions 1.., then outputs)."""
    hi = vocab_hi or ref.cfg.vocab_size
    rows = []
    for n in prompt_lens:
        ids = torch.randint(2, hi, (n,), generator=torch.Generator().manual_seed(n)).tolist()
        out = server.generate(ids, decode, top_logprobs_num=20)
        meta, tokens = out["meta_info"], out["output_ids"]
        seq = torch.tensor(ids + tokens, device=device)
        with torch.no_grad():
            want = torch.log_softmax(ref(seq).float(), -1)  # [S, V]
        kl = []
        tops = meta["input_top_logprobs"][1:] + meta["output_top_logprobs"]
        for pos, top in enumerate(tops, start=1):  # position pos predicts token pos
            if not top:
                continue
            lp_s = torch.tensor([lp for lp, _, _ in top], device=device)
            lp_r = want[pos - 1, torch.tensor([t for _, t, _ in top], device=device)]
            kl.append(float((lp_s.exp() * (lp_s - lp_r)).sum()))
        served = [lp for lp, _, _ in meta["input_token_logprobs"][1:]]
        served += [lp for lp, _, _ in meta["output_token_logprobs"]]
        ref_lp = want[:-1].gather(1, seq[1:, None])[:, 0][: len(served)].cpu()
        dlp = (torch.tensor(served) - ref_lp).abs()
        greedy = want[n - 1 : n - 1 + decode].argmax(-1).cpu().tolist()
        rows.append(
            {
                "prompt": n,
                "tokens": tokens,
                "logprobs": served,
                "greedy_agreement": sum(a == b for a, b in zip(greedy, tokens, strict=True))
                / decode,
                "kl_top20_mean": sum(kl) / len(kl),
                "kl_top20_max": max(kl),
                "max_abs_dlogprob": float(dlp.max()),
                "mean_abs_dlogprob": float(dlp.mean()),
            }
        )
    return rows
