"""DSV4 mixture of experts: hash or score routing, SwiGLU experts with a clamp, one shared expert.

* Scores ``s = sqrt(softplus(x Wg^T))`` (sqrtsoftplus; sigmoid/softmax also accepted), fp32.
* Selection: hash layers take ``tid2eid[token]`` [vocab, k]; other layers ``topk(s + bias)``
  (``noaux_tc``: the bias only chooses).
* Weights: the *unbiased* ``s`` of the chosen experts, normalized to sum 1, times
  ``routed_scaling_factor``.
* Expert: ``w2(silu(min(w1 x, L)) * clamp(w3 x, -L, L))`` with ``L = swiglu_limit``, on routed and
  shared experts alike. Output = sum of weighted routed experts + shared expert.

The routed part is a callable ``routed(x, chosen, weights, limit, dense) -> [T, d]``: here
:class:`DenseExperts` over per-expert weights (tensors, or quantized linears through
:func:`~sglang_dsv4.ref.linear.linear`); on the GPU the served model swaps in the grouped FP4
kernel (:meth:`sglang_dsv4.model.experts.FP4Experts.routed`).
"""

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from sglang_dsv4.ref.linear import Weight, linear

__all__ = [
    "DenseExperts",
    "moe",
    "route_hash",
    "route_scores",
    "route_topk",
    "route_weights",
    "swiglu",
]


def route_scores(
    x: torch.Tensor, gate: torch.Tensor, scoring_func: str = "sqrtsoftplus"
) -> torch.Tensor:
    """Router scores [T, E] (fp32) of ``x`` [T, d] with ``gate`` [E, d]."""
    logits = x.float() @ gate.float().T
    if scoring_func == "sqrtsoftplus":
        return F.softplus(logits).sqrt()
    if scoring_func == "sigmoid":
        return logits.sigmoid()
    if scoring_func == "softmax":
        return logits.softmax(dim=-1)
    raise ValueError(f"unknown scoring_func {scoring_func!r}")


def route_topk(scores: torch.Tensor, bias: torch.Tensor, k: int) -> torch.Tensor:
    """Expert ids [T, k] chosen by ``scores + bias`` (``bias`` [E])."""
    return torch.topk(scores + bias.float(), k, dim=-1, sorted=False).indices


def route_hash(token_ids: torch.Tensor, tid2eid: torch.Tensor) -> torch.Tensor:
    """Expert ids [T, k] of hash-routed tokens ``token_ids`` [T] (``tid2eid`` [vocab, k])."""
    return tid2eid[token_ids].long()


def route_weights(
    scores: torch.Tensor, experts: torch.Tensor, routed_scaling_factor: float
) -> torch.Tensor:
    """Weights [T, k] of the chosen ``experts`` [T, k]: normalized unbiased scores, scaled."""
    w = scores.gather(1, experts)
    return w / (w.sum(dim=-1, keepdim=True) + 1e-20) * routed_scaling_factor


def swiglu(x: torch.Tensor, w1: Weight, w2: Weight, w3: Weight, limit: float) -> torch.Tensor:
    """Clamped SwiGLU expert: ``x`` [T, d], ``w1``/``w3`` [I, d], ``w2`` [d, I] -> [T, d]."""
    gate = linear(x, w1).clamp(max=limit)
    up = linear(x, w3).clamp(min=-limit, max=limit)
    return linear(F.silu(gate) * up, w2)


class DenseExperts:
    """Routed experts as per-expert weights, indexable by expert id (stacked tensors, lists of
    tensors or of quantized linears): ``w1``/``w3`` [E, I, d], ``w2`` [E, d, I]."""

    def __init__(self, w1: Sequence[Weight], w2: Sequence[Weight], w3: Sequence[Weight]):
        self.w1, self.w2, self.w3 = w1, w2, w3

    def __call__(
        self,
        x: torch.Tensor,
        experts: torch.Tensor,
        weights: torch.Tensor,
        limit: float,
        dense: bool = False,
    ) -> torch.Tensor:
        """``x`` [T, d]; chosen ``experts`` / ``weights`` [T, k] -> weighted sum [T, d].

        ``dense`` runs every expert on every token, weighted by the token's routing weight for
        it (0 if not chosen): no data-dependent control flow (CUDA-graph safe), E/k times the
        routed FLOPs; meant for small decode batches of small models."""
        w1, w2, w3 = self.w1, self.w2, self.w3
        out = torch.zeros_like(x)
        if dense:
            for e in range(len(w1)):
                gate = (weights * (experts == e)).sum(dim=-1, keepdim=True)  # [T, 1]
                out = out + (swiglu(x, w1[e], w2[e], w3[e], limit) * gate).to(x.dtype)
        else:
            for e in experts.unique().tolist():
                tok, slot = (experts == e).nonzero(as_tuple=True)
                y = swiglu(x[tok], w1[e], w2[e], w3[e], limit)
                out.index_add_(0, tok, (y * weights[tok, slot, None]).to(x.dtype))
        return out


def moe(
    x: torch.Tensor,
    experts: torch.Tensor,
    weights: torch.Tensor,
    w1: Sequence[Weight],
    w2: Sequence[Weight],
    w3: Sequence[Weight],
    shared: tuple[Weight, Weight, Weight] | None,
    limit: float,
    dense: bool = False,
) -> torch.Tensor:
    """The MoE block over :class:`DenseExperts` ``(w1, w2, w3)`` plus the ``shared`` expert
    (w1, w2, w3) -> [T, d]; arguments as in :meth:`DenseExperts.__call__`."""
    out = DenseExperts(w1, w2, w3)(x, experts, weights, limit, dense)
    if shared is not None:
        out = out + swiglu(x, *shared, limit)
    return out
