"""The exact top-k contract of the indexer's selects as a torch oracle, and a runner of
``IndexerExtend``'s select alone over given score rows (``tests/kernels/test_indexer.py``,
``test_topk_rows.py``)."""

import torch

__all__ = ["RATIO", "exact_topk", "extend_select"]

RATIO, EPB = 4, 32


def exact_topk(scores: torch.Tensor, vis: int, k: int) -> list[int]:
    """The select's contract: the ``k`` largest of ``scores[:vis]`` by the order of their int32
    image (NaNs included, -0.0 below +0.0), ties by entry, listed in entry order."""
    u = scores[:vis].contiguous().view(torch.int32)
    key = torch.where(u < 0, u ^ 0x7FFFFFFF, u)
    order = torch.sort(key.long(), descending=True, stable=True).indices
    return sorted(order[:k].tolist())


def extend_select(ie_mod, select, scores: torch.Tensor, visible: list[int], topk: int):
    """``ie_mod.IndexerExtend(select=select)``'s select (``ie_mod``: ``kernels.indexer_extend``,
    or its interpreted reload) over ``scores`` [n, ld] (query ``t`` sees
    ``visible[t]`` entries; the workspace past them NaN, never a pick), outputs poisoned first;
    checked against :func:`exact_topk` (ids in order, rows, -1 past the picks, counts). Returns
    ``(ids, rows, lengths)`` and the plan's ``select_shape``; the block table is the same for
    the same query count."""
    device = scores.device
    n_q, ld = scores.shape
    # one workspace chunk for all the rows (the default workspace splits 8192 x 16384 scores)
    ix = ie_mod.IndexerExtend(
        topk, 16, select=select, max_workspace_bytes=max(n_q * ld * 4, 1 << 20)
    )
    ix.plan([n_q], [ld * RATIO], device)
    pos = torch.tensor([max(v * RATIO - 1, 0) for v in visible], dtype=torch.int32, device=device)
    qreq = torch.arange(n_q, dtype=torch.int32, device=device).flip(0)
    gen = torch.Generator().manual_seed(n_q)
    bt = torch.randperm(n_q * 1024, generator=gen)[: n_q * 512].view(n_q, 512).int().to(device)
    ix.logits.fill_(float("nan"))
    ix.logits[:n_q, :ld].copy_(scores)
    vis_t = torch.tensor(visible, device=device)
    ix.logits[:n_q, :ld].masked_fill_(torch.arange(ld, device=device) >= vis_t[:, None], torch.nan)
    for buf in (ix.ids, ix.rows, ix.lengths):
        buf.random_(-(2**20), 2**20)
    ix._select(bt, qreq, pos, 0, n_q)
    out = (ix.ids.clone(), ix.rows.clone(), ix.lengths.clone())
    check = range(n_q) if n_q <= 64 else [*range(0, n_q, n_q // 23), n_q - 1]
    for t in check:
        v = visible[t]
        k = min(topk, v)
        want = exact_topk(scores[t].cpu(), v, k)
        assert int(out[2][t]) == k
        assert out[0][t, :k].tolist() == want and (out[0][t, k:] == -1).all()
        sel = torch.tensor(want, dtype=torch.long, device=device)
        want_rows = bt[int(qreq[t]), sel // EPB].long() * EPB + sel % EPB
        assert out[1][t, :k].long().tolist() == want_rows.tolist()
        assert (out[1][t, k:] == -1).all()
    return out, ix.select_shape
