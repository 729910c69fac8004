"""mHC's tiled (prefill) pass over the streams: the previous block's ``hc_post`` and the mix
``x @ fn^T`` on tensor cores, in one read of the streams.

:func:`mix_partials` is the first launch of :mod:`sglang_dsv4.kernels.mhc`'s GEMM form (above
``FMA_MAX_TOKENS`` tokens). Program (tile of ``TM`` tokens, chunk of ``d``) walks its chunk
``BD`` channels at a time; each step loads every stream's tile ``x_j`` [TM, BD] and, with the
previous block's output ``y`` [TM, BD] and maps, forms each new stream ``x'_k = post_k * y +
sum_j comb[j, k] x_j`` (stored), then adds ``fn[:, k*d + chunk] @ x'_k^T`` and its sum of
squares to the tile's partial rows. The old streams are read once and the new ones written once
(before: the post as its own launch, then a GEMM launch re-reading the new streams). Without a
post it is the plain split-K mix; :func:`hc_post` is the same launch without the mix.

Why this shape (sm_90 compiles, ``scripts/compile_ops_sm90.py``):

* the mix runs transposed, ``acc [MW=64, TM] += fn_tile [64, BD] @ x'^T``: the new streams are
  the wgmma B operand, stored to shared memory from the registers that computed them. As the A
  operand (in registers) the compiler recomputed the whole post once per operand layout.
* ``tf32x3`` by hand (``_mix_dot``): every product into the one accumulator; Triton's
  ``tf32x3`` zeroes a partial sum per dot, moves the accumulator between two wgmma layouts
  each time, and waits on each product (255 registers and spills). bf16 streams are exact in
  tf32: two products.
* per ``k`` over 2-D tiles with the maps loaded once per program as [TM] vectors: the old post
  kernel's [4 tokens, hc, hc, 128] product had each of its 128 threads load the 4 tokens'
  whole ``comb`` (32 KB of L1 reads per program for 9 KB of streams).
* steps of 64 tokens x 16 channels (16 x 32 below 256 tokens) at 4 warps: 56-204 registers,
  no spills, 57 / 78 KB of shared memory (bf16).

The new streams round as ``ref.mhc.hc_post`` and ``kernels.mhc._post_tile`` (the one-token
form's post, and the GEMM form's before this module): maps rounded to the streams' dtype,
``round(round(post_k * y) + round(sum_j comb[j, k] x_j))`` for bf16, the sum over ``j`` in
order (as the old tiled post kernel summed in-thread on sm_90; the one-token form's 4-D product
splits ``j`` over two warps there, ``(p0 + p2) + (p1 + p3)``, so its fp32 sums may round
differently on the GPU; interpreted, every form sums in order and the streams are equal).
"""

import torch
import triton
import triton.language as tl

from sglang_dsv4.kernels.kv_store import round_bf16

__all__ = ["hc_post", "mix_partials", "split_steps"]

_TM, _TM_LARGE = 16, 64  # tokens per tile (64 from 256 tokens: fn re-read per 64 tokens)
# channels per step. Registers: TM x BD / 128 values a thread per stream (8 at 64 x 16: no
# spills); shared memory: the fn tile [64, BD] fp32 per stream, double-buffered, 2 KB x BD
# (16 x 64: 156 KB, one program per SM; 16 x 32: 78 KB)
_BD, _BD_LARGE = 32, 16
_WARPS = 4  # one warpgroup: 8 warps split the wgmma two ways, converting the accumulator
_POST_STEPS = 4  # hc_post alone: steps per program (its loop has no dot, so Triton does not
# software-pipeline its loads: many short programs keep loads in flight instead)
_BE = 128  # d must be a multiple of this (as kernels.mhc checks)


@triton.jit
def _map(ptr, tok, X_BF16: tl.constexpr):
    """One map entry per token ([TM], fp32), rounded to bf16 with bf16 streams
    (``ref.mhc.hc_post`` casts the maps to the streams' dtype)."""
    v = tl.load(ptr, mask=tok, other=0.0)
    if X_BF16:
        v = round_bf16(v)
    return v


@triton.jit
def _post_maps(post_ptr, comb_ptr, t, tok, HC: tl.constexpr, X_BF16: tl.constexpr):
    """Tokens ``t``'s maps as tuples of [TM]: ``post_k`` (hc), ``comb[j, k]`` at ``j*hc + k``."""
    t64 = t.to(tl.int64)
    ps = ()  # tuples grow by concatenation (RUF005): Triton's compiler has no starred unpacking
    for k in tl.static_range(HC):
        ps = ps + (_map(post_ptr + t64 * HC + k, tok, X_BF16),)  # noqa: RUF005
    cs = ()
    for jk in tl.static_range(HC * HC):
        cs = cs + (_map(comb_ptr + t64 * (HC * HC) + jk, tok, X_BF16),)  # noqa: RUF005
    return ps, cs


@triton.jit
def _new_stream(xs, y, ps, cs, k: tl.constexpr, HC: tl.constexpr, X_BF16: tl.constexpr):
    """New stream ``k`` [TM, BD] (fp32 holding stream-dtype values) from the old ones ``xs``
    (tuple of hc [TM, BD], stream dtype) and ``y`` [TM, BD] (fp32): the sum over ``j`` in
    order (module docstring); with bf16 streams every product is exact, so an FMA is too."""
    mixed = cs[k][:, None] * xs[0].to(tl.float32)
    for j in tl.static_range(1, HC):
        mixed = mixed + cs[j * HC + k][:, None] * xs[j].to(tl.float32)
    lifted = ps[k][:, None] * y
    if X_BF16:  # each torch op of the reference rounds
        return round_bf16(round_bf16(lifted) + round_bf16(mixed))
    return lifted + mixed


@triton.jit
def _tf32_split(v):
    """``v`` (fp32) as ``hi + lo``: ``hi`` rounded to tf32's 10 mantissa bits (ties away from
    zero), ``lo`` the exact rest (the tensor cores read its top 10 bits: ~2^-22 relative)."""
    hi = ((v.to(tl.uint32, bitcast=True) + 0x1000) & 0xFFFFE000).to(tl.float32, bitcast=True)
    return hi, v - hi


@triton.jit
def _mix_dot(w, xk, acc, X_BF16: tl.constexpr):
    """``acc + w @ xk^T`` (``w`` [MW, BD] fp32, ``xk`` [TM, BD]) to ~fp32 accuracy as tf32
    products (``tf32x3`` by hand: every product into the one accumulator, no per-dot zeroed
    partial sum and layout change; bf16 streams are exact in tf32, so two products suffice)."""
    w_hi, w_lo = _tf32_split(w)
    if X_BF16:
        x_hi = tl.trans(xk)
    else:
        x_hi, x_lo = _tf32_split(tl.trans(xk))
        acc = tl.dot(w_hi, x_lo, acc, input_precision="tf32")
    acc = tl.dot(w_lo, x_hi, acc, input_precision="tf32")
    return tl.dot(w_hi, x_hi, acc, input_precision="tf32")


@triton.jit
def _post_loads(x_ptr, y_ptr, t64, ok, row, dd, D: tl.constexpr, HC: tl.constexpr):
    """The step's old streams (tuple of hc [TM, BD], stream dtype) and ``y`` [TM, BD] (fp32)."""
    y = tl.load(y_ptr + t64[:, None] * D + dd[None, :], mask=ok, other=0.0).to(tl.float32)
    xs = ()
    for j in tl.static_range(HC):
        xs = xs + (tl.load(x_ptr + row + j * D, mask=ok, other=0.0),)  # noqa: RUF005
    return xs, y


@triton.jit(do_not_specialize=["n_tokens", "per_split"])
def _tile_kernel(
    x_ptr, y_ptr, post_ptr, comb_ptr, out_ptr,  # streams [T, hc, d], [previous block's post]
    fn_ptr, part_ptr, n_tokens, per_split,  # [the mix: weights, partial rows [split, T, NMP]]
    D: tl.constexpr, HC: tl.constexpr, NM: tl.constexpr, NMP: tl.constexpr, MW: tl.constexpr,
    TM: tl.constexpr, BD: tl.constexpr, POST: tl.constexpr, MIX: tl.constexpr,
    X_BF16: tl.constexpr,
):  # fmt: skip
    """Program (token tile, chunk of d): the new streams (``POST``), the partial mix and sum
    of squares (``MIX``; column NM) of the streams (new ones with ``POST``) over the chunk."""
    tile, split = tl.program_id(0), tl.program_id(1)
    t = tile * TM + tl.arange(0, TM)
    tok = t < n_tokens
    t64 = t.to(tl.int64)
    ok = tok[:, None]
    if POST:
        ps, cs = _post_maps(post_ptr, comb_ptr, t, tok, HC, X_BF16)
    m = tl.arange(0, MW)
    w_row = m[:, None] * (HC * D) + tl.arange(0, BD)[None, :]  # [MW, BD]: fn, stream 0
    acc = tl.zeros([MW, TM], tl.float32)  # the mix transposed
    ss = tl.zeros([TM], tl.float32)
    s_lo = split * per_split
    for step in range(s_lo, tl.minimum(s_lo + per_split, D // BD)):
        dd = step * BD + tl.arange(0, BD)
        row = t64[:, None] * (HC * D) + dd[None, :]  # [TM, BD] of stream 0
        if POST:
            xs, y = _post_loads(x_ptr, y_ptr, t64, ok, row, dd, D, HC)
        for k in tl.static_range(HC):
            if POST:
                xk = _new_stream(xs, y, ps, cs, k, HC, X_BF16)
                tl.store(out_ptr + row + k * D, xk, mask=ok)
            else:
                xk = tl.load(x_ptr + row + k * D, mask=ok, other=0.0).to(tl.float32)
            if MIX:
                w = tl.load(fn_ptr + w_row + (k * D + step * BD), (m < NM)[:, None], 0.0)
                ss += tl.sum(xk * xk, axis=1)
                acc = _mix_dot(w, xk, acc, X_BF16)
    if MIX:
        out = tl.where(m[:, None] == NM, ss[None, :], acc)
        prow = split.to(tl.int64) * n_tokens + t
        keep = (m < NMP)[:, None] & tok[None, :]  # [MW, TM]: rows past NMP are padding
        tl.store(part_ptr + prow[None, :] * NMP + m[:, None], out, mask=keep)


def split_steps(steps: int, tiles: int, programs: int) -> tuple[int, int]:
    """(steps per split, splits) spreading ``steps`` over about ``programs // tiles`` splits."""
    per_split = -(-steps // max(1, min(steps, programs // tiles)))
    return per_split, -(-steps // per_split)


def _geometry(n: int, d: int, programs: int | None) -> tuple[int, int, int, int, int]:
    """(tokens per tile, channels per step, tiles, steps per split, splits of d) of a launch
    over ``n`` tokens; ``programs`` None: ``_POST_STEPS`` steps per split."""
    tm, bd = (_TM_LARGE, _BD_LARGE) if n >= 4 * _TM_LARGE else (_TM, _BD)
    n_tiles, steps = -(-n // tm), d // bd
    if programs is None:
        return tm, bd, n_tiles, _POST_STEPS, -(-steps // _POST_STEPS)
    return tm, bd, n_tiles, *split_steps(steps, n_tiles, programs)


def _launch(x, out, post_of, fn, part, nmp: int, programs: int | None) -> None:
    """One :func:`_tile_kernel` launch over ``x`` [T, hc, d] (``fn`` / ``part`` None: no mix;
    pointers a variant does not read are passed as ``x``)."""
    n, hc, d = x.shape
    tm, bd, n_tiles, per_split, n_split = _geometry(n, d, programs)
    y, post, comb = post_of if post_of is not None else (x, x, x)
    _tile_kernel[(n_tiles, n_split)](
        x_ptr=x, y_ptr=y, post_ptr=post, comb_ptr=comb, out_ptr=out,
        fn_ptr=x if fn is None else fn, part_ptr=x if part is None else part,
        n_tokens=n, per_split=per_split, D=d, HC=hc, NM=0 if fn is None else fn.shape[0],
        NMP=nmp, MW=max(64, nmp), TM=tm, BD=bd, POST=post_of is not None, MIX=fn is not None,
        X_BF16=x.dtype == torch.bfloat16, num_warps=_WARPS,
    )  # fmt: skip


def mix_partials(x, fn, programs: int, post_of=None):
    """Streams ``x`` [T, hc, d] (T > 0, contiguous; ``d`` a multiple of 128), ``fn`` [nm, hc*d]
    fp32, optionally ``post_of = (y [T, d], post [T, hc], comb [T, hc, hc])`` of the previous
    block -> ``(streams, part, n_split, NMP)``: the streams the mix ran on (``x`` or the new
    ones) and the partial rows ``part`` [n_split, T, NMP] (columns < nm: ``streams @ fn^T``
    over a chunk of d; column nm: its sum of squares)."""
    n, _, d = x.shape
    nmp = max(16, triton.next_power_of_2(fn.shape[0] + 1))  # + the sum of squares column
    n_split = _geometry(n, d, programs)[4]
    part = torch.empty(n_split * n * nmp, dtype=torch.float32, device=x.device)
    streams = x if post_of is None else torch.empty_like(x)
    post_of = None if post_of is None else tuple(m.contiguous() for m in post_of)
    _launch(x, streams, post_of, fn, part, nmp, programs)
    return streams, part, n_split, nmp


def hc_post(
    y: torch.Tensor,
    x: torch.Tensor,
    post: torch.Tensor,
    comb: torch.Tensor,
) -> torch.Tensor:
    """``ref.mhc.hc_post`` alone: block output ``y`` [T, d], streams ``x`` [T, hc, d], maps
    ``post`` [T, hc] / ``comb`` [T, hc, hc] (fp32) -> new streams [T, hc, d]."""
    n, _, d = x.shape
    out = torch.empty_like(x)
    if n == 0:
        return out
    if d % _BE or not (x.is_contiguous() and y.is_contiguous()):
        raise ValueError(
            f"contiguous streams with d a multiple of {_BE} needed, got {tuple(x.shape)}"
        )
    _launch(x, out, (y, post.contiguous(), comb.contiguous()), None, None, 16, None)
    return out
