"""Routed (+ shared) experts of one layer, grouped, for dense (bf16 / fp32) and FP8 banks.

A bank holds every expert of a layer stacked at load (:mod:`sglang_dsv4.model.experts`):
``w13`` [R, 2I, d] (rows ``[0, I)`` are w1, ``[I, 2I)`` w3) and ``w2`` [R, d, I]; FP8 banks are
e4m3 with e8m0 128x128 block scales ``s13`` [R, 2 ceil(I/128), ceil(d/128)] (w3's scale rows
start at ``ceil(I/128)``) and ``s2`` [R, ceil(d/128), ceil(I/128)]. ``R`` is ``E`` routed
experts, plus one when the shared expert is stored as row ``E`` (``shared_row``): it then runs as
one more slot of every token, with weight 1.

Each expert computes ``w2(silu(min(w1 x, L)) * clamp(w3 x, -L, L))`` with fp32 accumulation; the
clamp + SwiGLU is the epilogue of the w1/w3 GEMM (one pass over ``w13``), the routing weight the
epilogue of w2. Two forms, both free of host syncs and data-dependent shapes (CUDA-graph safe):

* :func:`moe_experts_slots` (decode, small T): a program per (token slot, N tile) reads only its
  chosen expert's rows, as a GEMV; a second kernel per (token, d tile) sums the token's slots
  through w2. Two launches, and only the chosen experts' weights are read.
* :func:`moe_experts_sorted` (prefill, large T): (token, slot) pairs sorted by expert; each
  program owns an M block of one expert (blocks found in-kernel from the group offsets) and runs
  ``tl.dot`` tiles, so each expert's weights are read once per block row.

Twin: :class:`sglang_dsv4.ref.moe.DenseExperts` and :func:`sglang_dsv4.ref.moe.swiglu`.
"""

from typing import NamedTuple

import torch
import triton
import triton.language as tl

__all__ = ["ExpertWeights", "moe_experts_slots", "moe_experts_sorted"]


class ExpertWeights(NamedTuple):
    """One layer's bank (module docstring): ``w13`` [R, 2I, d], ``w2`` [R, d, I]; ``s13`` /
    ``s2`` the e8m0 scales of an FP8 bank (None when dense)."""

    w13: torch.Tensor
    w2: torch.Tensor
    s13: torch.Tensor | None = None
    s2: torch.Tensor | None = None

    @property
    def fp8(self) -> bool:
        return self.w13.dtype == torch.float8_e4m3fn

    def check(self, d: int) -> None:
        r, two_i, d_ = self.w13.shape
        if d_ != d or two_i % 2 or tuple(self.w2.shape) != (r, d, two_i // 2):
            raise ValueError(
                f"bank w13 {tuple(self.w13.shape)}, w2 {tuple(self.w2.shape)} for d = {d}"
            )
        if self.fp8 and (self.s13 is None or self.s2 is None):
            raise ValueError("an FP8 bank needs its scales s13 / s2")


def _scales(bank: ExpertWeights) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale operands as bytes (a dense bank passes its weights: never read)."""
    if bank.fp8:
        return bank.s13.view(torch.uint8), bank.s2.view(torch.uint8)
    return bank.w13, bank.w2


@triton.jit
def _block_scale(s_ptr, rows, n_ok, k0, stride_sn):
    """fp32 e8m0 scale [BLOCK_N] of weight rows ``rows`` at K offset ``k0`` (128x128 blocks)."""
    b = tl.load(s_ptr + (rows // 128) * stride_sn + k0 // 128, mask=n_ok, other=127)
    return tl.exp2(b.to(tl.float32) - 127.0)


@triton.jit
def _swiglu(g, u, limit):
    g = tl.minimum(g, limit)
    u = tl.minimum(tl.maximum(u, -limit), limit)
    return g * tl.sigmoid(g) * u


@triton.jit
def _slot_expert(chosen_ptr, t, j, shared_row, TOPK: tl.constexpr):
    """Bank row of slot ``j`` of token ``t``: its chosen expert, or the shared row past top-k."""
    e = tl.load(chosen_ptr + t * TOPK + j, mask=j < TOPK, other=0)
    return tl.where(j < TOPK, e, shared_row).to(tl.int64)


@triton.jit
def _slot_w13_kernel(x_ptr, chosen_ptr, w_ptr, s_ptr, h_ptr, D, I, limit, shared_row, s_up,
                     stride_xt, stride_we, stride_wn, stride_se, stride_sn,
                     TOPK: tl.constexpr, SLOTS: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, FP8: tl.constexpr):  # fmt: skip
    p = tl.program_id(0)  # token slot: t * SLOTS + j
    t = p // SLOTS
    e = _slot_expert(chosen_ptr, t, p % SLOTS, shared_row, TOPK)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < I
    w_e = w_ptr + e * stride_we
    s_e = s_ptr + e * stride_se
    acc_g = tl.zeros((BLOCK_N,), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < D
        x = tl.load(x_ptr + t * stride_xt + offs_k, mask=k_ok, other=0.0).to(tl.float32)
        ok = n_ok[:, None] & k_ok[None, :]
        ptr = w_e + offs_n[:, None] * stride_wn + offs_k[None, :]
        wg = tl.load(ptr, mask=ok, other=0.0).to(tl.float32)
        wu = tl.load(ptr + I * stride_wn, mask=ok, other=0.0).to(tl.float32)
        pg = tl.sum(wg * x[None, :], axis=1)
        pu = tl.sum(wu * x[None, :], axis=1)
        if FP8:
            pg *= _block_scale(s_e, offs_n, n_ok, k0, stride_sn)
            pu *= _block_scale(s_e + s_up * stride_sn, offs_n, n_ok, k0, stride_sn)
        acc_g += pg
        acc_u += pu
    h = _swiglu(acc_g, acc_u, limit)
    tl.store(h_ptr + p * I + offs_n, h.to(h_ptr.dtype.element_ty), mask=n_ok)


@triton.jit
def _slot_w2_kernel(h_ptr, chosen_ptr, weights_ptr, w_ptr, s_ptr, out_ptr, D, I, shared_row,
                    stride_we, stride_wn, stride_se, stride_sn, stride_ot,
                    TOPK: tl.constexpr, SLOTS: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr, FP8: tl.constexpr):  # fmt: skip
    t = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < D
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for j in tl.static_range(SLOTS):  # j is a compile-time constant: one branch is built
        if j < TOPK:
            e = tl.load(chosen_ptr + t * TOPK + j).to(tl.int64)
            wt = tl.load(weights_ptr + t * TOPK + j)
        else:  # the shared expert, weight 1
            e = tl.zeros((), dtype=tl.int64) + shared_row
            wt = 1.0
        w_e = w_ptr + e * stride_we
        s_e = s_ptr + e * stride_se
        part = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for k0 in range(0, I, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_ok = offs_k < I
            h = tl.load(h_ptr + (t * SLOTS + j) * I + offs_k, mask=k_ok, other=0.0)
            w = tl.load(
                w_e + offs_n[:, None] * stride_wn + offs_k[None, :],
                mask=n_ok[:, None] & k_ok[None, :],
                other=0.0,
            )
            pw = tl.sum(w.to(tl.float32) * h.to(tl.float32)[None, :], axis=1)
            if FP8:
                pw *= _block_scale(s_e, offs_n, n_ok, k0, stride_sn)
            part += pw
        acc += part * wt
    tl.store(out_ptr + t * stride_ot + offs_n, acc.to(out_ptr.dtype.element_ty), mask=n_ok)


def _slot_tiles(t: int) -> int:
    """BLOCK_N of the slot kernels: narrow tiles at batch 1 so that a few experts still fill the
    GPU with programs (a guess until bench_moe.py measures it)."""
    return 16 if t <= 2 else 32


def moe_experts_slots(
    x: torch.Tensor,
    chosen: torch.Tensor,
    weights: torch.Tensor,
    bank: ExpertWeights,
    limit: float,
    shared_row: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x`` [T, d], ``chosen`` int [T, k], ``weights`` [T, k] -> [T, d] in x's dtype (into
    ``out`` when given): the sum over slots of weight * expert(x), plus the shared expert when
    ``shared_row`` is given."""
    t, d = x.shape
    bank.check(d)
    topk = chosen.shape[1]
    inter = bank.w2.shape[2]
    slots = topk + (shared_row is not None)
    x, chosen, weights = x.contiguous(), chosen.contiguous(), weights.float().contiguous()
    h = torch.empty(t * slots, inter, dtype=x.dtype, device=x.device)  # [T * S, I]
    out = torch.empty(t, d, dtype=x.dtype, device=x.device) if out is None else out
    if t == 0:
        return out
    s13, s2 = _scales(bank)
    block_n = _slot_tiles(t)
    row = -1 if shared_row is None else shared_row
    _slot_w13_kernel[(t * slots, triton.cdiv(inter, block_n))](
        x_ptr=x, chosen_ptr=chosen, w_ptr=bank.w13, s_ptr=s13, h_ptr=h, D=d, I=inter,
        limit=float(limit), shared_row=row, s_up=triton.cdiv(inter, 128),
        stride_xt=x.stride(0), stride_we=bank.w13.stride(0), stride_wn=bank.w13.stride(1),
        stride_se=s13.stride(0), stride_sn=s13.stride(1), TOPK=topk, SLOTS=slots,
        BLOCK_N=block_n, BLOCK_K=128, FP8=bank.fp8, num_warps=4,
    )  # fmt: skip
    _slot_w2_kernel[(t, triton.cdiv(d, block_n))](
        h_ptr=h, chosen_ptr=chosen, weights_ptr=weights, w_ptr=bank.w2, s_ptr=s2, out_ptr=out,
        D=d, I=inter, shared_row=row, stride_we=bank.w2.stride(0), stride_wn=bank.w2.stride(1),
        stride_se=s2.stride(0), stride_sn=s2.stride(1), stride_ot=out.stride(0), TOPK=topk,
        SLOTS=slots, BLOCK_N=block_n, BLOCK_K=128, FP8=bank.fp8, num_warps=4,
    )  # fmt: skip
    return out


@triton.jit
def _expert_block(off_ptr, R, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr):
    """(expert, first row, end row) of this program's M block; expert R: no block (the grid
    covers the most blocks any routing can need). Expert r's rows are off[r]:off[r+1] of the
    sorted pairs, split into ceil(rows / BLOCK_M) blocks, blocks of experts in order."""
    pid = tl.program_id(0)
    offs_r = tl.arange(0, BLOCK_R)
    r_ok = offs_r < R
    lo = tl.load(off_ptr + offs_r, mask=r_ok, other=0)
    hi = tl.load(off_ptr + offs_r + 1, mask=r_ok, other=0)
    nb = (hi - lo + BLOCK_M - 1) // BLOCK_M
    cum = tl.cumsum(nb, axis=0)  # blocks up to and including expert r
    e = tl.sum((cum <= pid).to(tl.int32), axis=0)
    this = offs_r == e
    first = tl.sum(tl.where(this, cum - nb, 0), axis=0)
    row0 = tl.sum(tl.where(this, lo, 0), axis=0) + (pid - first) * BLOCK_M
    end = tl.sum(tl.where(this, hi, 0), axis=0)
    return e, row0, end


@triton.jit
def _dot(a, w, IEEE: tl.constexpr):
    """a [M, K] @ w [N, K].T in fp32."""
    if IEEE:
        return tl.dot(a, tl.trans(w.to(a.dtype)), input_precision="ieee")
    return tl.dot(a, tl.trans(w.to(a.dtype)))


@triton.jit
def _sorted_w13_kernel(x_ptr, order_ptr, off_ptr, w_ptr, s_ptr, h_ptr, R, D, I, limit, s_up,
                       stride_xt, stride_we, stride_wn, stride_se, stride_sn,
                       SLOTS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, FP8: tl.constexpr,
                       IEEE: tl.constexpr):  # fmt: skip
    e, row0, end = _expert_block(off_ptr, R, BLOCK_M, BLOCK_R)
    if e >= R:
        return
    rows = row0 + tl.arange(0, BLOCK_M)
    m_ok = rows < end
    tok = tl.load(order_ptr + rows, mask=m_ok, other=0) // SLOTS
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < I
    w_e = w_ptr + e.to(tl.int64) * stride_we
    s_e = s_ptr + e.to(tl.int64) * stride_se
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < D
        a = tl.load(
            x_ptr + tok[:, None].to(tl.int64) * stride_xt + offs_k[None, :],
            mask=m_ok[:, None] & k_ok[None, :],
            other=0.0,
        )
        ok = n_ok[:, None] & k_ok[None, :]
        ptr = w_e + offs_n[:, None] * stride_wn + offs_k[None, :]
        pg = _dot(a, tl.load(ptr, mask=ok, other=0.0), IEEE)
        pu = _dot(a, tl.load(ptr + I * stride_wn, mask=ok, other=0.0), IEEE)
        if FP8:
            pg *= _block_scale(s_e, offs_n, n_ok, k0, stride_sn)[None, :]
            pu *= _block_scale(s_e + s_up * stride_sn, offs_n, n_ok, k0, stride_sn)[None, :]
        acc_g += pg
        acc_u += pu
    h = _swiglu(acc_g, acc_u, limit)
    tl.store(
        h_ptr + rows[:, None].to(tl.int64) * I + offs_n[None, :],
        h.to(h_ptr.dtype.element_ty),
        mask=m_ok[:, None] & n_ok[None, :],
    )


@triton.jit
def _sorted_w2_kernel(h_ptr, order_ptr, off_ptr, weights_ptr, w_ptr, s_ptr, y_ptr, R, D, I,
                      stride_we, stride_wn, stride_se, stride_sn,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      BLOCK_R: tl.constexpr, FP8: tl.constexpr, IEEE: tl.constexpr):  # fmt: skip
    e, row0, end = _expert_block(off_ptr, R, BLOCK_M, BLOCK_R)
    if e >= R:
        return
    rows = row0 + tl.arange(0, BLOCK_M)
    m_ok = rows < end
    pair = tl.load(order_ptr + rows, mask=m_ok, other=0).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < D
    w_e = w_ptr + e.to(tl.int64) * stride_we
    s_e = s_ptr + e.to(tl.int64) * stride_se
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, I, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < I
        a = tl.load(
            h_ptr + rows[:, None].to(tl.int64) * I + offs_k[None, :],
            mask=m_ok[:, None] & k_ok[None, :],
            other=0.0,
        )
        w = tl.load(
            w_e + offs_n[:, None] * stride_wn + offs_k[None, :],
            mask=n_ok[:, None] & k_ok[None, :],
            other=0.0,
        )
        part = _dot(a, w, IEEE)
        if FP8:
            part *= _block_scale(s_e, offs_n, n_ok, k0, stride_sn)[None, :]
        acc += part
    wt = tl.load(weights_ptr + pair, mask=m_ok, other=0.0)
    tl.store(
        y_ptr + pair[:, None] * D + offs_n[None, :],
        acc * wt[:, None],
        mask=m_ok[:, None] & n_ok[None, :],
    )  # row of the pair in token order: the slot sum needs no inverse permutation


def _sorted_tiles(pairs: int) -> tuple[int, int]:
    """(BLOCK_M, warps) of the sorted kernels by the number of (token, slot) pairs."""
    if pairs <= 512:
        return 16, 4
    return (32, 4) if pairs <= 4096 else (64, 4)


def moe_experts_sorted(
    x: torch.Tensor,
    chosen: torch.Tensor,
    weights: torch.Tensor,
    bank: ExpertWeights,
    limit: float,
    shared_row: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """As :func:`moe_experts_slots`, as a sorted grouped GEMM (module docstring)."""
    t, d = x.shape
    bank.check(d)
    n_rows = bank.w13.shape[0]
    inter = bank.w2.shape[2]
    x, weights = x.contiguous(), weights.float()
    chosen = chosen.long()
    if shared_row is not None:  # the shared expert: one more slot of every token, weight 1
        chosen = torch.cat([chosen, chosen.new_full((t, 1), shared_row)], dim=1)
        weights = torch.cat([weights, weights.new_ones(t, 1)], dim=1)
    slots = chosen.shape[1]
    pairs = t * slots
    out = torch.empty(t, d, dtype=x.dtype, device=x.device) if out is None else out
    if t == 0:
        return out
    # pairs grouped by expert; group r starts at the first sorted id >= r (searchsorted, not
    # bincount: bincount sizes its output from the data and syncs)
    sorted_ids, order = torch.sort(chosen.reshape(-1), stable=True)  # [P]
    bounds = torch.arange(n_rows + 1, device=x.device, dtype=sorted_ids.dtype)
    offsets = torch.searchsorted(sorted_ids, bounds).to(torch.int32)  # [R + 1]
    order = order.to(torch.int32)
    h = torch.empty(pairs, inter, dtype=x.dtype, device=x.device)  # [P, I], sorted order
    y = torch.empty(pairs, d, dtype=torch.float32, device=x.device)  # [P, d], token order
    s13, s2 = _scales(bank)
    block_m, warps = _sorted_tiles(pairs)
    blocks = triton.cdiv(pairs, block_m) + n_rows
    common = dict(
        order_ptr=order, off_ptr=offsets, R=n_rows, D=d, I=inter, BLOCK_M=block_m,
        BLOCK_R=triton.next_power_of_2(n_rows + 1), FP8=bank.fp8,
        IEEE=x.dtype == torch.float32, num_warps=warps, num_stages=3,
    )  # fmt: skip
    _sorted_w13_kernel[(blocks, triton.cdiv(inter, 64))](
        x_ptr=x, w_ptr=bank.w13, s_ptr=s13, h_ptr=h, limit=float(limit),
        s_up=triton.cdiv(inter, 128), stride_xt=x.stride(0), stride_we=bank.w13.stride(0),
        stride_wn=bank.w13.stride(1), stride_se=s13.stride(0), stride_sn=s13.stride(1),
        SLOTS=slots, BLOCK_N=64, BLOCK_K=64, **common,
    )  # fmt: skip
    _sorted_w2_kernel[(blocks, triton.cdiv(d, 64))](
        h_ptr=h, weights_ptr=weights.reshape(-1).contiguous(), w_ptr=bank.w2, s_ptr=s2,
        y_ptr=y, stride_we=bank.w2.stride(0), stride_wn=bank.w2.stride(1),
        stride_se=s2.stride(0), stride_sn=s2.stride(1), BLOCK_N=64, BLOCK_K=64, **common,
    )  # fmt: skip
    return out.copy_(y.view(t, slots, d).sum(dim=1))
