"""mHC (``ref.mhc``) as Triton kernels: one launch per block boundary at decode, two above.

:func:`hc_fused` runs, on streams ``x`` [T, hc, d] (optionally first updated by the previous
block's ``hc_post``: ``x'_k = post_k * y + sum_j comb[j, k] x_j``), the mix ``x @ fn^T``
[T, (2+hc)*hc] with the sum of squares of the flattened streams, the maps (unweighted RMS
scale, sigmoids, row softmax, ``sinkhorn_iters`` Sinkhorn rounds on the hc x hc matrix), the
pre-weighted collapse ``sum_j pre_j x_j`` and the RMSNorm that follows it (``attn_norm`` /
``ffn_norm``). The mix is a [T, hc*d] x [hc*d, 24] reduction. Two forms, picked per token count
(a static shape, fixed per captured graph):

* up to ``FMA_MAX_TOKENS`` tokens (decode), one launch of ``_hc_kernel``: programs (token, chunk
  of ``d``), ~all SMs (T=1 Flash: 128 programs of one 32-channel step, ``fn`` read once, 12 KB
  each): each forms its chunk of the new streams (all ``hc`` of them: the post mixes them per
  channel) and its partial mix as elementwise FMAs into an fp32 workspace; the token's last
  program (an atomic ticket per token, reset by that program, so CUDA-graph replays need no
  memset) sums the partials and computes the maps, the collapse and the norm in registers.
* above, the post and the mix in one pass over the streams (:mod:`.mhc_gemm`: programs (tile
  of 16 / 64 tokens, chunk of ``d``) form the new streams and their partial mix as a split-K
  GEMM on tensor cores, ``tf32x3``: fp32-accurate, bf16 streams exact in tf32), then one
  program per token for the maps, collapse and norm (``_maps_collapse_kernel``). (A CUDA-core
  fp32 ``tl.dot`` form took 42-128 us at T=32-128 and 3.7 ms at T=8192 on the H100,
  2026-12-06; the post as its own launch before the GEMM read the streams twice more.)

Both forms' per-token tail (maps, Sinkhorn, collapse, norm) is serial, latency-bound work in
one program: after one cross-warp sum of the token's partial rows, the maps run on entries
every thread holds (``_entries``: ``tl.split`` picks), so the logits, the ``2 * iters``
Sinkhorn normalisations and the collapse weights need no barrier (a [1, hc, hc] tensor spread
over warps had 3 per round; sm_90 counts: ``scripts/compile_mhc_tail.py``).

``hc_head`` is the same with ``fn`` [hc, hc*d] (pre map only, no Sinkhorn) and the final norm.
Maps are fp32 (as ``ref.mhc``); the streams and the normed block input keep the streams' dtype.
bf16 values are rounded where ``ref`` rounds them (through fp32, round to nearest even), so the
two differ by fp32 summation order (and tf32x3's ~2^-21 relative product error), and the
Sinkhorn's divisions, done as reciprocals (``rsqrt(y)^2``, ~3 ulp) and products, only.
"""

import torch
import triton
import triton.language as tl

from sglang_dsv4.kernels import mhc_gemm
from sglang_dsv4.kernels.kv_store import norm_apply, round_bf16
from sglang_dsv4.kernels.mhc_gemm import split_steps

__all__ = ["FMA_MAX_TOKENS", "MAX_TILES", "hc_fused"]

FMA_MAX_TOKENS = 8  # up to this many tokens: one token per tile (module docstring)
_BD = 32  # channels of d per step of the one-token form's mix (x tile [1, hc, BD])
_BE = 128  # d must be a multiple of this (the tiled form's steps, vector loads)
MAX_TILES = 1 << 16  # tickets per workspace (one per token of the one-token form)
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
    BD: tl.constexpr, POST: tl.constexpr, X_BF16: tl.constexpr,
):  # fmt: skip
    """This program's share of the mix over steps [s_lo, s_hi) (``BD`` channels each, a
    multiple of BD: aligned vector loads) of every stream -> [TB, NMP]: columns < NM the
    partial ``x @ fn^T``, column NM the partial sum of squares of ``x``. Elementwise FMAs into
    an accumulator reduced once at the end (no cross-thread sums in the loop)."""
    j = tl.arange(0, HC)
    m = tl.arange(0, NMP)
    row = t.to(tl.int64)[:, None, None] * (HC * D) + j[None, :, None] * D  # [TB, hc, 1]
    w_row = m[:, None, None] * (HC * D) + j[None, :, None] * D  # [NMP, hc, 1]
    w_ok = (m < NM)[:, None, None]
    acc4 = tl.zeros([TB, NMP, HC, BD], tl.float32)
    sq = tl.zeros([TB, HC, BD], tl.float32)
    for step in range(s_lo, s_hi):
        dd = step * BD + tl.arange(0, BD)
        x = _streams_tile(x_ptr, y_ptr, x_out_ptr, t, tok, row, dd, p_in, c_in, D, POST, X_BF16)
        w = tl.load(fn_ptr + w_row + dd[None, None, :], mask=w_ok, other=0.0)  # [NMP, hc, BD]
        sq += x * x
        acc4 += x[:, None, :, :] * w[None, :, :, :]
    acc = tl.sum(tl.sum(acc4, axis=3), axis=2)
    ss = tl.sum(tl.sum(sq, axis=2), axis=1)
    return tl.where(m[None, :] == NM, ss[:, None], acc)


@triton.jit
def _mix_row(part_ptr, slot0, split_stride, tok, n_split, NMP: tl.constexpr, SB: tl.constexpr):
    """Sum of a token's ``n_split`` partial rows (split ``s`` at row ``slot0 + s *
    split_stride``; ``tok`` [1]) -> [NMP]: the mix ``x @ fn^T`` (columns < NM) and the sum of
    squares (column NM). Whole rows, one reduction: its cross-warp step (shared memory and
    barriers) once for all the columns. ``SB`` splits per step: loads in flight together."""
    m = tl.arange(0, NMP)
    acc = tl.zeros([NMP], tl.float32)
    for s0 in range(0, n_split, SB):
        s = s0 + tl.arange(0, SB)
        rows = part_ptr + (slot0 + s * split_stride)[:, None] * NMP + m[None, :]  # [SB, NMP]
        ok = ((s < n_split) & tok)[:, None]
        acc += tl.sum(tl.load(rows, ok, 0.0, cache_modifier=".cg"), axis=0)
    return acc


@triton.constexpr_function
def _bit_reverse(i: int, bits: int) -> int:
    """``i`` with its low ``bits`` bits in reverse order."""
    return sum(((i >> b) & 1) << (bits - 1 - b) for b in range(bits))


@triton.jit
def _entries(v, N: tl.constexpr, LOG_N: tl.constexpr):
    """[N] (N = 2^LOG_N) -> tuple of its N entries (each [1], held by every thread), in index
    order. ``tl.split`` halves (even / odd entries) keep every pick in-thread, where a masked
    ``tl.sum`` per entry would be a cross-warp reduction each; after LOG_N rounds part ``k``
    holds entry bit-reverse(k)."""
    parts = (v,)
    for lvl in tl.static_range(LOG_N):
        dealt = ()
        for k in tl.static_range(1 << lvl):
            even, odd = tl.split(tl.reshape(parts[k], [N >> (lvl + 1), 2]))
            dealt = dealt + (even, odd)  # noqa: RUF005
        parts = dealt
    out = ()
    for i in tl.static_range(N):
        out = out + (parts[_bit_reverse(i, LOG_N)],)  # noqa: RUF005
    return out


@triton.jit
def _recip(y):
    """``1 / y`` (``y`` > 0, normal) as ``rsqrt(y)^2``: one MUFU.RSQ and a product, where
    ``1.0 / y`` is ``div.full`` (range checks and predicated scalings around its MUFU.RCP, ~8
    SASS instructions); ~3 ulp against its 2, and the comb map is rounded to bf16 before the
    next block's post with bf16 streams."""
    r = tl.math.rsqrt(y)
    return r * r


@triton.jit
def _scale_rows(c, hc_eps, HC: tl.constexpr):
    """Each row of ``c`` (tuple of hc*hc [1], row-major) over its sum + ``hc_eps``: the sum in
    index order, one reciprocal per row then products (not hc divisions)."""
    out = ()
    for i in tl.static_range(HC):
        s = c[i * HC]
        for j in tl.static_range(1, HC):
            s = s + c[i * HC + j]
        r = _recip(s + hc_eps)
        for j in tl.static_range(HC):
            out = out + (c[i * HC + j] * r,)  # noqa: RUF005
    return out


@triton.jit
def _scale_cols(c, hc_eps, HC: tl.constexpr):
    """Each column of ``c`` over its sum + ``hc_eps`` (as :func:`_scale_rows`)."""
    rs = ()
    for j in tl.static_range(HC):
        s = c[j]
        for i in tl.static_range(1, HC):
            s = s + c[i * HC + j]
        rs = rs + (_recip(s + hc_eps),)  # noqa: RUF005
    out = ()
    for ij in tl.static_range(HC * HC):
        out = out + (c[ij] * rs[ij % HC],)  # noqa: RUF005
    return out


@triton.jit
def _sinkhorn(logits, hc_eps, ITERS: tl.constexpr, HC: tl.constexpr):
    """``ref.mhc.sinkhorn(softmax_rows(logits) + hc_eps)`` of ``logits`` (tuple of hc*hc [1],
    row-major) -> the same. On entries every thread holds: no cross-thread sum in the
    2 * ITERS normalisations (a [1, hc, hc] tensor spread over warps took 3 barriers per
    round in ``_maps_collapse_kernel``)."""
    soft = ()
    for i in tl.static_range(HC):
        top = logits[i * HC]
        for j in tl.static_range(1, HC):
            top = tl.maximum(top, logits[i * HC + j])
        e = ()
        for j in tl.static_range(HC):
            e = e + (tl.exp(logits[i * HC + j] - top),)  # noqa: RUF005
        s = e[0]
        for j in tl.static_range(1, HC):
            s = s + e[j]
        r = _recip(s)
        for j in tl.static_range(HC):
            soft = soft + (e[j] * r + hc_eps,)  # noqa: RUF005
    c = _scale_cols(soft, hc_eps, HC)
    for _ in range(ITERS - 1):
        c = _scale_cols(_scale_rows(c, hc_eps, HC), hc_eps, HC)
    return c


@triton.jit
def _map_logits(mix, inv, scale_ptr, base_ptr, first: tl.constexpr, n: tl.constexpr):
    """Entries ``first .. first + n`` of the mix (tuple of [1]) RMS-scaled by ``inv``, times
    their map's scale (``scale_ptr``) plus their bias (``base_ptr + first``)."""
    scale = tl.load(scale_ptr)
    out = ()
    for k in tl.static_range(n):
        out = out + (mix[first + k] * inv * scale + tl.load(base_ptr + first + k),)  # noqa: RUF005
    return out


@triton.jit
def _maps(
    part_ptr, base_ptr, scale_ptr, pre_ptr, post_ptr, comb_ptr, slot0, split_stride, t, tok,
    n_split, eps, hc_eps, D: tl.constexpr, HC: tl.constexpr, NM: tl.constexpr, NMP: tl.constexpr,
    LOG_NMP: tl.constexpr, SB: tl.constexpr, ITERS: tl.constexpr, HEAD: tl.constexpr,
):  # fmt: skip
    """The epilogue's maps of token ``t`` ([1]) from its partials, on entries every thread
    holds (after one cross-warp reduction, no barriers): stores pre / post / comb, returns
    pre (tuple of hc [1])."""
    mix = _entries(_mix_row(part_ptr, slot0, split_stride, tok, n_split, NMP, SB), NMP, LOG_NMP)
    inv = tl.math.div_rn(1.0, tl.sqrt_rn(mix[NM] / (HC * D) + eps))
    t64 = t.to(tl.int64)
    logits = _map_logits(mix, inv, scale_ptr, base_ptr, 0, HC)
    pre = ()
    for k in tl.static_range(HC):
        pre = pre + (tl.sigmoid(logits[k]) + hc_eps,)  # noqa: RUF005
        tl.store(pre_ptr + t64 * HC + k, pre[k], mask=tok)
    if not HEAD:
        logits = _map_logits(mix, inv, scale_ptr + 1, base_ptr, HC, HC)
        for k in tl.static_range(HC):
            tl.store(post_ptr + t64 * HC + k, 2 * tl.sigmoid(logits[k]), mask=tok)
        logits = _map_logits(mix, inv, scale_ptr + 2, base_ptr, 2 * HC, HC * HC)
        comb = _sinkhorn(logits, hc_eps, ITERS, HC)
        for ij in tl.static_range(HC * HC):
            tl.store(comb_ptr + t64 * (HC * HC) + ij, comb[ij], mask=tok)
    return pre


@triton.jit
def _stream_rows(x_ptr, t, D: tl.constexpr, BDN: tl.constexpr, HC: tl.constexpr):
    """Token ``t``'s streams (tuple of hc [BDN], their dtype; channels >= D zero): one row
    each, so the collapse needs no masked pick of a row out of an [hc, BDN] tile. L1 is
    bypassed: other programs of this launch wrote them. Issued before the epilogue's maps so
    that their latency hides behind the Sinkhorn rounds."""
    dd = tl.arange(0, BDN)
    rows = ()
    for j in tl.static_range(HC):
        ptr = x_ptr + (t.to(tl.int64) * HC + j) * D + dd
        rows = rows + (tl.load(ptr, mask=dd < D, other=0.0, cache_modifier=".cg"),)  # noqa: RUF005
    return rows


@triton.jit
def _collapse_norm(rows, pre, w_ptr, h_ptr, t, eps, D: tl.constexpr, BDN: tl.constexpr,
                   HC: tl.constexpr, X_BF16: tl.constexpr, W_BF16: tl.constexpr):  # fmt: skip
    """Token ``t``: ``h = rms_norm(sum_j pre_j x_j, w)`` [d] from its streams ``rows`` (tuple
    of hc [BDN]) and ``pre`` (tuple of hc [1]), all in registers (one pass), the collapse
    rounded to the streams' dtype first (as ``ref`` rounds it)."""
    t = t.to(tl.int64)
    dd = tl.arange(0, BDN)
    ok = dd < D
    u = tl.zeros([BDN], tl.float32)
    for j in tl.static_range(HC):  # in the reference's order: ((p0 x0 + p1 x1) + ...)
        u += tl.sum(pre[j], axis=0) * rows[j].to(tl.float32)  # a scalar: [1] would set u's layout
    if X_BF16:
        u = round_bf16(u)
    inv = tl.math.div_rn(1.0, tl.sqrt_rn(tl.sum(u * u, axis=0) / D + eps))
    w = tl.load(w_ptr + dd, mask=ok, other=0.0)
    h = norm_apply(u[None, :], tl.broadcast_to(inv, [1]), w, X_BF16, W_BF16)
    tl.store(h_ptr + t * D + dd[None, :], h, mask=ok[None, :])


@triton.jit(do_not_specialize=["n_tokens", "n_split", "per_split"])
def _hc_kernel(
    x_ptr, y_ptr, post_in_ptr, comb_in_ptr, x_out_ptr,  # streams, [previous block's hc_post]
    fn_ptr, base_ptr, scale_ptr, norm_w_ptr,  # this site's weights
    pre_ptr, post_ptr, comb_ptr, h_ptr,  # outputs: the maps, the normed block input
    part_ptr, ticket_ptr,  # workspace: partial mixes + sums of squares, tickets
    n_tokens, n_split, per_split, eps, hc_eps,
    D: tl.constexpr, HC: tl.constexpr, NM: tl.constexpr, NMP: tl.constexpr,
    LOG_NMP: tl.constexpr, BD: tl.constexpr, SB: tl.constexpr, ITERS: tl.constexpr,
    POST: tl.constexpr, HEAD: tl.constexpr, BDN: tl.constexpr, X_BF16: tl.constexpr,
    W_BF16: tl.constexpr,
):  # fmt: skip
    """The one-token form: program (token, chunk of d); the token's last program finishes."""
    tile = tl.program_id(0)  # = the token
    split = tl.program_id(1)
    t = tile + tl.arange(0, 1)
    tok = t < n_tokens
    p_in, c_in = post_in_ptr, comb_in_ptr
    if POST:
        p_in, c_in = _load_maps(post_in_ptr, comb_in_ptr, t, tok, HC, X_BF16)
    s_lo = split * per_split
    part = _partial_mix(
        x_ptr, y_ptr, x_out_ptr, fn_ptr, t, tok, p_in, c_in, s_lo,
        tl.minimum(s_lo + per_split, D // BD), D, HC, NM, NMP, 1, BD, POST, X_BF16,
    )  # fmt: skip
    slot = tile * n_split + split + tl.arange(0, 1)
    tl.store(part_ptr + slot[:, None] * NMP + tl.arange(0, NMP)[None, :], part)
    tl.debug_barrier()  # every thread's partials (and new streams) before the ticket's release
    if tl.atomic_add(ticket_ptr + tile, 1, sem="acq_rel") == n_split - 1:
        tl.debug_barrier()
        # the token's stream rows: loads in flight from here, behind the maps' work
        rows = _stream_rows(x_out_ptr if POST else x_ptr, tile, D, BDN, HC)
        pre = _maps(
            part_ptr, base_ptr, scale_ptr, pre_ptr, post_ptr, comb_ptr, tile * n_split, 1, t,
            tok, n_split, eps, hc_eps, D, HC, NM, NMP, LOG_NMP, SB, ITERS, HEAD,
        )  # fmt: skip
        _collapse_norm(rows, pre, norm_w_ptr, h_ptr, tile, eps, D, BDN, HC, X_BF16, W_BF16)
        tl.store(ticket_ptr + tile, 0)  # ready for the next launch (graph replays included)


@triton.jit(do_not_specialize=["n_tokens", "n_split"])
def _maps_collapse_kernel(
    x_ptr, part_ptr, base_ptr, scale_ptr, norm_w_ptr, pre_ptr, post_ptr, comb_ptr, h_ptr,
    n_tokens, n_split, eps, hc_eps,
    D: tl.constexpr, HC: tl.constexpr, NM: tl.constexpr, NMP: tl.constexpr,
    LOG_NMP: tl.constexpr, SB: tl.constexpr, ITERS: tl.constexpr, HEAD: tl.constexpr,
    BDN: tl.constexpr, X_BF16: tl.constexpr, W_BF16: tl.constexpr,
):  # fmt: skip
    """The GEMM form's second launch, one token per program: its partials summed, the maps,
    the collapse and the norm."""
    t = tl.program_id(0)
    tv = t + tl.arange(0, 1)
    rows = _stream_rows(x_ptr, t, D, BDN, HC)
    pre = _maps(
        part_ptr, base_ptr, scale_ptr, pre_ptr, post_ptr, comb_ptr, t, n_tokens, tv,
        tv < n_tokens, n_split, eps, hc_eps, D, HC, NM, NMP, LOG_NMP, SB, ITERS, HEAD,
    )  # fmt: skip
    _collapse_norm(rows, pre, norm_w_ptr, h_ptr, t, eps, D, BDN, HC, X_BF16, W_BF16)


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
    return n, hc, d


def _fma_form(x, fn, base, scale, norm_w, tickets, outs, post_of, eps, hc_eps, iters, programs):
    """One launch: one-token tiles (module docstring)."""
    streams, h, pre, post, comb = outs
    n, hc, d = x.shape
    per_split, n_split = split_steps(d // _BD, n, programs)
    nmp = triton.next_power_of_2(fn.shape[0] + 1)  # + the sum of squares column
    part = torch.empty(n * n_split * nmp, dtype=torch.float32, device=x.device)
    y, post_in, comb_in = post_of if post_of is not None else (x, x, x)
    head = post is None
    _hc_kernel[(n, n_split)](
        x_ptr=x, y_ptr=y, post_in_ptr=post_in, comb_in_ptr=comb_in, x_out_ptr=streams,
        fn_ptr=fn, base_ptr=base, scale_ptr=scale, norm_w_ptr=norm_w,
        pre_ptr=pre, post_ptr=pre if head else post, comb_ptr=pre if head else comb, h_ptr=h,
        part_ptr=part, ticket_ptr=tickets,
        n_tokens=n, n_split=n_split, per_split=per_split, eps=eps, hc_eps=hc_eps,
        D=d, HC=hc, NM=fn.shape[0], NMP=nmp, LOG_NMP=nmp.bit_length() - 1, BD=_BD,
        SB=min(256, triton.next_power_of_2(n_split)), ITERS=iters,
        POST=post_of is not None, HEAD=head, BDN=triton.next_power_of_2(d),
        X_BF16=x.dtype == torch.bfloat16,
        W_BF16=x.dtype == torch.bfloat16 and norm_w.dtype == torch.bfloat16,
        num_warps=FMA_WARPS,
    )  # fmt: skip


def _gemm_form(x, fn, base, scale, norm_w, outs, post_of, eps, hc_eps, iters, programs):
    """Two launches: [the previous block's post and] the mix as a split-K GEMM on tensor cores
    in one pass over the streams (``mhc_gemm``), then one program per token for the maps,
    collapse and norm. Returns the streams (``x`` or the new ones)."""
    h, pre, post, comb = outs
    n, hc, d = x.shape
    streams, part, n_split, nmp = mhc_gemm.mix_partials(x, fn, programs, post_of)
    head = post is None
    x_bf16 = x.dtype == torch.bfloat16
    _maps_collapse_kernel[(n,)](
        x_ptr=streams, part_ptr=part, base_ptr=base, scale_ptr=scale, norm_w_ptr=norm_w,
        pre_ptr=pre, post_ptr=pre if head else post, comb_ptr=pre if head else comb, h_ptr=h,
        n_tokens=n, n_split=n_split, eps=eps, hc_eps=hc_eps, D=d, HC=hc, NM=fn.shape[0],
        NMP=nmp, LOG_NMP=nmp.bit_length() - 1, SB=min(256, triton.next_power_of_2(n_split)),
        ITERS=iters, HEAD=head,
        BDN=triton.next_power_of_2(d), X_BF16=x_bf16,
        W_BF16=x_bf16 and norm_w.dtype == torch.bfloat16, num_warps=8,
    )  # fmt: skip
    return streams


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
    y = post_of[0] if post_of is not None else None
    if y is not None and (y.shape != (n, d) or not y.is_contiguous()):
        raise ValueError(f"block output must be contiguous [T, d] = [{n}, {d}], got {y.shape}")
    if n > FMA_MAX_TOKENS:
        outs = (h, pre, post, comb)
        streams = _gemm_form(x, fn, base, scale, norm_w, outs, post_of, eps, hc_eps, iters,
                             programs)  # fmt: skip
        return streams, h, post, comb
    if n > tickets.numel():
        raise ValueError(f"{n} tokens: at most {tickets.numel()} (tickets) in the one-token form")
    streams = x if post_of is None else torch.empty_like(x)
    if n > 0:
        outs = (streams, h, pre, post, comb)
        _fma_form(x, fn, base, scale, norm_w, tickets, outs, post_of, eps, hc_eps, iters, programs)
    return streams, h, post, comb
