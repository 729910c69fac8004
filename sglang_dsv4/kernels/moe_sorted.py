"""Routed (+ shared) experts of one layer as sorted grouped GEMMs (the prefill form of
:mod:`~sglang_dsv4.kernels.moe_experts`, whose docstring describes the banks, the formats and
the shared expert): (token, slot) pairs grouped by expert (:mod:`~sglang_dsv4.kernels.moe_group`:
one launch at decode sizes, two at prefill); each program owns an [M, N] tile of one expert
(blocks found in-kernel from the group offsets) and runs ``tl.dot`` tiles, so each expert's
weights are read once per block row; the routing weight is w2's epilogue and the slot sum
(:mod:`~sglang_dsv4.kernels.slot_sum`) adds a token's rows. Tiles and raster order per kernel:
:mod:`sglang_dsv4.kernels.moe_sorted_tiles` (measured table). Free of host syncs and
data-dependent shapes (CUDA-graph safe).

Twin: :class:`sglang_dsv4.ref.moe.DenseExperts` and :func:`sglang_dsv4.ref.moe.swiglu` over the
dequantized weights.
"""

import torch
import triton
import triton.language as tl

from sglang_dsv4.kernels.moe_bank import ExpertWeights
from sglang_dsv4.kernels.moe_common import bank_strides, check_add, routed_slots, swiglu, w_tile
from sglang_dsv4.kernels.moe_group import group_pairs
from sglang_dsv4.kernels.moe_sorted_tiles import GemmTiles, SortedTiles, sorted_tiles, tile_format
from sglang_dsv4.kernels.slot_sum import slot_sum

__all__ = ["moe_experts_sorted"]


@triton.jit
def _block_of(off_ptr, R, P, shared_row, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_R: tl.constexpr, N_FAST: tl.constexpr, IDENT: tl.constexpr):  # fmt: skip
    """(expert, first row, end row, first column) of this program's [M, N] tile; expert R: no
    block (the grid covers the most blocks any routing can need). Expert r's rows are
    off[r]:off[r+1] of the sorted pairs, split into ceil(rows / BLOCK_M) blocks, blocks of experts
    in order. One grid axis; ``N_FAST``: a block's N tiles are consecutive programs (its rows stay
    in L2 across them), else M blocks are (kernels.moe_sorted_tiles). ``IDENT`` (the shared
    expert alone): the identity grouping, ``P`` pairs in token order, all of ``shared_row``,
    nothing read (no grouping launch, no offsets)."""
    pid = tl.program_id(0)
    n_tiles = tl.cdiv(N, BLOCK_N)
    if N_FAST:
        pid_m = pid // n_tiles
        pid_n = pid % n_tiles
    else:
        m_blocks = tl.num_programs(0) // n_tiles
        pid_m = pid % m_blocks
        pid_n = pid // m_blocks
    if IDENT:
        e = pid_m * 0 + shared_row
        row0 = pid_m * BLOCK_M
        end = pid_m * 0 + P
    else:
        offs_r = tl.arange(0, BLOCK_R)
        r_ok = offs_r < R
        lo = tl.load(off_ptr + offs_r, mask=r_ok, other=0)
        hi = tl.load(off_ptr + offs_r + 1, mask=r_ok, other=0)
        nb = (hi - lo + BLOCK_M - 1) // BLOCK_M
        cum = tl.cumsum(nb, axis=0)  # blocks up to and including expert r
        e = tl.sum((cum <= pid_m).to(tl.int32), axis=0)
        this = offs_r == e
        first = tl.sum(tl.where(this, cum - nb, 0), axis=0)
        row0 = tl.sum(tl.where(this, lo, 0), axis=0) + (pid_m - first) * BLOCK_M
        end = tl.sum(tl.where(this, hi, 0), axis=0)
    return e, row0, end, pid_n * BLOCK_N


@triton.jit
def _dot(a, w, IEEE: tl.constexpr):
    """a [M, K] @ w [N, K].T in fp32."""
    if IEEE:
        return tl.dot(a, tl.trans(w.to(a.dtype)), input_precision="ieee")
    return tl.dot(a, tl.trans(w.to(a.dtype)))


@triton.jit
def _sorted_w13_kernel(x_ptr, order_ptr, off_ptr, w1_ptr, w3_ptr, s1_ptr, s3_ptr, gs1_ptr,
                       gs3_ptr, h_ptr, R, P, shared_row, D, I, limit, stride_xt, stride_we,
                       stride_wn, stride_se, stride_sn, SLOTS: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       BLOCK_R: tl.constexpr, FMT: tl.constexpr, G: tl.constexpr,
                       NV: tl.constexpr, IEEE: tl.constexpr, N_FAST: tl.constexpr,
                       IDENT: tl.constexpr):  # fmt: skip
    e, row0, end, n0 = _block_of(off_ptr, R, P, shared_row, I, BLOCK_M, BLOCK_N, BLOCK_R,
                                 N_FAST, IDENT)  # fmt: skip
    if e >= R:
        return
    rows = row0 + tl.arange(0, BLOCK_M)
    m_ok = rows < end
    if IDENT:  # pair = token  # noqa: SIM108 (a constexpr branch: nothing loaded)
        tok = rows
    else:
        tok = tl.load(order_ptr + rows, mask=m_ok, other=0) // SLOTS
    offs_n = n0 + tl.arange(0, BLOCK_N)
    n_ok = offs_n < I
    e = e.to(tl.int64)
    w1_e, w3_e = w1_ptr + e * stride_we, w3_ptr + e * stride_we
    s1_e, s3_e = s1_ptr + e * stride_se, s3_ptr + e * stride_se
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(
            x_ptr + tok[:, None].to(tl.int64) * stride_xt + offs_k[None, :],
            mask=m_ok[:, None] & (offs_k < D)[None, :],
            other=0.0,
        )
        wg = w_tile(w1_e, s1_e, gs1_ptr, e, offs_n, n_ok, k0, D, stride_wn, stride_sn,
                     BLOCK_N, BLOCK_K, FMT, G, NV)  # fmt: skip
        wu = w_tile(w3_e, s3_e, gs3_ptr, e, offs_n, n_ok, k0, D, stride_wn, stride_sn,
                     BLOCK_N, BLOCK_K, FMT, G, NV)  # fmt: skip
        acc_g += _dot(a, wg, IEEE)
        acc_u += _dot(a, wu, IEEE)
    h = swiglu(acc_g, acc_u, limit)
    tl.store(
        h_ptr + rows[:, None].to(tl.int64) * I + offs_n[None, :],
        h.to(h_ptr.dtype.element_ty),
        mask=m_ok[:, None] & n_ok[None, :],
    )


@triton.jit
def _sorted_w2_kernel(h_ptr, order_ptr, off_ptr, weights_ptr, w_ptr, s_ptr, gs_ptr, y_ptr, R, P,
                      shared_row, D, I, stride_we, stride_wn, stride_se, stride_sn,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      BLOCK_R: tl.constexpr, FMT: tl.constexpr, G: tl.constexpr,
                      NV: tl.constexpr, IEEE: tl.constexpr, N_FAST: tl.constexpr,
                      IDENT: tl.constexpr):  # fmt: skip
    e, row0, end, n0 = _block_of(off_ptr, R, P, shared_row, D, BLOCK_M, BLOCK_N, BLOCK_R,
                                 N_FAST, IDENT)  # fmt: skip
    if e >= R:
        return
    rows = row0 + tl.arange(0, BLOCK_M)
    m_ok = rows < end
    if IDENT:
        pair = rows.to(tl.int64)
    else:
        pair = tl.load(order_ptr + rows, mask=m_ok, other=0).to(tl.int64)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    n_ok = offs_n < D
    e = e.to(tl.int64)
    w_e, s_e = w_ptr + e * stride_we, s_ptr + e * stride_se
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, I, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(
            h_ptr + rows[:, None].to(tl.int64) * I + offs_k[None, :],
            mask=m_ok[:, None] & (offs_k < I)[None, :],
            other=0.0,
        )
        w = w_tile(w_e, s_e, gs_ptr, e, offs_n, n_ok, k0, I, stride_wn, stride_sn,
                    BLOCK_N, BLOCK_K, FMT, G, NV)  # fmt: skip
        acc += _dot(a, w, IEEE)
    if not IDENT:  # the shared expert's weight is 1: nothing to read or multiply
        acc = acc * tl.load(weights_ptr + pair, mask=m_ok, other=0.0)[:, None]
    tl.store(
        y_ptr + pair[:, None] * D + offs_n[None, :],
        acc.to(y_ptr.dtype.element_ty),
        mask=m_ok[:, None] & n_ok[None, :],
    )  # row of the pair in token order: the slot sum needs no inverse permutation


_DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


class _SortedLaunch:
    """The sorted form's launches of one call: pairs grouped by expert at construction
    (``group``: :func:`~sglang_dsv4.kernels.moe_group.group_pairs` or its torch twin, the same
    bits), then the two GEMMs and the slot sum (apart, so that the benchmark times each).
    ``chosen`` None (the shared row alone, one slot): the identity grouping, a constexpr of the
    GEMM kernels (``IDENT``) that reads nothing and launches nothing."""

    def __init__(self, x, chosen, weights, bank: ExpertWeights, shared_row, group=group_pairs):
        self.t, self.d = x.shape
        self.n_rows, self.inter = bank.check(self.d)
        self.x, self.bank = x.contiguous(), bank
        self.slots = routed_slots(chosen, shared_row) + (shared_row is not None)  # (+ the shared)
        self.pairs = self.t * self.slots
        self.ident, self.shared_row = chosen is None, shared_row
        # order [P]: sorted position -> pair (t * slots + j); offsets [R + 1]: group starts;
        # weights [P] fp32 in token order. ``group``: one Triton launch at decode
        # (kernels.moe_group) or its twin, the torch sort (the benchmark's "before");
        # identity: stand-ins the kernels never read
        grouped = (self.x,) * 3 if self.ident else group(chosen, weights, self.n_rows, shared_row)
        self.order, self.offsets, self.weights = grouped
        self.key = tile_format(bank.fmt, _DTYPES.get(x.dtype, str(x.dtype)))

    def _launch(self, tiles: GemmTiles, n: int) -> tuple[tuple[int], dict]:
        """(grid, common arguments) of a sorted kernel with ``n`` output columns."""
        # <= 1 partial block per row; the identity: one row's blocks
        blocks = triton.cdiv(self.pairs, tiles.block_m) + (0 if self.ident else self.n_rows)
        common = dict(
            order_ptr=self.order, off_ptr=self.offsets, R=self.n_rows, P=self.pairs,
            shared_row=self.shared_row if self.ident else -1, D=self.d, I=self.inter,
            IDENT=self.ident,
            BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k,
            BLOCK_R=triton.next_power_of_2(self.n_rows + 1), IEEE=self.x.dtype == torch.float32,
            N_FAST=tiles.n_fast, num_warps=tiles.warps, num_stages=tiles.stages,
            **self.bank.constexprs(),
        )  # fmt: skip
        return (blocks * triton.cdiv(n, tiles.block_n),), common

    def w13(self, h: torch.Tensor, limit: float, tiles: GemmTiles) -> None:
        """h [P, I] (sorted order) = SwiGLU(w1 x, w3 x) of every pair."""
        (w1, s1, gs1), (w3, s3, gs3) = (self.bank.operands(p) for p in self.bank[:2])
        grid, common = self._launch(tiles, self.inter)
        _sorted_w13_kernel[grid](
            x_ptr=self.x, w1_ptr=w1, w3_ptr=w3, s1_ptr=s1, s3_ptr=s3, gs1_ptr=gs1, gs3_ptr=gs3,
            h_ptr=h, limit=float(limit), stride_xt=self.x.stride(0), SLOTS=self.slots,
            **bank_strides(w1, s1), **common,
        )  # fmt: skip

    def w2(self, h: torch.Tensor, y: torch.Tensor, tiles: GemmTiles) -> None:
        """y [P, d] (token order) = weight * w2 h of every pair."""
        w2, s2, gs2 = self.bank.operands(self.bank.w2)
        grid, common = self._launch(tiles, self.d)
        _sorted_w2_kernel[grid](
            h_ptr=h, weights_ptr=self.weights, w_ptr=w2, s_ptr=s2, gs_ptr=gs2, y_ptr=y,
            **bank_strides(w2, s2), **common,
        )  # fmt: skip

    def slot_sum(self, y: torch.Tensor, out: torch.Tensor, add: torch.Tensor | None = None):
        """out [T, d] = the sum of each token's slot rows of y (+ ``add`` [T, d]), written in
        out's dtype: one Triton launch with the bits of ``torch.sum(y.view(T, S, d), dim=1,
        out=out)`` on CUDA (:mod:`~sglang_dsv4.kernels.slot_sum`), y read once at bandwidth."""
        slot_sum(y, out, add)


def moe_experts_sorted(
    x: torch.Tensor,
    chosen: torch.Tensor,
    weights: torch.Tensor,
    bank: ExpertWeights,
    limit: float,
    shared_row: int | None = None,
    out: torch.Tensor | None = None,
    tiles: SortedTiles | None = None,
    group=group_pairs,
    add: torch.Tensor | None = None,
) -> torch.Tensor:
    """As :func:`~sglang_dsv4.kernels.moe_experts.moe_experts_slots`, as a sorted grouped GEMM
    (module docstring). ``tiles``: the launch shapes (default
    :func:`~sglang_dsv4.kernels.moe_sorted_tiles.sorted_tiles`); ``group``: the pairs'
    grouping (:class:`_SortedLaunch`); ``add``: rows added in the slot sum
    (:func:`~sglang_dsv4.kernels.slot_sum.slot_sum`). The shared row alone (``chosen`` None):
    two launches, w2 writes ``out`` (one slot in token order: no slot sum, whose only
    effect was -0 made +0, a sign that no sum it is added to keeps)."""
    t, d = x.shape
    out = torch.empty(t, d, dtype=x.dtype, device=x.device) if out is None else out
    check_add(add, out)
    if t == 0:
        bank.check(d)
        return out
    launch = _SortedLaunch(x, chosen, weights, bank, shared_row, group)
    if launch.ident and add is not None:
        raise ValueError("the shared row alone takes no add rows")
    tiles = tiles or sorted_tiles(launch.pairs, launch.key)
    h = torch.empty(launch.pairs, launch.inter, dtype=x.dtype, device=x.device)  # [P, I]
    launch.w13(h, limit, tiles.w13)
    if launch.ident:  # one slot: w2's rows are the output
        if not out.is_contiguous():
            raise ValueError("out must be contiguous")
        launch.w2(h, out, tiles.w2)
        return out
    # [P, d] in token order, in x's dtype as the reference rounds each expert's output (half
    # the bytes of fp32: at an 8K-token prefill chunk with 7 slots this buffer is 470 MB)
    y = torch.empty(launch.pairs, d, dtype=x.dtype, device=x.device)
    launch.w2(h, y, tiles.w2)
    launch.slot_sum(y, out, add)
    return out
