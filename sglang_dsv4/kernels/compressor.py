"""Compressor flush of c4 / c128 layers (main and indexer compressors) for a packed batch.

Twin: ``ref.compressor.compress`` per request (its ``CompressorState`` slot layout is the tail
pool's), then the store of ``kv_store``. Inputs per token ``t`` of request ``b`` (positions
``P_b .. P_b + n_b - 1``): ``kv = wkv(x)`` and ``score = wgate(x)`` [T, coff*D] (the GEMMs stay
in torch; ``ape[pos % r]`` is added here). A request completes windows ``P//r .. (P+n)//r - 1``;
entry ``w`` pools (per channel, softmax over slots) the slots of virtual positions
``(w - coff + 1) r + j``, ``j < coff r`` (c4: a-halves ``[:D]`` of window ``w-1``, b-halves
``[D:]`` of window ``w``), each read from the new tokens (``pos >= P``) or the tail
(``pos < P``: tail slot ``pos - (P//r - coff + 1) r``). Then RMSNorm, RoPE at ``w r``, and

* ``out="fp8"``: an FP8 row (``kv_store.FP8RowLayout``), ``"bf16"`` / ``"fp32"``: plain rows;
* ``out="index_fp8"`` / ``"index_fp4"``: Hadamard, then an indexer key (``IndexKeyLayout``).

Entry ``w`` goes to row ``block_table[b, w r // B] * (B / r) + (w r % B) / r`` (B = 128-token
blocks). Afterwards the tail holds the windows ``(P+n)//r - coff + 1 .. (P+n)//r`` (empty slots:
kv 0, score -inf), exactly ``compress``'s ``new_state``.

Grid ``(entry groups, requests)``: program ``(g, b)`` computes entries ``g*EPP ..`` of request
``b``; program ``(0, b)`` also rewrites the tail after its entries (only programs ``(0, b)`` read
the tail: with ``EPP >= 2`` later entries see new tokens only). Decode is the same kernel with one
group: requests whose window does not complete emit nothing (decided on device), so a decode step
needs no host branch and is CUDA-graph capturable. Only tail slots that change are written.

Optional per-request ``tail_mode`` (0 keep, 1 fresh = empty, 2 rebuild = the c4 a-halves of the
``boundary`` rows of ``rebuild_page``), and ``boundary`` output: at every completed window that
ends a block, its a-halves [r, D] (kv, score with ape) go to ``boundary[page]`` (c4), ``page``
read from ``boundary_table`` (same shape as the block table, -1 = do not keep; default: the
block table itself).
"""

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from sglang_dsv4.kernels.kv_store import (
    FP8RowLayout,
    IndexKeyLayout,
    hadamard_rows,
    rms_norm_rows,
    rope_rows,
    store_fp8_rows,
    store_index_keys,
    store_plain_rows,
)

__all__ = ["TAIL_FRESH", "TAIL_KEEP", "TAIL_REBUILD", "CompressorFlush"]

TAIL_KEEP, TAIL_FRESH, TAIL_REBUILD = 0, 1, 2  # values of ``tail_mode``
_KEEP = tl.constexpr(TAIL_KEEP)
_REBUILD = tl.constexpr(TAIL_REBUILD)
_OUTS = ("fp8", "bf16", "fp32", "index_fp8", "index_fp4")


@triton.jit
def _load_slots(
    pos,  # [SC] virtual positions
    ch,  # [SC, CW] channels
    kv_ptr,
    score_ptr,
    in_stride,
    ape_ptr,
    tkv_ptr,  # this request's tail rows
    tsc_ptr,
    bkv_ptr,  # this request's boundary page (REBUILD)
    bsc_ptr,
    P,
    n,
    start,
    state_base,
    mode,
    R: tl.constexpr,
    C: tl.constexpr,
    D: tl.constexpr,
    HAS_MODE: tl.constexpr,
):
    """kv, score [SC, CW] of the slots at ``pos``: new tokens (score + ape), else the tail (or the
    boundary / empty per ``mode``); positions at or past ``P + n`` are empty."""
    new = (pos >= P) & (pos < P + n)
    tok = (start + pos - P).to(tl.int64)
    m_new = new[:, None]
    kv = tl.load(kv_ptr + tok[:, None] * in_stride + ch, m_new, 0.0).to(tl.float32)
    sc = tl.load(score_ptr + tok[:, None] * in_stride + ch, m_new, 0.0).to(tl.float32)
    sc += tl.load(ape_ptr + (pos % R)[:, None] * C + ch, m_new, 0.0).to(tl.float32)
    sidx = pos - state_base
    old = pos < P
    if HAS_MODE:
        from_tail = old & (mode == _KEEP)
        from_bnd = (old & (mode == _REBUILD) & (sidx < R))[:, None] & (ch < D)
        bkv = tl.load(bkv_ptr + sidx[:, None] * D + ch, from_bnd, 0.0)
        bsc = tl.load(bsc_ptr + sidx[:, None] * D + ch, from_bnd, float("-inf"))
    else:
        from_tail = old
    m_old = from_tail[:, None]
    tkv = tl.load(tkv_ptr + sidx[:, None] * C + ch, m_old, 0.0)
    tsc = tl.load(tsc_ptr + sidx[:, None] * C + ch, m_old, float("-inf"))
    if HAS_MODE:
        tkv = tl.where(from_bnd, bkv, tkv)
        tsc = tl.where(from_bnd, bsc, tsc)
    return tl.where(m_new, kv, tkv), tl.where(m_new, sc, tsc)


@triton.jit
def _pool_entry(w, cols, kv_ptr, score_ptr, in_stride, ape_ptr, tkv_ptr, tsc_ptr, bkv_ptr, bsc_ptr,
                P, n, start, state_base, mode, R: tl.constexpr, COFF: tl.constexpr,
                D: tl.constexpr, SC: tl.constexpr, HAS_MODE: tl.constexpr):  # fmt: skip
    """Entry ``w`` before its norm, [D] fp32: per channel, the softmax over the window's
    ``COFF*R`` slots of their scores, weighting their kv; ``SC`` slots at a time (registers)."""
    C: tl.constexpr = COFF * D
    S: tl.constexpr = COFF * R
    if S == SC:  # one chunk: the softmax of the reference, term by term
        j = tl.arange(0, SC)
        ch = (j // R * D)[:, None] + cols[None, :]
        kv, sc = _load_slots(
            (w - COFF + 1) * R + j, ch, kv_ptr, score_ptr, in_stride, ape_ptr, tkv_ptr,
            tsc_ptr, bkv_ptr, bsc_ptr, P, n, start, state_base, mode, R, C, D, HAS_MODE,
        )  # fmt: skip
        p = tl.exp(sc - tl.max(sc, axis=0)[None, :])
        pooled = tl.sum(kv * (p / tl.sum(p, axis=0)[None, :]), axis=0)
    else:  # online softmax over slot chunks (a complete window: no column is all -inf)
        m = tl.full([D], float("-inf"), tl.float32)
        den = tl.zeros([D], tl.float32)
        acc = tl.zeros([D], tl.float32)
        for j0 in tl.static_range(0, S, SC):
            j = j0 + tl.arange(0, SC)
            ch = (j // R * D)[:, None] + cols[None, :]
            kv, sc = _load_slots(
                (w - COFF + 1) * R + j, ch, kv_ptr, score_ptr, in_stride, ape_ptr, tkv_ptr,
                tsc_ptr, bkv_ptr, bsc_ptr, P, n, start, state_base, mode, R, C, D, HAS_MODE,
            )  # fmt: skip
            m_new = tl.maximum(m, tl.max(sc, axis=0))
            alpha = tl.exp(m - m_new)
            p = tl.exp(sc - m_new[None, :])
            den = den * alpha + tl.sum(p, axis=0)
            acc = acc * alpha + tl.sum(p * kv, axis=0)
            m = m_new
        pooled = acc / den
    return pooled


@triton.jit
def _store_entry(pooled, w, b, norm_ptr, inv_freq_ptr, bt_ptr, bt_stride, out_ptr, eps,
                 R: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr, OUT: tl.constexpr,
                 LOG2D: tl.constexpr, RPP: tl.constexpr, PAGE: tl.constexpr):  # fmt: skip
    """RMSNorm and RoPE (at position ``w R``) of entry ``w``, stored in the cache's format (OUT,
    see ``_OUTS``) at its row under request ``b``'s block table (a page < 0 drops it)."""
    y = rms_norm_rows(pooled[None, :], norm_ptr, eps, D, False, False)
    y = rope_rows(y, tl.full([1], 0, tl.int32) + w * R, inv_freq_ptr, 1, D, False)
    page = tl.load(bt_ptr + b * bt_stride + (w * R) // BLOCK).to(tl.int64)
    row = tl.full([1], 0, tl.int64) + page * (BLOCK // R) + (w * R % BLOCK) // R
    ok = row >= 0
    if OUT == 0:
        store_fp8_rows(out_ptr, row, ok, y, 1, D, RPP, PAGE)
    elif OUT <= 2:
        store_plain_rows(out_ptr, row, ok, y, D, OUT == 1, D)
    else:
        y = hadamard_rows(y, 1, D, LOG2D)
        store_index_keys(out_ptr, row, ok, y, 1, D, OUT == 4, RPP)


@triton.jit
def _keep_a_halves(w, b, cols, bnd_bt_ptr, bnd_bt_stride, kv_ptr, score_ptr, in_stride, ape_ptr,
                   tkv_ptr, tsc_ptr, bkv_ptr, bsc_ptr, bnd_kv_ptr, bnd_score_ptr, P, n, start,
                   state_base, mode, R: tl.constexpr, C: tl.constexpr, D: tl.constexpr,
                   BLOCK: tl.constexpr, HAS_MODE: tl.constexpr):  # fmt: skip
    """Window ``w`` ends a block: its a-halves [R, D] (kv, score with ape) go to the boundary page
    of that block, from which a later request sharing the block as a cached prefix rebuilds the
    c4 tail (``tail_mode`` rebuild)."""
    bpage = tl.load(bnd_bt_ptr + b * bnd_bt_stride + (w * R) // BLOCK).to(tl.int64)
    j = tl.arange(0, R)
    ch = cols[None, :] + 0 * j[:, None]
    akv, asc = _load_slots(
        w * R + j, ch, kv_ptr, score_ptr, in_stride, ape_ptr, tkv_ptr, tsc_ptr,
        bkv_ptr, bsc_ptr, P, n, start, state_base, mode, R, C, D, HAS_MODE,
    )  # fmt: skip
    boff = tl.maximum(bpage, 0) * (R * D) + j[:, None] * D + cols[None, :]
    keep = (bpage >= 0) & (ch >= 0)  # [R, D]
    tl.store(bnd_kv_ptr + boff, akv, keep)
    tl.store(bnd_score_ptr + boff, asc, keep)


@triton.jit
def _rewrite_tail(first, end, kv_ptr, score_ptr, in_stride, ape_ptr, tkv_ptr, tsc_ptr, bkv_ptr,
                  bsc_ptr, P, n, start, state_base, mode, R: tl.constexpr, COFF: tl.constexpr,
                  C: tl.constexpr, D: tl.constexpr, TSC: tl.constexpr, TCC: tl.constexpr,
                  HAS_MODE: tl.constexpr):  # fmt: skip
    """The tail after this step: the slots of windows ``end - COFF + 1 .. end``, ``TSC`` slots x
    ``TCC`` channels at a time. Only the new tokens' slots change unless a window completed or
    the mode replaces the tail."""
    S: tl.constexpr = COFF * R
    qbase = (end - COFF + 1) * R  # position of new slot 0
    rewrite = end != first
    if HAS_MODE:
        rewrite = rewrite | (mode != _KEEP)
    lo = tl.where(rewrite, 0, P - qbase)  # else only the new tokens' slots change
    hi = tl.where(rewrite, S, P + n - qbase)
    for s0 in range(lo // TSC * TSC, hi, TSC):
        s = s0 + tl.arange(0, TSC)
        write = ((s >= lo) & (s < hi))[:, None]
        for c0 in tl.static_range(0, C, TCC):
            ch = c0 + tl.arange(0, TCC)[None, :] + 0 * s[:, None]
            kv, sc = _load_slots(
                qbase + s, ch, kv_ptr, score_ptr, in_stride, ape_ptr, tkv_ptr, tsc_ptr,
                bkv_ptr, bsc_ptr, P, n, start, state_base, mode, R, C, D, HAS_MODE,
            )  # fmt: skip
            tl.debug_barrier()  # slot s may be read (as s + r) by another warp
            off = s[:, None] * C + ch
            tl.store(tkv_ptr + off, kv, write)
            tl.store(tsc_ptr + off, sc, write)
            tl.debug_barrier()


@triton.jit(do_not_specialize=["bt_stride", "bnd_bt_stride"])
def _flush_kernel(
    kv_ptr,
    score_ptr,
    in_stride,
    ape_ptr,
    norm_ptr,
    inv_freq_ptr,
    tail_kv_ptr,
    tail_score_ptr,
    req_slot_ptr,
    prefix_ptr,
    cu_ptr,
    mode_ptr,
    rebuild_ptr,
    bnd_kv_ptr,
    bnd_score_ptr,
    bt_ptr,
    bt_stride,
    bnd_bt_ptr,
    bnd_bt_stride,
    out_ptr,
    eps,
    R: tl.constexpr,
    COFF: tl.constexpr,
    D: tl.constexpr,
    BLOCK: tl.constexpr,
    EPP: tl.constexpr,
    SC: tl.constexpr,  # slots per pooling chunk
    TSC: tl.constexpr,  # slots per tail chunk
    TCC: tl.constexpr,  # channels per tail chunk
    OUT: tl.constexpr,  # index into _OUTS
    LOG2D: tl.constexpr,
    RPP: tl.constexpr,
    PAGE: tl.constexpr,
    HAS_MODE: tl.constexpr,
    HAS_BOUNDARY: tl.constexpr,
):
    C: tl.constexpr = COFF * D
    S: tl.constexpr = COFF * R
    g = tl.program_id(0)
    b = tl.program_id(1)
    P = tl.load(prefix_ptr + b)
    start = tl.load(cu_ptr + b)
    n = tl.load(cu_ptr + b + 1) - start
    slot = tl.load(req_slot_ptr + b).to(tl.int64)
    mode = tl.load(mode_ptr + b) if HAS_MODE else 0
    page_r = tl.load(rebuild_ptr + b).to(tl.int64) if HAS_MODE else 0
    tkv_ptr = tail_kv_ptr + slot * (S * C)
    tsc_ptr = tail_score_ptr + slot * (S * C)
    bkv_ptr = bnd_kv_ptr + tl.maximum(page_r, 0) * (R * D)
    bsc_ptr = bnd_score_ptr + tl.maximum(page_r, 0) * (R * D)
    first = P // R
    end = (P + n) // R
    state_base = (first - COFF + 1) * R
    cols = tl.arange(0, D)

    for e in range(g * EPP, tl.minimum(g * EPP + EPP, end - first)):
        w = first + e
        pooled = _pool_entry(
            w, cols, kv_ptr, score_ptr, in_stride, ape_ptr, tkv_ptr, tsc_ptr, bkv_ptr, bsc_ptr, P,
            n, start, state_base, mode, R, COFF, D, SC, HAS_MODE,
        )  # fmt: skip
        _store_entry(
            pooled, w, b, norm_ptr, inv_freq_ptr, bt_ptr, bt_stride, out_ptr, eps, R, D, BLOCK, OUT,
            LOG2D, RPP, PAGE,
        )  # fmt: skip
        if HAS_BOUNDARY:  # noqa: SIM102 (a constexpr test cannot join a run-time one)
            if ((w + 1) * R) % BLOCK == 0:  # this window ends a block: keep its a-halves
                _keep_a_halves(
                    w, b, cols, bnd_bt_ptr, bnd_bt_stride, kv_ptr, score_ptr, in_stride, ape_ptr,
                    tkv_ptr, tsc_ptr, bkv_ptr, bsc_ptr, bnd_kv_ptr, bnd_score_ptr, P, n, start,
                    state_base, mode, R, C, D, BLOCK, HAS_MODE,
                )  # fmt: skip

    if g == 0:
        tl.debug_barrier()  # this program's entries read the tail it now rewrites
        _rewrite_tail(
            first, end, kv_ptr, score_ptr, in_stride, ape_ptr, tkv_ptr, tsc_ptr, bkv_ptr, bsc_ptr,
            P, n, start, state_base, mode, R, COFF, C, D, TSC, TCC, HAS_MODE,
        )  # fmt: skip


class CompressorFlush:
    """One compressor (main c4 / c128, or a c4 indexer compressor) of one layer kind.

    ``plan()`` once per batch (host ints only), ``run()`` per layer (launch only).
    """

    def __init__(
        self,
        ratio: int,
        head_dim: int,
        out: str = "fp8",
        *,
        layout: FP8RowLayout | IndexKeyLayout | None = None,
        block_size: int = 128,
        norm_eps: float = 1e-6,
    ):
        if out not in _OUTS:
            raise ValueError(f"out {out!r}: one of {_OUTS}")
        if head_dim % 64 or head_dim & (head_dim - 1):
            raise ValueError(f"head dim {head_dim}: a power of 2 with 64 RoPE channels")
        if block_size % ratio:
            raise ValueError(f"block {block_size} is not a multiple of the ratio {ratio}")
        self.ratio, self.head_dim, self.out = ratio, head_dim, out
        self.coff = 2 if ratio == 4 else 1
        self.block_size, self.norm_eps = block_size, norm_eps
        if out == "fp8":
            layout = layout or FP8RowLayout.rows(head_dim)
            if layout.head_dim != head_dim:
                raise ValueError(f"layout {layout} does not hold rows of {head_dim} channels")
            self._rpp, self._page = layout.rows_per_page, layout.page_bytes
        elif out.startswith("index"):
            fmt = out.split("_")[1]
            layout = layout or IndexKeyLayout(fmt, head_dim=head_dim)
            if layout.fmt != fmt or layout.head_dim != head_dim:
                raise ValueError(f"layout {layout} does not hold {fmt} keys of {head_dim} dims")
            self._rpp, self._page = layout.rows_per_page, layout.page_bytes
        else:
            self._rpp, self._page = 1, 1
        self.layout = layout
        slots = self.coff * ratio
        self._sc = slots if slots <= 8 else 16  # pooling chunk
        self._epp = 4 if self.coff == 2 else 1  # c4 needs >= 2 (see module docstring)
        self._tsc = min(slots, 16)
        self._tcc = min(self.coff * head_dim, 256)
        self._grid: tuple[int, int] | None = None

    def plan(self, prefix_lens: Sequence[int], extend_lens: Sequence[int]) -> None:
        """Host lengths of the batch (``P_b``, ``n_b``): sizes the grid to the most entries any
        request completes. A decode batch of ``B`` requests: ``plan([...], [1] * B)`` or
        :meth:`plan_decode`."""
        r = self.ratio
        most = max(((p + n) // r - p // r for p, n in zip(prefix_lens, extend_lens, strict=True)),
                   default=0)  # fmt: skip
        self._grid = (max(1, triton.cdiv(most, self._epp)), len(prefix_lens))

    def plan_decode(self, batch_size: int) -> None:
        """One token per request: at most one entry each (capturable for any positions)."""
        self._grid = (1, batch_size)

    def run(
        self,
        kv: torch.Tensor,
        score: torch.Tensor,
        ape: torch.Tensor,
        norm_weight: torch.Tensor,
        inv_freq: torch.Tensor,
        tail_kv: torch.Tensor,
        tail_score: torch.Tensor,
        req_slots: torch.Tensor,
        prefix_lens: torch.Tensor,
        cu_seqlens: torch.Tensor,
        block_table: torch.Tensor,
        out: torch.Tensor,
        tail_mode: torch.Tensor | None = None,
        rebuild_page: torch.Tensor | None = None,
        boundary: tuple[torch.Tensor, torch.Tensor] | None = None,
        boundary_table: torch.Tensor | None = None,
    ) -> None:
        """Flush the batch's compressor.

        ``kv``, ``score`` [T, coff*D] fp32 / bf16 (``wkv(x)``, ``wgate(x)`` without ``ape``);
        ``ape`` [r, coff*D] and ``norm_weight`` [D] fp32 or bf16 (widened to fp32 as loaded:
        the model's bf16 weights need no cast); ``inv_freq`` [32] fp32;
        state ``tail_kv`` / ``tail_score`` [n_req_slots, coff*r, coff*D] fp32 (updated in place);
        per request [B] int32: ``req_slots`` (tail row), ``prefix_lens`` (P); ``cu_seqlens``
        [B+1] int32 token offsets; ``block_table`` [B, max_blocks] int32 (pages of
        ``block_size`` tokens); ``out``: the entry cache (uint8 for FP8 rows / indexer keys, else
        bf16 / fp32 rows [n_rows, D]), written at the entries' rows. ``tail_mode`` /
        ``rebuild_page`` [B] int32 and ``boundary`` = (kv, score) [n_blocks, r, D] fp32 (state,
        updated) are optional (see module docstring); ``boundary_table`` [B, max_blocks] int32
        names the boundary page of each block (-1 = none; default ``block_table``).
        """
        self._check_shapes(kv, score, tail_kv)
        d = self.head_dim
        has_mode = tail_mode is not None
        if has_mode and rebuild_page is None:
            raise ValueError("tail_mode needs rebuild_page")
        bkv, bsc = boundary if boundary is not None else (tail_kv, tail_score)
        bnd_table = block_table if boundary_table is None else boundary_table
        _flush_kernel[self._grid](
            kv_ptr=kv,
            score_ptr=score,
            in_stride=kv.stride(0),
            ape_ptr=ape,
            norm_ptr=norm_weight,
            inv_freq_ptr=inv_freq,
            tail_kv_ptr=tail_kv,
            tail_score_ptr=tail_score,
            req_slot_ptr=req_slots,
            prefix_ptr=prefix_lens,
            cu_ptr=cu_seqlens,
            # Without a mode the kernel reads neither: any int32 tensor stands in for the pointer.
            mode_ptr=tail_mode if has_mode else req_slots,
            rebuild_ptr=rebuild_page if has_mode else req_slots,
            bnd_kv_ptr=bkv,
            bnd_score_ptr=bsc,
            bt_ptr=block_table,
            bt_stride=block_table.stride(0),
            bnd_bt_ptr=bnd_table,
            bnd_bt_stride=bnd_table.stride(0),
            out_ptr=out,
            eps=self.norm_eps,
            R=self.ratio,
            COFF=self.coff,
            D=d,
            BLOCK=self.block_size,
            EPP=self._epp,
            SC=self._sc,
            TSC=self._tsc,
            TCC=self._tcc,
            OUT=_OUTS.index(self.out),
            LOG2D=d.bit_length() - 1,
            RPP=self._rpp,
            PAGE=self._page,
            HAS_MODE=has_mode,
            HAS_BOUNDARY=boundary is not None,
            num_warps=8 if self.coff * self.ratio > 8 else 4,
            enable_fp_fusion=False,
        )

    def _check_shapes(self, kv: torch.Tensor, score: torch.Tensor, tail_kv: torch.Tensor) -> None:
        """What the kernel assumes but cannot check: a plan, one row stride shared by ``kv`` and
        ``score`` (it takes one), and contiguous tail rows of ``coff*r`` slots x ``coff*D``."""
        if self._grid is None:
            raise RuntimeError("plan() before run()")
        c = self.coff * self.head_dim
        if kv.shape[-1] != c or score.shape != kv.shape or kv.stride() != score.stride():
            raise ValueError(f"kv / score must be matching [T, {c}] tensors")
        if tail_kv.shape[1:] != (self.coff * self.ratio, c) or not tail_kv.is_contiguous():
            raise ValueError(f"tail must be contiguous [n, {self.coff * self.ratio}, {c}]")
