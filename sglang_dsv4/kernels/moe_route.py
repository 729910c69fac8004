"""MoE routing in one kernel (two when the experts do not fit one tile): gate GEMM, scoring,
expert choice and weights.

For a block of tokens: ``logits = x @ gate.T`` (fp32 accumulation), scores ``s`` = sqrtsoftplus /
sigmoid / softmax of the logits, chosen experts = top-k of ``s + bias`` (``noaux_tc``: the bias
only chooses; ties go to the lower expert id) or, on hash layers, ``tid2eid[token]``; weights =
the chosen *unbiased* scores normalized to sum 1, times ``routed_scaling_factor``. Outputs:
``chosen`` int32 [T, k] and ``weights`` fp32 [T, k]. No host sync, no shape from data (CUDA-graph
safe). Expert ids are clamped into [0, E) so that a NaN row cannot send the expert kernels out of
bounds.

With up to ``_FUSED_MAX_E`` experts one program holds a token block's whole logit row and does
everything; above that (the real Flash has 256) a first kernel spreads the gate GEMM over expert
tiles (one program reading the whole 2 MB gate would be latency-bound at decode) and a second one
selects. Twin: :func:`sglang_dsv4.ref.moe.route_scores`, ``route_topk`` / ``route_hash``,
``route_weights``.
"""

import torch
import triton
import triton.language as tl

__all__ = ["SCORING", "moe_route"]

SCORING = {"sqrtsoftplus": 0, "sigmoid": 1, "softmax": 2}
_FUSED_MAX_E = 64
_BLOCK_T = 16  # tl.dot's smallest M


@triton.jit
def _logits_tile(x_ptr, g_ptr, offs_t, t_ok, offs_e, e_ok, D, stride_xt, stride_ge,
                 BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr,
                 FP32: tl.constexpr):  # fmt: skip
    """``x[offs_t] @ gate[offs_e].T`` [BLOCK_T, BLOCK_E] in fp32."""
    offs_d = tl.arange(0, BLOCK_D)
    acc = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d_ok = (d0 + offs_d) < D
        x = tl.load(
            x_ptr + offs_t[:, None] * stride_xt + (d0 + offs_d)[None, :],
            mask=t_ok[:, None] & d_ok[None, :],
            other=0.0,
        )
        g = tl.load(
            g_ptr + offs_e[:, None] * stride_ge + (d0 + offs_d)[None, :],
            mask=e_ok[:, None] & d_ok[None, :],
            other=0.0,
        )
        if FP32:  # the reference's fp32 product (inputs of mixed or fp32 dtype)
            acc += tl.dot(x.to(tl.float32), tl.trans(g.to(tl.float32)), input_precision="ieee")
        else:  # bf16 x bf16 products are exact in the fp32 accumulator
            acc += tl.dot(x, tl.trans(g))
    return acc


@triton.jit
def _log1p(e):
    """log(1 + e) accurate for small e (log1p is not in every Triton backend)."""
    u = 1.0 + e
    return tl.where(u == 1.0, e, tl.log(u) * e / (u - 1.0))


@triton.jit
def _scores(logits, e_ok, SCORING: tl.constexpr):
    """Router scores of fp32 logits [BT, BE]; 0 on padding experts."""
    if SCORING == 0:  # sqrt(softplus), softplus as torch's (threshold 20)
        sp = tl.maximum(logits, 0.0) + _log1p(tl.exp(-tl.abs(logits)))
        s = tl.sqrt(tl.where(logits > 20.0, logits, sp))
    elif SCORING == 1:
        s = tl.sigmoid(logits)
    else:
        m = tl.max(tl.where(e_ok[None, :], logits, float("-inf")), axis=1)
        p = tl.where(e_ok[None, :], tl.exp(logits - m[:, None]), 0.0)
        s = p / tl.sum(p, axis=1)[:, None]
    return tl.where(e_ok[None, :], s, 0.0)


@triton.jit
def _select(logits, offs_t, t_ok, offs_e, E, bias_ptr, tid2eid_ptr, ids_ptr, chosen_ptr,
            weights_ptr, stride_tid, rsf, TOPK: tl.constexpr, BLOCK_K: tl.constexpr,
            SCORING: tl.constexpr, HASH: tl.constexpr):  # fmt: skip
    """Chosen experts and their normalized weights of a token block; stores [BT, TOPK]."""
    e_ok = offs_e < E
    s = _scores(logits, e_ok, SCORING)  # [BT, BE]
    offs_k = tl.arange(0, BLOCK_K)
    ids_k = tl.zeros((logits.shape[0], BLOCK_K), dtype=tl.int32)
    w_k = tl.zeros((logits.shape[0], BLOCK_K), dtype=tl.float32)
    if HASH:
        tok = tl.load(ids_ptr + offs_t, mask=t_ok, other=0).to(tl.int64)
        ids_k = tl.load(
            tid2eid_ptr + tok[:, None] * stride_tid + offs_k[None, :],
            mask=t_ok[:, None] & (offs_k < TOPK)[None, :],
            other=0,
        ).to(tl.int32)
        ids_k = tl.minimum(tl.maximum(ids_k, 0), E - 1)
        for j in tl.static_range(TOPK):
            e_j = tl.sum(tl.where(offs_k[None, :] == j, ids_k, 0), axis=1)  # [BT]
            s_j = tl.sum(tl.where(offs_e[None, :] == e_j[:, None], s, 0.0), axis=1)
            w_k = tl.where(offs_k[None, :] == j, s_j[:, None], w_k)
    else:
        bias = tl.load(bias_ptr + offs_e, mask=e_ok, other=0.0).to(tl.float32)
        b = tl.where(e_ok[None, :], s + bias[None, :], float("-inf"))
        for j in tl.static_range(TOPK):
            m = tl.max(b, axis=1)
            e_j = tl.min(tl.where(b == m[:, None], offs_e[None, :], E), axis=1)
            e_j = tl.minimum(e_j, E - 1)  # a NaN row matches nothing
            hit = offs_e[None, :] == e_j[:, None]
            s_j = tl.sum(tl.where(hit, s, 0.0), axis=1)
            b = tl.where(hit, float("-inf"), b)
            ids_k = tl.where(offs_k[None, :] == j, e_j[:, None], ids_k)
            w_k = tl.where(offs_k[None, :] == j, s_j[:, None], w_k)
    w_k = w_k / (tl.sum(w_k, axis=1)[:, None] + 1e-20) * rsf
    out = offs_t[:, None] * TOPK + offs_k[None, :]
    ok = t_ok[:, None] & (offs_k < TOPK)[None, :]
    tl.store(chosen_ptr + out, ids_k, mask=ok)
    tl.store(weights_ptr + out, w_k, mask=ok)


@triton.jit
def _route_fused_kernel(x_ptr, g_ptr, bias_ptr, tid2eid_ptr, ids_ptr, chosen_ptr, weights_ptr,
                        T, D, E, stride_xt, stride_ge, stride_tid, rsf, TOPK: tl.constexpr,
                        BLOCK_K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
                        BLOCK_D: tl.constexpr, SCORING: tl.constexpr, HASH: tl.constexpr,
                        FP32: tl.constexpr):  # fmt: skip
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = offs_t < T
    offs_e = tl.arange(0, BLOCK_E)
    logits = _logits_tile(
        x_ptr, g_ptr, offs_t, t_ok, offs_e, offs_e < E, D, stride_xt, stride_ge,
        BLOCK_T, BLOCK_E, BLOCK_D, FP32,
    )  # fmt: skip
    _select(
        logits, offs_t, t_ok, offs_e, E, bias_ptr, tid2eid_ptr, ids_ptr, chosen_ptr, weights_ptr,
        stride_tid, rsf, TOPK, BLOCK_K, SCORING, HASH,
    )  # fmt: skip


@triton.jit
def _logits_kernel(x_ptr, g_ptr, out_ptr, T, D, E, stride_xt, stride_ge, BLOCK_T: tl.constexpr,
                   BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr, FP32: tl.constexpr):  # fmt: skip
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_e = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    t_ok, e_ok = offs_t < T, offs_e < E
    logits = _logits_tile(
        x_ptr, g_ptr, offs_t, t_ok, offs_e, e_ok, D, stride_xt, stride_ge,
        BLOCK_T, BLOCK_E, BLOCK_D, FP32,
    )  # fmt: skip
    ok = t_ok[:, None] & e_ok[None, :]
    tl.store(out_ptr + offs_t[:, None] * E + offs_e[None, :], logits, mask=ok)


@triton.jit
def _select_kernel(logits_ptr, bias_ptr, tid2eid_ptr, ids_ptr, chosen_ptr, weights_ptr, T, E,
                   stride_tid, rsf, TOPK: tl.constexpr, BLOCK_K: tl.constexpr,
                   BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, SCORING: tl.constexpr,
                   HASH: tl.constexpr):  # fmt: skip
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_e = tl.arange(0, BLOCK_E)
    t_ok = offs_t < T
    logits = tl.load(
        logits_ptr + offs_t[:, None] * E + offs_e[None, :],
        mask=t_ok[:, None] & (offs_e < E)[None, :],
        other=0.0,
    )
    _select(
        logits, offs_t, t_ok, offs_e, E, bias_ptr, tid2eid_ptr, ids_ptr, chosen_ptr, weights_ptr,
        stride_tid, rsf, TOPK, BLOCK_K, SCORING, HASH,
    )  # fmt: skip


def moe_route(
    x: torch.Tensor,
    gate: torch.Tensor,
    bias: torch.Tensor | None,
    tid2eid: torch.Tensor | None,
    ids: torch.Tensor | None,
    topk: int,
    routed_scaling_factor: float,
    scoring_func: str = "sqrtsoftplus",
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` [T, d], ``gate`` [E, d]; ``bias`` [E] (scored layers) or ``tid2eid`` [vocab, k] and
    token ``ids`` [T] (hash layers) -> (chosen int32 [T, k], weights fp32 [T, k]), written into
    ``out`` when given (contiguous, those dtypes)."""
    if scoring_func not in SCORING:
        raise ValueError(f"unknown scoring_func {scoring_func!r}")
    hashed = tid2eid is not None
    if hashed == (bias is not None) or (hashed and ids is None):
        raise ValueError("pass either bias (scored layer) or tid2eid and ids (hash layer)")
    t, d = x.shape
    n_exp = gate.shape[0]
    if gate.shape[1] != d or (hashed and tid2eid.shape[1] != topk) or topk > n_exp:
        raise ValueError(f"x {tuple(x.shape)}, gate {tuple(gate.shape)}, top-k {topk}")
    x, gate = x.contiguous(), gate.contiguous()
    if out is None:
        out = (
            torch.empty(t, topk, dtype=torch.int32, device=x.device),
            torch.empty(t, topk, dtype=torch.float32, device=x.device),
        )
    chosen, weights = out
    if t == 0:
        return chosen, weights
    dummy = chosen  # stands in for the pointers a layer kind does not use
    tid2eid_ = tid2eid if hashed else dummy
    common = dict(
        bias_ptr=bias if bias is not None else dummy,
        tid2eid_ptr=tid2eid_,
        ids_ptr=ids if hashed else dummy,
        chosen_ptr=chosen,
        weights_ptr=weights,
        stride_tid=tid2eid_.stride(0),
        rsf=float(routed_scaling_factor),
        TOPK=topk,
        BLOCK_K=triton.next_power_of_2(topk),
        BLOCK_T=_BLOCK_T,
        SCORING=SCORING[scoring_func],
        HASH=hashed,
    )
    fp32 = not (x.dtype == gate.dtype and x.dtype in (torch.bfloat16, torch.float16))
    block_e = max(16, triton.next_power_of_2(n_exp))
    grid_t = triton.cdiv(t, _BLOCK_T)
    if n_exp <= _FUSED_MAX_E:
        _route_fused_kernel[(grid_t,)](
            x_ptr=x, g_ptr=gate, T=t, D=d, E=n_exp, stride_xt=x.stride(0),
            stride_ge=gate.stride(0), BLOCK_E=block_e, BLOCK_D=64, FP32=fp32, **common,
        )  # fmt: skip
        return chosen, weights
    logits = torch.empty(t, n_exp, dtype=torch.float32, device=x.device)
    _logits_kernel[(grid_t, triton.cdiv(n_exp, 32))](
        x_ptr=x, g_ptr=gate, out_ptr=logits, T=t, D=d, E=n_exp, stride_xt=x.stride(0),
        stride_ge=gate.stride(0), BLOCK_T=_BLOCK_T, BLOCK_E=32, BLOCK_D=128, FP32=fp32,
    )  # fmt: skip
    _select_kernel[(grid_t,)](logits_ptr=logits, T=t, E=n_exp, BLOCK_E=block_e, **common)
    return chosen, weights
