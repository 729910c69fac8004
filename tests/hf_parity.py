"""Served logprobs vs HF transformers (fp32, CPU) on the same weights: the check shared by the
server tests of every checkpoint format and config spelling."""

import torch

__all__ = ["assert_served_equals_hf", "seeded_prompt"]


def seeded_prompt(n: int, seed: int, vocab: int = 1024) -> list[int]:
    return torch.randint(2, vocab, (n,), generator=torch.Generator().manual_seed(seed + n)).tolist()


def assert_served_equals_hf(hf_model, prompts: dict[int, list[int]], outs: dict, tol=1e-3):
    """``outs[n]``: the server's ``/generate`` answer (greedy, ``return_logprob``,
    ``logprob_start_len`` 0) to ``prompts[n]``. Greedy tokens must be HF's argmax and every
    prompt and output logprob within ``tol`` of HF's."""
    for n, out in outs.items():
        ids, tokens = prompts[n], out["output_ids"]
        with torch.no_grad():
            logits = hf_model(input_ids=torch.tensor([ids + tokens]), use_cache=False).logits[0]
        ref = torch.log_softmax(logits.float(), dim=-1)  # [S, V]
        meta, decode = out["meta_info"], len(tokens)
        got = [lp for lp, _, _ in meta["input_token_logprobs"][1:]]
        got += [lp for lp, _, _ in meta["output_token_logprobs"]]
        want = [ref[i - 1, ids[i]].item() for i in range(1, len(ids))]
        want += [ref[len(ids) - 1 + j, tokens[j]].item() for j in range(decode)]
        greedy = ref[len(ids) - 1 : len(ids) - 1 + decode].argmax(-1).tolist()
        assert tokens == greedy, f"n={n}: served greedy tokens differ from HF's argmax"
        diff = max(abs(a - b) for a, b in zip(got, want, strict=True))
        print(f"n={n}: max |d logprob| served vs HF = {diff:.2e}")
        assert diff <= tol, f"n={n}: max |d logprob| = {diff:.2e}"
