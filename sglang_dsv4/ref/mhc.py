"""Manifold-constrained hyper-connections (mHC): ``hc`` residual streams per token.

Before each attention / MoE block, ``hc_pre`` mixes the flattened streams ``x`` [T, hc, d]
(unweighted RMS over all ``hc*d`` values, then ``fn`` [(2+hc)*hc, hc*d]) into three maps:

* ``pre``  [T, hc]     = sigmoid(mix * scale0 + base) + hc_eps  -> block input ``sum_j pre_j x_j``
* ``post`` [T, hc]     = 2 * sigmoid(mix * scale1 + base)        -> where the block output goes
* ``comb`` [T, hc, hc] = Sinkhorn(softmax_rows(mix * scale2 + base) + hc_eps), ``[j, k]``

``hc_post`` then forms ``x'_k = post_k * y + sum_j comb[j, k] x_j``: the sum runs over the
*first* index (``comb^T @ x``); the matrix is not symmetric, so the direction matters.
``hc_head`` collapses the streams once more before the final norm (``pre`` only, no Sinkhorn).
"""

import torch

from sglang_dsv4.ref.norm import rms_norm

__all__ = ["hc_head", "hc_post", "hc_pre", "sinkhorn"]


def sinkhorn(comb: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """Approximately doubly-stochastic ``comb`` [..., hc, hc]: columns first, then
    ``iters - 1`` rounds of rows then columns, each divided by (sum + eps)."""
    comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        comb = comb / (comb.sum(dim=-1, keepdim=True) + eps)
        comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
    return comb


def hc_pre(
    x: torch.Tensor,
    fn: torch.Tensor,
    base: torch.Tensor,
    scale: torch.Tensor,
    sinkhorn_iters: int,
    hc_eps: float,
    norm_eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``x`` [T, hc, d] -> (block input [T, d], post [T, hc], comb [T, hc, hc]); maps in fp32."""
    hc = x.shape[1]
    mix = rms_norm(x.flatten(1).float(), None, norm_eps) @ fn.float().T  # [T, (2+hc)*hc]
    m_pre, m_post, m_comb = mix.split([hc, hc, hc * hc], dim=-1)
    b_pre, b_post, b_comb = base.float().split([hc, hc, hc * hc])
    pre = torch.sigmoid(m_pre * scale[0] + b_pre) + hc_eps
    post = 2 * torch.sigmoid(m_post * scale[1] + b_post)
    comb_logits = m_comb.view(-1, hc, hc) * scale[2] + b_comb.view(hc, hc)
    comb = sinkhorn(torch.softmax(comb_logits, dim=-1) + hc_eps, sinkhorn_iters, hc_eps)
    collapsed = (pre.unsqueeze(-1) * x).sum(dim=1).to(x.dtype)
    return collapsed, post, comb


def hc_post(
    y: torch.Tensor, x: torch.Tensor, post: torch.Tensor, comb: torch.Tensor
) -> torch.Tensor:
    """Block output ``y`` [T, d] and streams ``x`` [T, hc, d] -> new streams [T, hc, d]."""
    dtype = x.dtype
    return post.to(dtype).unsqueeze(-1) * y.unsqueeze(1) + comb.to(dtype).transpose(-1, -2) @ x


def hc_head(
    x: torch.Tensor,
    fn: torch.Tensor,
    base: torch.Tensor,
    scale: torch.Tensor,
    hc_eps: float,
    norm_eps: float,
) -> torch.Tensor:
    """Final collapse of ``x`` [T, hc, d] -> [T, d] with ``fn`` [hc, hc*d], ``base`` [hc],
    ``scale`` [1]."""
    mix = rms_norm(x.flatten(1).float(), None, norm_eps) @ fn.float().T  # [T, hc]
    pre = torch.sigmoid(mix * scale.float() + base.float()) + hc_eps
    return (pre.unsqueeze(-1) * x).sum(dim=1).to(x.dtype)
