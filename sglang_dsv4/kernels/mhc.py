"""mHC (``ref.mhc``) as Triton kernels: one launch per block boundary at decode, two above.

:func:`hc_fused` runs, on streams ``x`` [T, hc, d] (optionally first updated by the previous
block's ``hc_post``: ``x'_k = post_k * y + sum_j comb[j, k] x_j``, written to a new tensor), one
``_hc_kernel`` launch over a grid of (token tile, chunk of ``d``) programs:

1. every program forms its tile's new streams over its chunk of ``d`` (all ``hc`` streams: the
   post mixes them per channel) and the partial mix ``x @ fn^T`` [TB, (2+hc)*hc] with the
   partial sum of squares (one more column), written to an fp32 workspace. The mix is a
   [T, hc*d] x [hc*d, 24] reduction: at decode its cost is latency, so it is split over ~all SMs
   (one 32-channel step per program at T=1: ``fn`` is read once, 12 KB per program).
2. the last program of a tile to finish (an atomic ticket per tile, reset by that program for
   the next launch, so CUDA-graph replays need no memset) sums the partials and computes the
   maps in registers: the unweighted RMS scale, the sigmoid maps, the row softmax and
   ``sinkhorn_iters`` Sinkhorn rounds on the hc x hc matrix; with one token per tile it then
   also forms the pre-weighted collapse ``sum_j pre_j x_j`` and the following RMSNorm
   (``attn_norm`` / ``ffn_norm``) of its token.

Two forms, picked per token count (a static shape, fixed per captured graph): up to
``FMA_MAX_TOKENS`` tokens one token per tile, the mix as elementwise FMAs into a [NMP, hc, BD]
accumulator (no wasted rows), the collapse in the epilogue (tiles run their epilogues in
parallel); above, 16-token tiles through ``tl.dot`` (fp32, ieee) so that ``fn`` is read once per
16 tokens, and the collapse + norm in a second launch (``_collapse_norm_kernel``, one program
per token: done by one program per 16-token tile it would stream 16 tokens through one SM).

``hc_head`` is the same with ``fn`` [hc, hc*d] (pre map only, no Sinkhorn) and the final norm.
Maps are fp32 (as ``ref.mhc``); the streams and the normed block input keep the streams' dtype.
bf16 values are rounded where ``ref`` rounds them (through fp32, round to nearest even), so the
two differ by fp32 summation order only.
"""

import torch
import triton
import triton.language as tl

from sglang_dsv4.kernels.kv_store import norm_apply, round_bf16

__all__ = ["FMA_MAX_TOKENS", "MAX_TILES", "hc_fused", "hc_post"]

FMA_MAX_TOKENS = 8  # up to this many tokens: one token per tile (module docstring)
_TB = 16  # tokens per tile of the tl.dot form: tl.dot needs M >= 16
_BD = 32  # channels of d per step of the mix (x tile [TB, hc, BD])
_BE = 128  # channels of d per program of hc_post
_MAX_SPLIT_DOT = 32  # the dot form's epilogue reduces 16 tokens' partials: few splits
MAX_TILES = 1 << 16  # tickets per workspace: T <= MAX_TILES * 16 tokens per launch
FMA_WARPS = 8  # the one-token form: its epilogue holds a whole row (8192 at Pro) per stream


@triton.jit
def _load_maps(post_ptr, comb_ptr, t, tok, HC: tl.constexpr, X_BF16: tl.constexpr):
    """``post`` [TB, hc] and ``comb`` [TB, hc, hc] (fp32) of tokens ``t``, rounded to bf16 when
    the streams are bf16 (``ref.mhc.hc_post`` casts them to the streams' dtype)."""
    j = tl.arange(0, HC)
    t64 = t.to(tl.int64)
    p = tl.load(post_ptr + t64[:, None] * HC + j[None, :], mask=tok[:, None], other=0.0)
    off = t64[:, None, None] * (HC * HC) + j[None, :, None] * HC + j[None, None, :]
    c = tl.load(comb_ptr + off, mask=tok[:, None, None], other=0.0)
    if X_BF16:
        p = round_bf16(p)
        c = round_bf16(c)
    return p, c


@triton.jit
def _post_tile(x_ptr, y_ptr, out_ptr, t, tok, row, dd, p, c, D: tl.constexpr, X_BF16: tl.constexpr):
    """New streams ``post_k * y + sum_j comb[j, k] x_j`` [TB, hc, BD] at channels ``dd``; stored
    to ``out_ptr`` and returned (fp32 holding stream-dtype values)."""
    ok = tok[:, None, None]
    x = tl.load(x_ptr + row + dd[None, None, :], mask=ok, other=0.0).to(tl.float32)  # [TB, j, BD]
    y = tl.load(y_ptr + t.to(tl.int64)[:, None] * D + dd[None, :], mask=tok[:, None], other=0.0)
    mixed = tl.sum(c[:, :, :, None] * x[:, :, None, :], axis=1)  # [TB, k, BD]
    lifted = p[:, :, None] * y.to(tl.float32)[:, None, :]
    # bf16: each torch op of the reference rounds
    new = round_bf16(round_bf16(lifted) + round_bf16(mixed)) if X_BF16 else lifted + mixed
    tl.store(out_ptr + row + dd[None, None, :], new, mask=ok)
    return new


@triton.jit
def _streams_tile(x_ptr, y_ptr, x_out_ptr, t, tok, row, dd, p_in, c_in, D: tl.constexpr,
                  POST: tl.constexpr, X_BF16: tl.constexpr):  # fmt: skip
    """The tile's streams [TB, hc, BD] (fp32) at channels ``dd``: after the previous block's
    post (stored) when ``POST``, else as loaded."""
    if POST:
        return _post_tile(x_ptr, y_ptr, x_out_ptr, t, tok, row, dd, p_in, c_in, D, X_BF16)
    return tl.load(x_ptr + row + dd[None, None, :], tok[:, None, None], 0.0).to(tl.float32)


@triton.jit
def _partial_mix(
    x_ptr, y_ptr, x_out_ptr, fn_ptr, t, tok, p_in, c_in, s_lo, s_hi,
    D: tl.constexpr, HC: tl.constexpr, NM: tl.constexpr, NMP: tl.constexpr, TB: tl.constexpr,
    BD: tl.constexpr, POST: tl.constexpr, DOT: tl.constexpr, X_BF16: tl.constexpr,
):  # fmt: skip
    """This program's share of the mix over steps [s_lo, s_hi) (``BD`` channels each, a
    multiple of BD: aligned vector loads) of every stream -> [TB, NMP]:
    columns < NM the partial ``x @ fn^T``, column NM the partial sum of squares of ``x``."""
    j = tl.arange(0, HC)
    m = tl.arange(0, NMP)
    row = t.to(tl.int64)[:, None, None] * (HC * D) + j[None, :, None] * D  # [TB, hc, 1]
    w_row = m[:, None, None] * (HC * D) + j[None, :, None] * D  # [NMP, hc, 1]
    w_ok = (m < NM)[:, None, None]
    if DOT:
        acc = tl.zeros([TB, NMP], tl.float32)
        ss = tl.zeros([TB], tl.float32)
    else:  # elementwise FMAs, reduced once at the end (no cross-thread sums in the loop)
        acc4 = tl.zeros([TB, NMP, HC, BD], tl.float32)
        sq = tl.zeros([TB, HC, BD], tl.float32)
    for step in range(s_lo, s_hi):
        dd = step * BD + tl.arange(0, BD)
        x = _streams_tile(x_ptr, y_ptr, x_out_ptr, t, tok, row, dd, p_in, c_in, D, POST, X_BF16)
        if DOT:
            ss += tl.sum(tl.sum(x * x, axis=2), axis=1)
            for jj in tl.static_range(HC):  # K = BD per dot: fn's rows load contiguous in dd
                xj = tl.sum(tl.where(j[None, :, None] == jj, x, 0.0), axis=1)  # [TB, BD]
                w_ptr = fn_ptr + m[None, :] * (HC * D) + jj * D + dd[:, None]  # [BD, NMP]
                wj = tl.load(w_ptr, (m < NM)[None, :], 0.0)
                acc += tl.dot(xj, wj, input_precision="ieee")
        else:
            w = tl.load(fn_ptr + w_row + dd[None, None, :], mask=w_ok, other=0.0)  # [NMP, hc, BD]
            sq += x * x
            acc4 += x[:, None, :, :] * w[None, :, :, :]
    if not DOT:
        acc = tl.sum(tl.sum(acc4, axis=3), axis=2)
        ss = tl.sum(tl.sum(sq, axis=2), axis=1)
    return tl.where(m[None, :] == NM, ss[:, None], acc)


@triton.jit
def _reduce_mix(
    part_ptr, tile, tok, n_split, eps, TB: tl.constexpr, HC: tl.constexpr, NM: tl.constexpr,
    NMP: tl.constexpr, D: tl.constexpr, SB: tl.constexpr, HEAD: tl.constexpr,
):  # fmt: skip
    """Sum the ``n_split`` partials of a tile -> the RMS-scaled mix split into its three maps'
    logits: pre [TB, hc], post [TB, hc], comb [TB, hc, hc] (post / comb zero for the head).
    ``SB`` splits per step: independent loads in flight instead of one L2 round trip each."""
    j = tl.arange(0, HC)
    m_pre = tl.zeros([TB, HC], tl.float32)
    m_post = tl.zeros([TB, HC], tl.float32)
    m_comb = tl.zeros([TB, HC, HC], tl.float32)
    ss = tl.zeros([TB], tl.float32)
    comb_col = 2 * HC + j[:, None] * HC + j[None, :]  # [hc, hc]
    for s0 in range(0, n_split, SB):
        s = s0 + tl.arange(0, SB)
        slot = (tile * n_split + s)[:, None] * TB + tl.arange(0, TB)[None, :]  # [SB, TB]
        ok = (s < n_split)[:, None] & tok[None, :]
        row = (part_ptr + slot * NMP)[:, :, None]  # [SB, TB, 1]
        m_pre += tl.sum(tl.load(row + j, ok[:, :, None], 0.0, cache_modifier=".cg"), axis=0)
        if not HEAD:
            part = tl.load(row + HC + j, ok[:, :, None], 0.0, cache_modifier=".cg")
            m_post += tl.sum(part, axis=0)
            ok4 = ok[:, :, None, None]
            part = tl.load(row[:, :, :, None] + comb_col, ok4, 0.0, cache_modifier=".cg")
            m_comb += tl.sum(part, axis=0)
        ss += tl.sum(tl.load(part_ptr + slot * NMP + NM, ok, 0.0, cache_modifier=".cg"), axis=0)
    inv = tl.math.div_rn(1.0, tl.sqrt_rn(ss / (HC * D) + eps))  # [TB]
    return m_pre * inv[:, None], m_post * inv[:, None], m_comb * inv[:, None, None]


@triton.jit
def _sinkhorn(logits, hc_eps, ITERS: tl.constexpr):
    """``ref.mhc.sinkhorn(softmax_rows(logits) + hc_eps)`` of ``logits`` [TB, hc, hc]."""
    e = tl.exp(logits - tl.max(logits, axis=2)[:, :, None])
    comb = e / tl.sum(e, axis=2)[:, :, None] + hc_eps
    comb = comb / (tl.sum(comb, axis=1)[:, None, :] + hc_eps)
    for _ in range(ITERS - 1):
        comb = comb / (tl.sum(comb, axis=2)[:, :, None] + hc_eps)
        comb = comb / (tl.sum(comb, axis=1)[:, None, :] + hc_eps)
    return comb


@triton.jit
def _maps(
    part_ptr, base_ptr, scale_ptr, pre_ptr, post_ptr, comb_ptr, tile, t, tok, n_split, eps,
    hc_eps, D: tl.constexpr, HC: tl.constexpr, NM: tl.constexpr, NMP: tl.constexpr,
    TB: tl.constexpr, SB: tl.constexpr, ITERS: tl.constexpr, HEAD: tl.constexpr,
):  # fmt: skip
    """The epilogue's maps of a tile from its partials: stores pre / post / comb, returns pre
    [TB, hc]."""
    j = tl.arange(0, HC)
    m_pre, m_post, m_comb = _reduce_mix(
        part_ptr, tile, tok, n_split, eps, TB, HC, NM, NMP, D, SB, HEAD
    )
    t64 = t.to(tl.int64)
    pre = tl.sigmoid(m_pre * tl.load(scale_ptr) + tl.load(base_ptr + j)[None, :]) + hc_eps
    tl.store(pre_ptr + t64[:, None] * HC + j[None, :], pre, mask=tok[:, None])
    if not HEAD:
        post = 2 * tl.sigmoid(m_post * tl.load(scale_ptr + 1) + tl.load(base_ptr + HC + j)[None, :])
        tl.store(post_ptr + t64[:, None] * HC + j[None, :], post, mask=tok[:, None])
        cc = j[:, None] * HC + j[None, :]  # [hc, hc]
        logits = m_comb * tl.load(scale_ptr + 2) + tl.load(base_ptr + 2 * HC + cc)[None, :, :]
        comb = _sinkhorn(logits, hc_eps, ITERS)
        off = t64[:, None, None] * (HC * HC) + cc[None, :, :]
        tl.store(comb_ptr + off, comb, mask=tok[:, None, None])
    return pre


@triton.jit
def _stream_rows(x_ptr, t, D: tl.constexpr, BDN: tl.constexpr, HC: tl.constexpr):
    """Token ``t``'s streams [hc, BDN] in their dtype (channels >= D zero). L1 is bypassed:
    other programs of this launch wrote them. Issued before the epilogue's maps so that their
    latency hides behind the Sinkhorn rounds."""
    dd = tl.arange(0, BDN)
    rows = (t.to(tl.int64) * HC + tl.arange(0, HC))[:, None] * D + dd[None, :]
    return tl.load(x_ptr + rows, mask=(dd < D)[None, :], other=0.0, cache_modifier=".cg")


@triton.jit
def _collapse_norm(rows, pre, w_ptr, h_ptr, t, eps, D: tl.constexpr, BDN: tl.constexpr,
                   HC: tl.constexpr, X_BF16: tl.constexpr, W_BF16: tl.constexpr):  # fmt: skip
    """Token ``t``: ``h = rms_norm(sum_j pre_j x_j, w)`` [d] from its streams ``rows`` [hc, BDN]
    and ``pre`` [1, hc] (registers), the collapse rounded to the streams' dtype first (as
    ``ref`` rounds it); the whole row in registers (one pass)."""
    t = t.to(tl.int64)
    dd = tl.arange(0, BDN)
    ok = dd < D
    j = tl.arange(0, HC)
    u = tl.zeros([BDN], tl.float32)
    for jj in tl.static_range(HC):  # in the reference's order: ((p0 x0 + p1 x1) + ...)
        p = tl.sum(tl.sum(tl.where(j[None, :] == jj, pre, 0.0), axis=1), axis=0)
        x = tl.sum(tl.where(j[:, None] == jj, rows.to(tl.float32), 0.0), axis=0)  # exact pick
        u += p * x
    if X_BF16:
        u = round_bf16(u)
    inv = tl.math.div_rn(1.0, tl.sqrt_rn(tl.sum(u * u, axis=0) / D + eps))
    w = tl.load(w_ptr + dd, mask=ok, other=0.0)
    h = norm_apply(u[None, :], tl.broadcast_to(inv, [1]), w, X_BF16, W_BF16)
    tl.store(h_ptr + t * D + dd[None, :], h, mask=ok[None, :])


@triton.jit
def _collapse_norm_kernel(
    x_ptr, pre_ptr, w_ptr, h_ptr, eps,
    D: tl.constexpr, BD: tl.constexpr, HC: tl.constexpr, X_BF16: tl.constexpr,
    W_BF16: tl.constexpr,
):  # fmt: skip
    """One token per program (the dot form's second launch): :func:`_collapse_norm`."""
    t = tl.program_id(0)
    pre = tl.load(pre_ptr + t.to(tl.int64) * HC + tl.arange(0, HC))[None, :]
    rows = _stream_rows(x_ptr, t, D, BD, HC)
    _collapse_norm(rows, pre, w_ptr, h_ptr, t, eps, D, BD, HC, X_BF16, W_BF16)


@triton.jit(do_not_specialize=["n_tokens", "n_split", "per_split"])
def _hc_kernel(
    x_ptr, y_ptr, post_in_ptr, comb_in_ptr, x_out_ptr,  # streams, [previous block's hc_post]
    fn_ptr, base_ptr, scale_ptr, norm_w_ptr,  # this site's weights
    pre_ptr, post_ptr, comb_ptr, h_ptr,  # outputs: the maps, [the normed block input]
    part_ptr, ticket_ptr,  # workspace: partial mixes + sums of squares, tickets
    n_tokens, n_split, per_split, eps, hc_eps,
    D: tl.constexpr, HC: tl.constexpr, NM: tl.constexpr, NMP: tl.constexpr, TB: tl.constexpr,
    BD: tl.constexpr, SB: tl.constexpr, ITERS: tl.constexpr, POST: tl.constexpr,
    HEAD: tl.constexpr, DOT: tl.constexpr, COLLAPSE: tl.constexpr, BDN: tl.constexpr,
    X_BF16: tl.constexpr, W_BF16: tl.constexpr,
):  # fmt: skip
    tile = tl.program_id(0)
    split = tl.program_id(1)
    t = tile * TB + tl.arange(0, TB)
    tok = t < n_tokens
    p_in, c_in = post_in_ptr, comb_in_ptr
    if POST:
        p_in, c_in = _load_maps(post_in_ptr, comb_in_ptr, t, tok, HC, X_BF16)
    s_lo = split * per_split
    part = _partial_mix(
        x_ptr, y_ptr, x_out_ptr, fn_ptr, t, tok, p_in, c_in, s_lo,
        tl.minimum(s_lo + per_split, D // BD), D, HC, NM, NMP, TB, BD, POST, DOT, X_BF16,
    )  # fmt: skip
    slot = (tile * n_split + split) * TB + tl.arange(0, TB)
    tl.store(part_ptr + slot[:, None] * NMP + tl.arange(0, NMP)[None, :], part)
    tl.debug_barrier()  # every thread's partials (and new streams) before the ticket's release
    if tl.atomic_add(ticket_ptr + tile, 1, sem="acq_rel") == n_split - 1:
        tl.debug_barrier()
        if COLLAPSE:  # one token per tile (TB == 1): its streams' loads in flight from here
            rows = _stream_rows(x_out_ptr if POST else x_ptr, tile, D, BDN, HC)
        pre = _maps(
            part_ptr, base_ptr, scale_ptr, pre_ptr, post_ptr, comb_ptr, tile, t, tok, n_split,
            eps, hc_eps, D, HC, NM, NMP, TB, SB, ITERS, HEAD,
        )  # fmt: skip
        if COLLAPSE:
            _collapse_norm(rows, pre, norm_w_ptr, h_ptr, tile, eps, D, BDN, HC, X_BF16, W_BF16)
        tl.store(ticket_ptr + tile, 0)  # ready for the next launch (graph replays included)


def _check(x: torch.Tensor, fn: torch.Tensor) -> tuple[int, int, int]:
    if x.dim() != 3 or not x.is_contiguous():
        raise ValueError(f"streams must be contiguous [T, hc, d], got {tuple(x.shape)}")
    n, hc, d = x.shape
    if hc & (hc - 1) or d % _BE:
        raise ValueError(f"hc {hc} must be a power of 2 and d {d} a multiple of {_BE}")
    good_rows = fn.dim() == 2 and fn.shape[0] in (hc, (2 + hc) * hc) and fn.shape[1] == hc * d
    if fn.dtype != torch.float32 or not good_rows or not fn.is_contiguous():
        raise ValueError(
            f"fn must be contiguous fp32 [hc or (2+hc)*hc, hc*d], got {fn.dtype} {tuple(fn.shape)}"
        )
    if -(-n // _TB) > MAX_TILES:
        raise ValueError(f"{n} tokens: at most {MAX_TILES * _TB} per launch")
    return n, hc, d


def _grid(n: int, d: int, n_rows: int, programs: int) -> dict:
    """The launch shape for ``n`` tokens: tile size, form, splits of ``d`` (``programs``: about
    how many programs to launch in all)."""
    dot = n > FMA_MAX_TOKENS
    tb = _TB if dot else 1
    n_tiles, steps = -(-n // tb), d // _BD
    cap = _MAX_SPLIT_DOT if dot else steps
    per_split = -(-steps // max(1, min(steps, cap, programs // n_tiles)))  # BD steps
    n_split = -(-steps // per_split)
    nmp = triton.next_power_of_2(n_rows + 1)  # + the sum of squares column
    return {
        "n_tiles": n_tiles, "n_split": n_split, "per_split": per_split, "TB": tb,
        "DOT": dot, "NMP": max(16, nmp) if dot else nmp,
        "SB": 8 if dot else 256,  # fixed per form (one compile); splits past n_split masked
    }  # fmt: skip


def hc_fused(
    x: torch.Tensor,
    fn: torch.Tensor,
    base: torch.Tensor,
    scale: torch.Tensor,
    norm_w: torch.Tensor,
    tickets: torch.Tensor,
    *,
    eps: float,
    hc_eps: float,
    iters: int,
    programs: int,
    post_of: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
):
    """``hc_pre`` (or ``hc_head`` when ``fn`` has ``hc`` rows) of streams ``x`` [T, hc, d] and
    the following ``rms_norm(., norm_w)``; with ``post_of = (y, post, comb)`` the previous
    block's ``hc_post`` is applied to ``x`` first. Returns ``(streams, h [T, d], post [T, hc],
    comb [T, hc, hc])``: ``streams`` is ``x`` or the new streams; post / comb are None for the
    head. ``tickets``: int32 zeros [MAX_TILES] on x's device, reused across launches (the
    kernel leaves them zero). ``programs``: about how many programs to launch (splits of d)."""
    n, hc, d = _check(x, fn)
    head = fn.shape[0] == hc
    f32 = {"dtype": torch.float32, "device": x.device}
    h = torch.empty(n, d, dtype=x.dtype, device=x.device)
    pre = torch.empty(n, hc, **f32)
    post = None if head else torch.empty(n, hc, **f32)
    comb = None if head else torch.empty(n, hc, hc, **f32)
    streams = x if post_of is None else torch.empty_like(x)
    if n == 0:
        return streams, h, post, comb
    y, post_in, comb_in = post_of if post_of is not None else (x, x, x)
    if post_of is not None and (y.shape != (n, d) or not y.is_contiguous()):
        raise ValueError(f"block output must be contiguous [T, d] = [{n}, {d}], got {y.shape}")
    g = _grid(n, d, fn.shape[0], programs)
    part = torch.empty(g["n_tiles"] * g["n_split"] * g["TB"] * g["NMP"], **f32)
    x_bf16 = x.dtype == torch.bfloat16
    w_bf16 = x_bf16 and norm_w.dtype == torch.bfloat16
    bdn = triton.next_power_of_2(d)
    _hc_kernel[(g["n_tiles"], g["n_split"])](
        x_ptr=x, y_ptr=y, post_in_ptr=post_in, comb_in_ptr=comb_in, x_out_ptr=streams,
        fn_ptr=fn, base_ptr=base, scale_ptr=scale, norm_w_ptr=norm_w,
        pre_ptr=pre, post_ptr=pre if head else post, comb_ptr=pre if head else comb, h_ptr=h,
        part_ptr=part, ticket_ptr=tickets,
        n_tokens=n, n_split=g["n_split"], per_split=g["per_split"], eps=eps, hc_eps=hc_eps,
        D=d, HC=hc, NM=fn.shape[0], NMP=g["NMP"], TB=g["TB"], BD=_BD, SB=g["SB"], ITERS=iters,
        POST=post_of is not None, HEAD=head, DOT=g["DOT"], COLLAPSE=not g["DOT"], BDN=bdn,
        X_BF16=x_bf16, W_BF16=w_bf16, num_warps=4 if g["DOT"] else FMA_WARPS,
    )  # fmt: skip
    if g["DOT"]:
        _collapse_norm_kernel[(n,)](
            x_ptr=streams, pre_ptr=pre, w_ptr=norm_w, h_ptr=h, eps=eps, D=d, BD=bdn, HC=hc,
            X_BF16=x_bf16, W_BF16=w_bf16, num_warps=8 if bdn >= 4096 else 4,
        )  # fmt: skip
    return streams, h, post, comb


@triton.jit(do_not_specialize=["n_tokens"])
def _hc_post_kernel(
    x_ptr,
    y_ptr,
    post_ptr,
    comb_ptr,
    out_ptr,
    n_tokens,
    D: tl.constexpr,
    HC: tl.constexpr,
    TB: tl.constexpr,
    BD: tl.constexpr,
    X_BF16: tl.constexpr,
):
    t = tl.program_id(0) * TB + tl.arange(0, TB)
    tok = t < n_tokens
    dd = tl.program_id(1) * BD + tl.arange(0, BD)
    row = t.to(tl.int64)[:, None, None] * (HC * D) + tl.arange(0, HC)[None, :, None] * D
    p, c = _load_maps(post_ptr, comb_ptr, t, tok, HC, X_BF16)
    _post_tile(x_ptr, y_ptr, out_ptr, t, tok, row, dd, p, c, D, X_BF16)


def hc_post(
    y: torch.Tensor, x: torch.Tensor, post: torch.Tensor, comb: torch.Tensor
) -> torch.Tensor:
    """``ref.mhc.hc_post`` alone: block output ``y`` [T, d], streams ``x`` [T, hc, d], maps
    ``post`` [T, hc] / ``comb`` [T, hc, hc] (fp32) -> new streams [T, hc, d]."""
    n, hc, d = x.shape
    out = torch.empty_like(x)
    if n == 0:
        return out
    if d % _BE or not (x.is_contiguous() and y.is_contiguous()):
        raise ValueError(
            f"contiguous streams with d a multiple of {_BE} needed, got {tuple(x.shape)}"
        )
    tb = 4
    _hc_post_kernel[(-(-n // tb), d // _BE)](
        x_ptr=x, y_ptr=y, post_ptr=post.contiguous(), comb_ptr=comb.contiguous(), out_ptr=out,
        n_tokens=n, D=d, HC=hc, TB=tb, BD=_BE, X_BF16=x.dtype == torch.bfloat16, num_warps=4,
    )  # fmt: skip
    return out
