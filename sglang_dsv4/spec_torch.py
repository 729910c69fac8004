"""Torch twins of SGLang 0.5.17's speculative tree kernels for a top-k 1 draft (a chain), used
where SGLang has none: a CPU-only machine without SGLang's CPU kernel build (the plugin hooks
them in, :mod:`sglang_dsv4.plugin`). With top-k 1 the "tree" of ``n = steps + 1`` verify
tokens per request (the bonus token then the draft chain) is a chain: token ``i`` sits at
position ``seq_len + i`` and follows token ``i - 1``.
"""

import torch

__all__ = ["build_chain", "verify_chain_greedy"]


def build_chain(bonus_tokens, draft_tokens, seq_lens, n: int, full_mask: bool):
    """``build_tree_kernel_efficient`` for a chain: (tree_mask, positions [B*n], retrieve_index,
    retrieve_next_token, retrieve_next_sibling [B, n], draft tokens [B*n]). ``full_mask``:
    SGLang's FULL_MASK layout (per request ``n`` rows of ``seq_len + n`` columns: the prefix,
    then the causal chain), else QLEN_ONLY (``n x n`` per request)."""
    bs, device = seq_lens.numel(), seq_lens.device
    tokens = torch.cat([bonus_tokens.unsqueeze(1), draft_tokens], dim=1).flatten()
    i = torch.arange(n, device=device)
    positions = (seq_lens.long().unsqueeze(1) + i).flatten()  # [B*n]
    retrieve_index = (torch.arange(bs, device=device).unsqueeze(1) * n + i).long()
    next_token = torch.where(i + 1 < n, i + 1, -1).long().expand(bs, n).contiguous()
    sibling = torch.full((bs, n), -1, dtype=torch.long, device=device)
    causal = (i.unsqueeze(0) <= i.unsqueeze(1)).flatten()  # [n*n]: row r sees columns <= r
    if not full_mask:
        return causal.repeat(bs), positions, retrieve_index, next_token, sibling, tokens
    rows = []
    for s in seq_lens.tolist():
        tree = (i.unsqueeze(0) <= i.unsqueeze(1)).view(n, n)
        rows.append(torch.cat([torch.ones(n, int(s), dtype=torch.bool, device=device), tree], 1))
    mask = torch.cat([r.flatten() for r in rows])
    return mask, positions, retrieve_index, next_token, sibling, tokens


def verify_chain_greedy(predicts, accept_index, accept_token_num, candidates, target_predict):
    """``verify_tree_greedy_func`` for a chain (in place, as SGLang's kernels): request ``b``
    keeps draft ``j`` while every draft up to it equals the target's greedy token after the
    previous one; ``accept_index[b, :k+1]`` = the kept tokens' flat ids (bonus first),
    ``accept_token_num[b]`` = ``k`` kept drafts, ``predicts`` at each kept token = the
    target's token after it."""
    bs, n = candidates.shape
    match = candidates[:, 1:] == target_predict[:, :-1]  # [B, n-1]: draft j+1 is right
    kept = match.int().cumprod(dim=1).sum(dim=1)  # [B] leading run of matches
    base = torch.arange(bs, device=candidates.device) * n
    flat_target = target_predict.flatten()
    for b in range(bs):
        k = int(kept[b])
        ids = base[b] + torch.arange(k + 1, device=candidates.device)
        accept_index[b, : k + 1] = ids.to(accept_index.dtype)
        predicts[ids] = flat_target[ids].to(predicts.dtype)
    accept_token_num.copy_(kept.to(accept_token_num.dtype))
    return predicts, accept_index, accept_token_num
