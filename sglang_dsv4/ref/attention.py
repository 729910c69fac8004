"""Attention of DSV4 layers: one softmax over a per-query key list, with a per-head sink.

Every layer kind reduces to the same sparse form: query ``t`` attends to a list of rows of one KV
buffer (K = V, one shared head): its ``swa_window`` rows (tokens ``t-127 .. t``) plus, on c4
layers, the indexer's top-k entries and, on c128 layers, all visible entries. ``-1`` in a list is
an empty slot. The sink ``s_h`` adds ``exp(s_h)`` to the denominator only:

    o[t, h] = sum_i exp(l_i) v_i / (sum_i exp(l_i) + exp(sink_h)),  l_i = q[t, h] . k_i * scale

After attention the RoPE channels are rotated back by the query position (see ``rope``) and the
heads go through the grouped output projection.
"""

import torch

from sglang_dsv4.ref.linear import Weight, linear

__all__ = ["attend", "grouped_output_proj", "sparse_attention", "window_indices"]


def sparse_attention(
    q: torch.Tensor,
    kv: torch.Tensor,
    indices: torch.Tensor,
    sink: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """``q`` [T, H, D], ``kv`` [N, D], ``indices`` [T, K] int (rows of ``kv``, -1 = none),
    ``sink`` [H] -> ``o`` [T, H, D] in ``q.dtype`` (fp32 math)."""
    keys = kv[indices.clamp(min=0)]  # [T, K, D]
    return attend(q, keys, indices >= 0, sink, scale)


def attend(
    q: torch.Tensor, keys: torch.Tensor, valid: torch.Tensor, sink: torch.Tensor, scale: float
) -> torch.Tensor:
    """The same softmax over per-query gathered ``keys`` [T, K, D] with ``valid`` [T, K]."""
    keys = keys.float()
    logits = torch.einsum("thd,tkd->thk", q.float(), keys) * scale
    logits = logits.masked_fill(~valid.unsqueeze(1), float("-inf"))
    sink_logits = sink.float().view(1, -1, 1).expand(q.shape[0], -1, 1)
    both = torch.cat([logits, sink_logits], dim=-1)  # [T, H, K+1]
    probs = torch.softmax(both, dim=-1)[..., :-1]
    return torch.einsum("thk,tkd->thd", probs, keys).to(q.dtype)


def window_indices(
    positions: torch.Tensor, window: int, row_of_pos0: int | torch.Tensor = 0
) -> torch.Tensor:
    """[T, window] KV rows of the ``swa_window`` of queries at ``positions`` [T]: rows
    ``row_of_pos0 + j`` for ``j`` in ``t-window+1 .. t`` (-1 before position 0). ``row_of_pos0``
    (an int, or [T] for packed variable-length batches) is where each query's sequence keeps
    position 0 in a buffer that holds the sequence's raw tokens contiguously."""
    offsets = torch.arange(-window + 1, 1, device=positions.device)
    pos = positions.unsqueeze(1) + offsets  # [T, window]
    rows = torch.as_tensor(row_of_pos0, device=positions.device).reshape(-1, 1)
    return torch.where(pos >= 0, pos + rows, -1)


def grouped_output_proj(o: torch.Tensor, wo_a: torch.Tensor, wo_b: Weight) -> torch.Tensor:
    """``o`` [T, H, D] -> [T, hidden]. Heads split into ``G`` groups of ``H/G``; group ``g``
    projects its ``H/G * D`` channels with rows ``g*R:(g+1)*R`` of ``wo_a`` [G*R, H/G*D] to ``R``
    (``o_lora_rank``) dims; the ``G*R`` concatenation goes through ``wo_b`` [hidden, G*R] (a
    dense tensor or a quantized linear, :func:`~sglang_dsv4.ref.linear.linear`)."""
    n_tok, n_heads, head_dim = o.shape
    n_groups = n_heads * head_dim // wo_a.shape[1]
    x = o.reshape(n_tok, n_groups, -1)  # [T, G, H/G*D]
    w = wo_a.view(n_groups, -1, x.shape[-1])  # [G, R, H/G*D]
    y = torch.einsum("tgi,gri->tgr", x, w).reshape(n_tok, -1)  # [T, G*R]
    return linear(y, wo_b)
