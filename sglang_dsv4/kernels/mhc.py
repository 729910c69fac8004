"""mHC (``ref.mhc``) as Triton kernels: two launches per block boundary.

:func:`hc_fused` runs, on streams ``x`` [T, hc, d] (optionally first updated by the previous
block's ``hc_post``: ``x'_k = post_k * y + sum_j comb[j, k] x_j``, written to a new tensor):

1. ``_hc_kernel``: the mix ``x @ fn^T`` [T, (2+hc)*hc] and the sum of squares of the flattened
   streams, split over ``d``: ``SPLIT`` programs per tile of ``TB`` tokens write partial sums to
   a workspace (at decode one token's ``fn`` read spreads over many SMs). The last program of a
   tile to finish (an atomic ticket per tile, reset by that program for the next launch, so
   CUDA-graph replays need no memset) reduces the partials and computes the maps in registers:
   the unweighted RMS scale, the sigmoid maps, the row softmax and ``sinkhorn_iters`` Sinkhorn
   rounds on the hc x hc matrix.
2. ``_collapse_norm_kernel``: one program per token, the pre-weighted collapse
   ``sum_j pre_j x_j`` and the following RMSNorm (``attn_norm`` / ``ffn_norm``) with the row in
   registers. A separate launch because both steps reduce over ``d``: done by the last program
   of a 16-token tile, the collapse would stream 16 tokens' streams through one SM.

``hc_head`` is the same pair with ``fn`` [hc, hc*d] (pre map only, no Sinkhorn) and the final
norm. Maps are fp32 (as ``ref.mhc``); the streams and the normed block input keep the streams'
dtype. bf16 values are rounded where ``ref`` rounds them (through fp32, round to nearest even),
so the two differ by fp32 summation order only.
"""

import torch
import triton
import triton.language as tl

from sglang_dsv4.kernels.kv_store import norm_apply, round_bf16

__all__ = ["MAX_TILES", "hc_fused", "hc_post"]

_TB = 16  # tokens per tile: tl.dot needs M >= 16
_BD = 32  # channels of d per step of the mix (x tile [TB, hc, BD])
_BE = 128  # channels of d per program of hc_post
_SB = 8  # partials (splits) reduced per step of the epilogue
_MAX_SPLIT = 32  # more splits buy little fn bandwidth and lengthen the epilogue's reduction
MAX_TILES = 1 << 16  # tickets per workspace: T <= MAX_TILES * 16 tokens per launch


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
def _reduce_mix(
    part_ptr, ss_ptr, tile, tok, n_split, eps, TB: tl.constexpr, HC: tl.constexpr,
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
        ss += tl.sum(tl.load(ss_ptr + slot, ok, 0.0, cache_modifier=".cg"), axis=0)
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
def _collapse_norm_kernel(
    x_ptr, pre_ptr, w_ptr, h_ptr, eps,
    D: tl.constexpr, BD: tl.constexpr, HC: tl.constexpr, X_BF16: tl.constexpr,
    W_BF16: tl.constexpr,
):  # fmt: skip
    """One token: ``h = rms_norm(sum_j pre_j x_j, w)`` [d], the collapse rounded to the streams'
    dtype first (as ``ref`` rounds it); the whole row stays in registers (one pass)."""
    t = tl.program_id(0).to(tl.int64)
    dd = tl.arange(0, BD)
    ok = dd < D
    u = tl.zeros([BD], tl.float32)
    for j in tl.static_range(HC):  # independent loads of the hc streams
        x = tl.load(x_ptr + (t * HC + j) * D + dd, mask=ok, other=0.0).to(tl.float32)
        u += tl.load(pre_ptr + t * HC + j) * x
    if X_BF16:
        u = round_bf16(u)
    inv = tl.math.div_rn(1.0, tl.sqrt_rn(tl.sum(u * u, axis=0) / D + eps))
    w = tl.load(w_ptr + dd, mask=ok, other=0.0)
    h = norm_apply(u[None, :], tl.broadcast_to(inv, [1]), w, X_BF16, W_BF16)
    tl.store(h_ptr + t * D + dd[None, :], h, mask=ok[None, :])


@triton.jit(do_not_specialize=["n_tokens", "n_split", "d_chunk"])
def _hc_kernel(
    x_ptr, y_ptr, post_in_ptr, comb_in_ptr, x_out_ptr,  # streams, [previous block's hc_post]
    fn_ptr, base_ptr, scale_ptr,  # this site's weights
    pre_ptr, post_ptr, comb_ptr,  # outputs: the maps
    part_ptr, ss_ptr, ticket_ptr,  # workspace: partial mixes, partial sums of squares, tickets
    n_tokens, n_split, d_chunk, eps, hc_eps,
    D: tl.constexpr, HC: tl.constexpr, NM: tl.constexpr, NMP: tl.constexpr, TB: tl.constexpr,
    BD: tl.constexpr, SB: tl.constexpr, ITERS: tl.constexpr, POST: tl.constexpr,
    HEAD: tl.constexpr, X_BF16: tl.constexpr,
):  # fmt: skip
    tile = tl.program_id(0)
    split = tl.program_id(1)
    t = tile * TB + tl.arange(0, TB)
    tok = t < n_tokens
    j = tl.arange(0, HC)
    m = tl.arange(0, NMP)
    row = t.to(tl.int64)[:, None, None] * (HC * D) + j[None, :, None] * D  # [TB, hc, 1]
    if POST:
        p_in, c_in = _load_maps(post_in_ptr, comb_in_ptr, t, tok, HC, X_BF16)
    acc = tl.zeros([TB, NMP], tl.float32)
    ss = tl.zeros([TB], tl.float32)
    d_lo = split * d_chunk
    for d0 in range(d_lo, tl.minimum(d_lo + d_chunk, D), BD):
        dd = d0 + tl.arange(0, BD)
        if POST:
            x = _post_tile(x_ptr, y_ptr, x_out_ptr, t, tok, row, dd, p_in, c_in, D, X_BF16)
        else:
            x = tl.load(x_ptr + row + dd[None, None, :], tok[:, None, None], 0.0).to(tl.float32)
        ss += tl.sum(tl.sum(x * x, axis=2), axis=1)
        k = tl.reshape(j[:, None] * D + dd[None, :], [HC * BD])  # flattened (stream, channel)
        w = tl.load(fn_ptr + m[None, :] * (HC * D) + k[:, None], (m < NM)[None, :], 0.0)
        acc += tl.dot(tl.reshape(x, [TB, HC * BD]), w, input_precision="ieee")  # [TB, NMP]
    slot = (tile * n_split + split) * TB + tl.arange(0, TB)
    tl.store(part_ptr + slot[:, None] * NMP + m[None, :], acc)
    tl.store(ss_ptr + slot, ss)
    tl.debug_barrier()  # every thread's partials before the release of the ticket
    if tl.atomic_add(ticket_ptr + tile, 1, sem="acq_rel") == n_split - 1:
        tl.debug_barrier()
        m_pre, m_post, m_comb = _reduce_mix(
            part_ptr, ss_ptr, tile, tok, n_split, eps, TB, HC, NMP, D, SB, HEAD
        )
        t64 = t.to(tl.int64)
        pre = tl.sigmoid(m_pre * tl.load(scale_ptr) + tl.load(base_ptr + j)[None, :]) + hc_eps
        tl.store(pre_ptr + t64[:, None] * HC + j[None, :], pre, mask=tok[:, None])
        if not HEAD:
            post = 2 * tl.sigmoid(
                m_post * tl.load(scale_ptr + 1) + tl.load(base_ptr + HC + j)[None, :]
            )
            tl.store(post_ptr + t64[:, None] * HC + j[None, :], post, mask=tok[:, None])
            cc = j[:, None] * HC + j[None, :]  # [hc, hc]
            logits = m_comb * tl.load(scale_ptr + 2) + tl.load(base_ptr + 2 * HC + cc)[None, :, :]
            comb = _sinkhorn(logits, hc_eps, ITERS)
            tl.store(
                comb_ptr + t64[:, None, None] * (HC * HC) + cc[None, :, :],
                comb,
                mask=tok[:, None, None],
            )
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
    n_tiles, steps = -(-n // _TB), d // _BD
    per_split = -(-steps // max(1, min(steps, _MAX_SPLIT, programs // n_tiles)))  # BD steps
    n_split = -(-steps // per_split)
    nmp = max(16, triton.next_power_of_2(fn.shape[0]))
    part = torch.empty(n_tiles * n_split * _TB * nmp, **f32)
    ss = torch.empty(n_tiles * n_split * _TB, **f32)
    x_bf16 = x.dtype == torch.bfloat16
    _hc_kernel[(n_tiles, n_split)](
        x_ptr=x, y_ptr=y, post_in_ptr=post_in, comb_in_ptr=comb_in, x_out_ptr=streams,
        fn_ptr=fn, base_ptr=base, scale_ptr=scale,
        pre_ptr=pre, post_ptr=pre if head else post, comb_ptr=pre if head else comb,
        part_ptr=part, ss_ptr=ss, ticket_ptr=tickets,
        n_tokens=n, n_split=n_split, d_chunk=per_split * _BD, eps=eps, hc_eps=hc_eps,
        D=d, HC=hc, NM=fn.shape[0], NMP=nmp, TB=_TB, BD=_BD, SB=_SB, ITERS=iters,
        POST=post_of is not None, HEAD=head, X_BF16=x_bf16, num_warps=4,
    )  # fmt: skip
    bd = triton.next_power_of_2(d)
    _collapse_norm_kernel[(n,)](
        x_ptr=streams, pre_ptr=pre, w_ptr=norm_w, h_ptr=h, eps=eps, D=d, BD=bd, HC=hc,
        X_BF16=x_bf16, W_BF16=x_bf16 and norm_w.dtype == torch.bfloat16,
        num_warps=8 if bd >= 4096 else 4,
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
