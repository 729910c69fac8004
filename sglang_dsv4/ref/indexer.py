"""Lightning indexer of c4 layers: score compressed indexer keys per query and keep the top-k.

``I[t, s] = sum_h w[t, h] * H^-1/2 * ReLU(q[t, h] . K[s]) * Dh^-1/2`` (eq. 16), where ``q`` is
``wq_b(qr)`` with RoPE at ``t``, ``K`` the indexer compressor's entries and ``w`` the
``weights_proj`` of the normed attention input (weights may be negative). Only entries with
``s < (t+1) // ratio`` are visible; picks that land on invisible entries become -1, so every row
holds its ``min(topk, visible)`` best entries and -1 elsewhere.
"""

import torch

from sglang_dsv4.ref.quant import fp8_e4m3_fake_quant, hadamard

__all__ = ["fp8_queries", "fp8_rotated_queries", "index_scores", "index_topk"]


def fp8_queries(q: torch.Tensor) -> torch.Tensor:
    """The queries an indexer over FP8 keys scores (``kernels.indexer_extend``, as SGLang's
    native ``fused_q_indexer_rope_hadamard_quant``): every (token, head) row of ``q`` [..., Dh]
    rounded to e4m3 with one power-of-2 scale ``2^ceil(log2(amax / 448))`` (round to nearest
    even), dequantized; same dtype. Native's scale is ``amax / 448`` itself; a power of 2 keeps
    the kernel's scaling exact (folded into the head weight). The model's QAT rounds indexer q
    to FP4 (e2m1, power-of-2 scales per 32): e4m3 is finer than what it was trained to see."""
    return fp8_e4m3_fake_quant(q, block=q.shape[-1])


def fp8_rotated_queries(q: torch.Tensor) -> torch.Tensor:
    """What the kernels score for ``q`` [T, H, Dh] against FP8 keys stored rotated
    (``hadamard(k)``), as a query of the unrotated keys (``LayerKV.read_index_keys``): ``q S``
    (+-1 Sylvester matrix, rounded to ``q``'s dtype as the rotation GEMM / the decode kernel's
    bf16 MMA input round it) through :func:`fp8_queries`, rotated back (``hadamard``) and times
    ``Dh^-1/2`` (the rotation's normalization, which the kernels move into the head weights)."""
    dh = q.shape[-1]
    sylv = (hadamard(torch.eye(dh, device=q.device)) * dh**0.5).round()  # +-1, exact
    rotated = (q.float() @ sylv).to(q.dtype)
    return hadamard(fp8_queries(rotated).float()) * dh**-0.5


def index_scores(q: torch.Tensor, weights: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Scores [T, E] (fp32) of queries ``q`` [T, H, Dh] with head ``weights`` [T, H] against
    indexer ``keys`` [E, Dh] (shared) or [T, E, Dh] (per query). ``weights`` is the raw
    ``weights_proj`` output."""
    n_heads, head_dim = q.shape[1], q.shape[2]
    pattern = "thd,ed->the" if keys.dim() == 2 else "thd,ted->the"
    s = torch.einsum(pattern, q.float(), keys.float())  # [T, H, E]
    s = torch.relu(s) * head_dim**-0.5
    return (s * (weights.float() * n_heads**-0.5).unsqueeze(-1)).sum(dim=1)


def index_topk(
    scores: torch.Tensor, positions: torch.Tensor, ratio: int, topk: int
) -> torch.Tensor:
    """Top-k entry indices [T, min(topk, E)] (int64, -1 = none) from ``scores`` [T, E] of queries
    at absolute ``positions`` [T], with causal visibility ``s < (t+1) // ratio``."""
    n_entries = scores.shape[1]
    k = min(topk, n_entries)
    visible = (positions + 1).div(ratio, rounding_mode="floor").unsqueeze(1)  # [T, 1]
    invisible = torch.arange(n_entries, device=scores.device).unsqueeze(0) >= visible
    picks = scores.masked_fill(invisible, float("-inf")).topk(k, dim=-1).indices
    return torch.where(picks >= visible, -1, picks)
