"""MoE routing in one kernel: gate GEMM, scoring, expert choice and weights.

For a block of tokens: ``logits = x @ gate.T`` (fp32 accumulation), scores ``s`` = sqrtsoftplus /
sigmoid / softmax of the logits, chosen experts = top-k of ``s + bias`` (``noaux_tc``: the bias
only chooses; ties go to the lower expert id) or, on hash layers, ``tid2eid[token]``; weights =
the chosen *unbiased* scores normalized to sum 1, times ``routed_scaling_factor``. Outputs:
``chosen`` int32 [T, k] and ``weights`` fp32 [T, k]. No host sync, no shape from data (CUDA-graph
safe). Expert ids are clamped into [0, E) so that a NaN row cannot send the expert kernels out of
bounds.

The gate GEMM is a [T, d] x [d, E] reduction: at decode its cost is latency (one program reading
the 128 KB bf16 gate of 16 experts took ~23 us on the H100), so it is split over a grid of
(token tile, expert block, chunk of ``d``) programs writing fp32 partial logits to a workspace;
the last program of a tile to finish (an atomic ticket per tile, reset by that program, so
CUDA-graph replays need no memset) sums them and selects. Up to ``FMA_MAX_TOKENS`` tokens one
token per tile with elementwise FMAs (no wasted rows); above, 16-token tiles through ``tl.dot``
(the gate read once per 16 tokens). Twin: :func:`sglang_dsv4.ref.moe.route_scores`,
``route_topk`` / ``route_hash``, ``route_weights``.
"""

import torch
import triton
import triton.language as tl

__all__ = ["FMA_MAX_TOKENS", "MAX_TILES", "SCORING", "moe_route"]

SCORING = {"sqrtsoftplus": 0, "sigmoid": 1, "softmax": 2}
FMA_MAX_TOKENS = 8  # up to this many tokens: one token per tile (module docstring)
_TB = 16  # tokens per tile of the tl.dot form: tl.dot's smallest M
_BE_MAX = 64  # experts per program; more are spread over expert blocks of 32
_MAX_SPLIT_DOT = 32  # the dot form's epilogue reduces 16 tokens' partials: few splits
MAX_TILES = 1 << 16  # tickets per workspace: T <= MAX_TILES * 16 tokens per launch
FMA_WARPS = 4


@triton.jit
def _partial_logits(x_ptr, g_ptr, offs_t, t_ok, offs_e, e_ok, s_lo, s_hi, stride_xt, stride_ge,
                    D: tl.constexpr, TB: tl.constexpr, BE: tl.constexpr, BD: tl.constexpr,
                    DOT: tl.constexpr, FP32: tl.constexpr):  # fmt: skip
    """``x[offs_t] @ gate[offs_e].T`` over steps [s_lo, s_hi) of ``BD`` channels -> [TB, BE]
    fp32: elementwise FMAs reduced once at the end (one-token tiles) or ``tl.dot``."""
    offs_d = tl.arange(0, BD)
    t64 = offs_t.to(tl.int64)
    if DOT:
        acc = tl.zeros((TB, BE), dtype=tl.float32)
    else:
        acc3 = tl.zeros((TB, BE, BD), dtype=tl.float32)
    for step in range(s_lo, s_hi):
        d = step * BD + offs_d
        d_ok = d < D
        x_ok = t_ok[:, None] & d_ok[None, :]
        x = tl.load(x_ptr + t64[:, None] * stride_xt + d[None, :], mask=x_ok, other=0.0)
        g_ok = e_ok[:, None] & d_ok[None, :]
        g = tl.load(g_ptr + offs_e[:, None] * stride_ge + d[None, :], mask=g_ok, other=0.0)
        if DOT and FP32:  # the reference's fp32 product (inputs of mixed or fp32 dtype)
            acc += tl.dot(x.to(tl.float32), tl.trans(g.to(tl.float32)), input_precision="ieee")
        elif DOT:  # bf16 x bf16 products are exact in the fp32 accumulator
            acc += tl.dot(x, tl.trans(g))
        else:
            acc3 += x.to(tl.float32)[:, None, :] * g.to(tl.float32)[None, :, :]
    if not DOT:
        acc = tl.sum(acc3, axis=2)
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


@triton.jit(do_not_specialize=["T", "n_split", "per_split"])
def _route_kernel(
    x_ptr, g_ptr, bias_ptr, tid2eid_ptr, ids_ptr, chosen_ptr, weights_ptr, part_ptr, ticket_ptr,
    T, E, n_split, per_split, stride_xt, stride_ge, stride_tid, rsf,
    D: tl.constexpr, TOPK: tl.constexpr, BLOCK_K: tl.constexpr, TB: tl.constexpr,
    BE: tl.constexpr, BEF: tl.constexpr, BD: tl.constexpr, SB: tl.constexpr,
    SCORING: tl.constexpr, HASH: tl.constexpr, FP32: tl.constexpr, DOT: tl.constexpr,
):  # fmt: skip
    tile, e_blk, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_t = tile * TB + tl.arange(0, TB)
    t_ok = offs_t < T
    offs_e = e_blk * BE + tl.arange(0, BE)
    e_ok = offs_e < E
    s_lo = split * per_split
    part = _partial_logits(
        x_ptr, g_ptr, offs_t, t_ok, offs_e, e_ok, s_lo, tl.minimum(s_lo + per_split, -(-D // BD)),
        stride_xt, stride_ge, D, TB, BE, BD, DOT, FP32,
    )  # fmt: skip
    slot = (tile * n_split + split) * TB + tl.arange(0, TB)  # [TB] rows of E partial logits
    tl.store(part_ptr + slot[:, None] * E + offs_e[None, :], part, mask=e_ok[None, :])
    tl.debug_barrier()  # every thread's partials before the ticket's release
    last = n_split * tl.num_programs(1) - 1
    if tl.atomic_add(ticket_ptr + tile, 1, sem="acq_rel") == last:
        tl.debug_barrier()
        offs_f = tl.arange(0, BEF)
        f_ok = offs_f < E
        logits = tl.zeros((TB, BEF), dtype=tl.float32)
        for s0 in range(0, n_split, SB):  # SB splits' loads in flight per step
            s = s0 + tl.arange(0, SB)
            row = ((tile * n_split + s)[:, None] * TB + tl.arange(0, TB)[None, :]) * E  # [SB, TB]
            ok = ((s < n_split)[:, None] & t_ok[None, :])[:, :, None] & f_ok[None, None, :]
            ptr = part_ptr + row[:, :, None] + offs_f[None, None, :]
            logits += tl.sum(tl.load(ptr, mask=ok, other=0.0, cache_modifier=".cg"), axis=0)
        _select(
            logits, offs_t, t_ok, offs_f, E, bias_ptr, tid2eid_ptr, ids_ptr, chosen_ptr,
            weights_ptr, stride_tid, rsf, TOPK, BLOCK_K, SCORING, HASH,
        )  # fmt: skip
        tl.store(ticket_ptr + tile, 0)  # ready for the next launch (graph replays included)


def _grid(t: int, d: int, n_exp: int, programs: int) -> dict:
    """Launch shape for ``t`` tokens: tile size and form, expert blocks, splits of ``d``
    (``programs``: about how many programs to launch in all)."""
    dot = t > FMA_MAX_TOKENS
    tb = _TB if dot else 1
    bd = 64 if dot else 128
    bef = max(16, triton.next_power_of_2(n_exp))
    be = bef if bef <= _BE_MAX else 32
    n_tiles, n_eblk, steps = -(-t // tb), -(-n_exp // be), -(-d // bd)
    cap = _MAX_SPLIT_DOT if dot else steps
    per_split = -(-steps // max(1, min(steps, cap, programs // (n_tiles * n_eblk))))
    n_split = -(-steps // per_split)
    sb = max(1, 4096 // (tb * bef))  # <= 4096 loads per step; fixed per shape (one compile)
    return {
        "grid": (n_tiles, n_eblk, n_split), "per_split": per_split, "TB": tb, "BE": be,
        "BEF": bef, "BD": bd, "SB": sb, "DOT": dot,
    }  # fmt: skip


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
    *,
    tickets: torch.Tensor | None = None,
    programs: int = 264,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` [T, d], ``gate`` [E, d]; ``bias`` [E] (scored layers) or ``tid2eid`` [vocab, k] and
    token ``ids`` [T] (hash layers) -> (chosen int32 [T, k], weights fp32 [T, k]), written into
    ``out`` when given (contiguous, those dtypes). ``tickets``: int32 zeros [MAX_TILES] on x's
    device reused across launches (the kernel leaves them zero; None: fresh zeros, one more
    launch). ``programs``: about how many programs to launch (2 per SM on the H100)."""
    if scoring_func not in SCORING:
        raise ValueError(f"unknown scoring_func {scoring_func!r}")
    hashed = tid2eid is not None
    if hashed == (bias is not None) or (hashed and ids is None):
        raise ValueError("pass either bias (scored layer) or tid2eid and ids (hash layer)")
    t, d = x.shape
    n_exp = gate.shape[0]
    if gate.shape[1] != d or (hashed and tid2eid.shape[1] != topk) or topk > n_exp:
        raise ValueError(f"x {tuple(x.shape)}, gate {tuple(gate.shape)}, top-k {topk}")
    if -(-t // _TB) > MAX_TILES:
        raise ValueError(f"{t} tokens: at most {MAX_TILES * _TB} per launch")
    x, gate = x.contiguous(), gate.contiguous()
    if out is None:
        out = (
            torch.empty(t, topk, dtype=torch.int32, device=x.device),
            torch.empty(t, topk, dtype=torch.float32, device=x.device),
        )
    chosen, weights = out
    if t == 0:
        return chosen, weights
    if tickets is None:
        tickets = torch.zeros(MAX_TILES, dtype=torch.int32, device=x.device)
    g = _grid(t, d, n_exp, programs)
    n_tiles, _, n_split = g["grid"]
    part = torch.empty(n_tiles * n_split * g["TB"] * n_exp, dtype=torch.float32, device=x.device)
    dummy = chosen  # stands in for the pointers a layer kind does not use
    tid2eid_ = tid2eid if hashed else dummy
    _route_kernel[g["grid"]](
        x_ptr=x, g_ptr=gate, bias_ptr=bias if bias is not None else dummy, tid2eid_ptr=tid2eid_,
        ids_ptr=ids if hashed else dummy, chosen_ptr=chosen, weights_ptr=weights, part_ptr=part,
        ticket_ptr=tickets, T=t, E=n_exp, n_split=n_split, per_split=g["per_split"],
        stride_xt=x.stride(0), stride_ge=gate.stride(0), stride_tid=tid2eid_.stride(0),
        rsf=float(routed_scaling_factor), D=d, TOPK=topk, BLOCK_K=triton.next_power_of_2(topk),
        TB=g["TB"], BE=g["BE"], BEF=g["BEF"], BD=g["BD"], SB=g["SB"],
        SCORING=SCORING[scoring_func], HASH=hashed,
        FP32=not (x.dtype == gate.dtype and x.dtype in (torch.bfloat16, torch.float16)),
        DOT=g["DOT"], num_warps=4 if g["DOT"] else FMA_WARPS,
    )  # fmt: skip
    return chosen, weights
