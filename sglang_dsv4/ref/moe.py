"""DSV4 mixture of experts: hash or score routing, SwiGLU experts with a clamp, one shared expert.

* Scores ``s = sqrt(softplus(x Wg^T))`` (sqrtsoftplus; sigmoid/softmax also accepted), fp32.
* Selection: hash layers take ``tid2eid[token]`` [vocab, k]; other layers ``topk(s + bias)``
  (``noaux_tc``: the bias only chooses).
* Weights: the *unbiased* ``s`` of the chosen experts, normalized to sum 1, times
  ``routed_scaling_factor``.
* Expert: ``w2(silu(min(w1 x, L)) * clamp(w3 x, -L, L))`` with ``L = swiglu_limit``, on routed and
  shared experts alike. Output = sum of weighted routed experts + shared expert.
"""

import torch
import torch.nn.functional as F

__all__ = [
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


def swiglu(
    x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor, limit: float
) -> torch.Tensor:
    """Clamped SwiGLU expert: ``x`` [T, d], ``w1``/``w3`` [I, d], ``w2`` [d, I] -> [T, d]."""
    gate = (x @ w1.T).clamp(max=limit)
    up = (x @ w3.T).clamp(min=-limit, max=limit)
    return (F.silu(gate) * up) @ w2.T


def moe(
    x: torch.Tensor,
    experts: torch.Tensor,
    weights: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    w3: torch.Tensor,
    shared: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
    limit: float,
    dense: bool = False,
) -> torch.Tensor:
    """``x`` [T, d]; chosen ``experts`` / ``weights`` [T, k]; expert weights indexable by expert id
    (stacked tensors or lists): ``w1``/``w3``
    [E, I, d], ``w2`` [E, d, I]; ``shared`` = (w1, w2, w3) of the shared expert -> [T, d].

    ``dense`` runs every expert on every token, weighted by the token's routing weight for it
    (0 if not chosen): no data-dependent control flow (CUDA-graph safe), E/k times the routed
    FLOPs; meant for small decode batches of small models."""
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
    if shared is not None:
        out = out + swiglu(x, *shared, limit)
    return out
