"""Routed (+ shared) experts of one layer, grouped, for dense (bf16 / fp32), FP8 and FP4 banks.

A bank (:class:`~sglang_dsv4.kernels.moe_bank.ExpertWeights`) holds every expert of a layer
stacked at load (:mod:`sglang_dsv4.model.experts`), one :class:`Proj` per projection over ``R``
rows: w1 / w3 [R, I, d], w2 [R, d, I] in the format

* ``dense``: the model dtype;
* ``fp8``: e4m3 with e8m0 128x128 block scales [R, ceil(N/128), ceil(K/128)];
* ``mxfp4`` / ``nvfp4``: packed e2m1 codes uint8 [R, N, K/2] with scale bytes [R, N, K/G]
  (e8m0 per 32 / e4m3 per 16) and an fp32 global scale per row (NVFP4);

w1 and w3 may be views of one ``w13`` [R, 2I, d] tensor (same strides). ``R`` is ``E`` routed
experts, plus one when the shared expert is stored as row ``E`` (``shared_row``): it then runs as
one more slot of every token, with weight 1. Quantized tiles are decoded in registers, never to
memory (the scale is applied to the tile: exact for power-of-two scales).

Each expert computes ``w2(silu(min(w1 x, L)) * clamp(w3 x, -L, L))`` with fp32 accumulation; the
clamp + SwiGLU is the epilogue of the w1/w3 GEMM (one pass for both), the routing weight the
epilogue of w2. Two forms, both free of host syncs and data-dependent shapes (CUDA-graph safe):

* :func:`moe_experts_slots` (decode, small T): a program per (token slot, N tile) reads only its
  chosen expert's rows, as a GEMV; a second kernel per (token, d tile) sums the token's slots
  through w2. Two launches, and only the chosen experts' weights are read. Both run one GEMV
  body (``_rows_dot``): N tiles down to 4 rows so that batch 1 still has ~3 programs per SM,
  wide K tiles (32 weights per thread, products kept per column and reduced once after the
  loop), FP8 block scales applied to the vector (exact: powers of two). Tiles:
  :func:`slot_tiles`.
* :func:`~sglang_dsv4.kernels.moe_sorted.moe_experts_sorted` (prefill, large T; its own
  module): (token, slot) pairs grouped by expert (:mod:`~sglang_dsv4.kernels.moe_group`: one
  launch at decode sizes, two at prefill); each program owns an [M, N] tile of one expert
  (blocks found in-kernel from the group offsets) and runs ``tl.dot`` tiles, so each expert's
  weights are read once per block row. Tiles and raster order per kernel:
  :mod:`sglang_dsv4.kernels.moe_sorted_tiles` (measured table).

What both share (the tile decode, the SwiGLU, the checks): :mod:`.moe_common`.

A shared expert held in a bank of its own (next to FP4 routed experts) runs first as that bank's
shared row alone (``chosen`` None: top-k 0; in the sorted form the identity grouping, a constexpr
of the GEMM kernels: no grouping launch, no slot sum), and its rows [T, d] are the routed call's
``add``: added to the rounded slot sum in the epilogue of the kernel that sums the slots (the slot
form's w2 kernel, the sorted form's slot sum), with the bits of ``routed + shared`` in torch.

Twin: :class:`sglang_dsv4.ref.moe.DenseExperts` and :func:`sglang_dsv4.ref.moe.swiglu` over the
dequantized weights.
"""

import torch
import triton
import triton.language as tl

from sglang_dsv4.kernels.moe_bank import FORMATS, ExpertWeights, Proj
from sglang_dsv4.kernels.moe_common import bank_strides, check_add, routed_slots, swiglu, w_tile
from sglang_dsv4.kernels.moe_slot_tiles import SlotTiles, slot_tiles
from sglang_dsv4.kernels.slot_sum import round_out

__all__ = [
    "FORMATS",
    "ExpertWeights",
    "Proj",
    "SlotTiles",
    "moe_experts_slots",
    "slot_tiles",
]


@triton.jit
def _scaled_vec(v, s_ptr, n0, offs_k, K, stride_sn, FMT: tl.constexpr):
    """``v`` [BLOCK_K] times the FP8 block scales of rows ``n0 ...`` (one 128-row block: the
    N tile is at most 128 rows, aligned) at columns ``offs_k``; other formats: ``v``. Scaling
    the vector instead of the weight tile is exact (powers of two) and keeps the tile's loads
    free of per-128-column scale broadcasts."""
    if FMT == 1:
        sb = tl.load(s_ptr + (n0 // 128) * stride_sn + offs_k // 128, mask=offs_k < K, other=127)
        v = v * tl.exp2(sb.to(tl.float32) - 127.0)
    return v


@triton.jit
def _rows_dot(wa_ptr, wb_ptr, sa_ptr, sb_ptr, gsa_ptr, gsb_ptr, es, wts, n0, n_lim, v_ptr,
              stride_v, K, stride_we, stride_wn, stride_se, stride_sn, PAIR: tl.constexpr,
              SEGS: tl.constexpr, SP: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_K: tl.constexpr, UNROLL: tl.constexpr, FMT: tl.constexpr, G: tl.constexpr,
              NV: tl.constexpr):  # fmt: skip
    """GEMV body of both slot kernels: rows ``n0 ... n0 + BLOCK_N`` (< ``n_lim``) of weight
    ``a`` (and of ``b`` when ``PAIR``: w1 and w3 in one pass) over ``SEGS`` segments of K
    columns, segment ``j`` from bank row ``es[j]`` times vector ``j`` (``v_ptr + j *
    stride_v``) weighted by ``wts[j]`` -> fp32 [BLOCK_N] each. w1/w3: one segment (the slot's
    expert, x); w2: one per slot (its expert, its h). The segments run as one flat loop of K
    tiles (no per-slot loop to drain); products accumulate per column in a [BLOCK_N, BLOCK_K]
    tile, reduced once after the loop."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    n_ok = offs_n < n_lim
    TILE: tl.constexpr = 0 if FMT == 1 else FMT  # FP8 codes load raw; the vector is scaled
    chunks = tl.cdiv(K, BLOCK_K)
    acc_a = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    acc_b = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)  # unused (dropped) unless PAIR
    for c in tl.range(0, SEGS * chunks, loop_unroll_factor=UNROLL):
        j = c // chunks
        pick = tl.arange(0, SP) == j
        e = tl.sum(tl.where(pick, es, 0), axis=0)  # from registers: no load on the way
        k0 = (c - j * chunks) * BLOCK_K
        offs_k = k0 + tl.arange(0, BLOCK_K)
        v = tl.load(v_ptr + j * stride_v + offs_k, mask=offs_k < K, other=0.0).to(tl.float32)
        v = v * tl.sum(tl.where(pick, wts, 0.0), axis=0)
        wa = w_tile(wa_ptr + e * stride_we, sa_ptr + e * stride_se, gsa_ptr, e, offs_n, n_ok,
                     k0, K, stride_wn, stride_sn, BLOCK_N, BLOCK_K, TILE, G, NV)  # fmt: skip
        if PAIR:
            wb = w_tile(wb_ptr + e * stride_we, sb_ptr + e * stride_se, gsb_ptr, e, offs_n,
                         n_ok, k0, K, stride_wn, stride_sn, BLOCK_N, BLOCK_K, TILE, G,
                         NV)  # fmt: skip
            vb = _scaled_vec(v, sb_ptr + e * stride_se, n0, offs_k, K, stride_sn, FMT)
            acc_b += wb.to(tl.float32) * vb[None, :]
        va = _scaled_vec(v, sa_ptr + e * stride_se, n0, offs_k, K, stride_sn, FMT)
        acc_a += wa.to(tl.float32) * va[None, :]
    return tl.sum(acc_a, axis=1), tl.sum(acc_b, axis=1)


@triton.jit
def _slot_experts(chosen_ptr, weights_ptr, t, j0, shared_row, TOPK: tl.constexpr,
                  SP: tl.constexpr):  # fmt: skip
    """Bank rows int64 [SP] and routing weights [SP] of token ``t``'s slots ``j0 ...``: its
    chosen experts, past top-k the shared row with weight 1 (top-k 0, the shared expert alone:
    nothing read, ``chosen_ptr`` / ``weights_ptr`` are stand-ins)."""
    j = j0 + tl.arange(0, SP)
    if TOPK == 0:
        e = tl.zeros((SP,), dtype=tl.int64) + shared_row
        wt = tl.full((SP,), 1.0, dtype=tl.float32)
    else:
        routed = j < TOPK
        e = tl.load(chosen_ptr + t * TOPK + j, mask=routed, other=0)
        wt = tl.load(weights_ptr + t * TOPK + j, mask=routed, other=1.0)
        e = tl.where(routed, e, shared_row).to(tl.int64)
    return e, wt


@triton.jit
def _w13_row(x_ptr, es, w1_ptr, w3_ptr, s1_ptr, s3_ptr, gs1_ptr, gs3_ptr, h_ptr, n0, D, I, limit,
             stride_we, stride_wn, stride_se, stride_sn, SP: tl.constexpr, BLOCK_N: tl.constexpr,
             BLOCK_K: tl.constexpr, UNROLL: tl.constexpr, FMT: tl.constexpr, G: tl.constexpr,
             NV: tl.constexpr):  # fmt: skip
    """h row ``h_ptr`` [I], columns ``n0 ...`` = SwiGLU(w1 x, w3 x) of bank row ``es[0]``."""
    ones = tl.full((SP,), 1.0, dtype=tl.float32)  # the routing weight is w2's epilogue
    g, u = _rows_dot(w1_ptr, w3_ptr, s1_ptr, s3_ptr, gs1_ptr, gs3_ptr, es, ones, n0, I, x_ptr, 0,
                     D, stride_we, stride_wn, stride_se, stride_sn, True, 1, SP, BLOCK_N,
                     BLOCK_K, UNROLL, FMT, G, NV)  # fmt: skip
    offs_n = n0 + tl.arange(0, BLOCK_N)
    tl.store(h_ptr + offs_n, swiglu(g, u, limit).to(h_ptr.dtype.element_ty), mask=offs_n < I)


@triton.jit
def _slot_w13_kernel(x_ptr, chosen_ptr, weights_ptr, w1_ptr, w3_ptr, s1_ptr, s3_ptr, gs1_ptr,
                     gs3_ptr, h_ptr, T, D, I, limit, shared_row, stride_xt, stride_we, stride_wn,
                     stride_se, stride_sn, b1_ptr, b3_ptr, bs1_ptr, bs3_ptr, bgs1_ptr, bgs3_ptr,
                     hb_ptr, IB, b_stride_we, b_stride_wn, b_stride_se, b_stride_sn,
                     TOPK: tl.constexpr, SLOTS: tl.constexpr, SP: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, UNROLL: tl.constexpr,
                     FMT: tl.constexpr, G: tl.constexpr, NV: tl.constexpr, TWO: tl.constexpr,
                     FMT_B: tl.constexpr, G_B: tl.constexpr, NV_B: tl.constexpr,
                     BLOCK_N_B: tl.constexpr, BLOCK_K_B: tl.constexpr):  # fmt: skip
    p = tl.program_id(0)  # token slot t * SLOTS + j; TWO: then bank b's row 0 of token t
    n0 = tl.program_id(1) * BLOCK_N
    t = p // SLOTS
    if TWO:  # bank b with its own tiles (those of a call of its own: the same sums); N tiles
        # past a bank's width do nothing (the grid covers the wider count)
        if p >= T * SLOTS:
            tb = p - T * SLOTS
            nb = tl.program_id(1) * BLOCK_N_B
            if nb < IB:
                _w13_row(x_ptr + tb * stride_xt, tl.zeros((SP,), dtype=tl.int64), b1_ptr, b3_ptr,
                         bs1_ptr, bs3_ptr, bgs1_ptr, bgs3_ptr, hb_ptr + tb * IB, nb, D, IB,
                         limit, b_stride_we, b_stride_wn, b_stride_se, b_stride_sn, SP,
                         BLOCK_N_B, BLOCK_K_B, UNROLL, FMT_B, G_B, NV_B)  # fmt: skip
        elif n0 < I:
            es, _ = _slot_experts(chosen_ptr, weights_ptr, t, p % SLOTS, shared_row, TOPK, SP)
            _w13_row(x_ptr + t * stride_xt, es, w1_ptr, w3_ptr, s1_ptr, s3_ptr, gs1_ptr, gs3_ptr,
                     h_ptr + p * I, n0, D, I, limit, stride_we, stride_wn, stride_se, stride_sn,
                     SP, BLOCK_N, BLOCK_K, UNROLL, FMT, G, NV)  # fmt: skip
    else:
        es, _ = _slot_experts(chosen_ptr, weights_ptr, t, p % SLOTS, shared_row, TOPK, SP)
        _w13_row(x_ptr + t * stride_xt, es, w1_ptr, w3_ptr, s1_ptr, s3_ptr, gs1_ptr, gs3_ptr,
                 h_ptr + p * I, n0, D, I, limit, stride_we, stride_wn, stride_se, stride_sn, SP,
                 BLOCK_N, BLOCK_K, UNROLL, FMT, G, NV)  # fmt: skip


@triton.jit
def _slot_w2_kernel(h_ptr, chosen_ptr, weights_ptr, w_ptr, s_ptr, gs_ptr, add_ptr, out_ptr, D,
                    I, shared_row, stride_we, stride_wn, stride_se, stride_sn, stride_ot, b_ptr,
                    bs_ptr, bgs_ptr, hb_ptr, IB, b_stride_we, b_stride_wn, b_stride_se,
                    b_stride_sn, TOPK: tl.constexpr, SLOTS: tl.constexpr, SP: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, UNROLL: tl.constexpr,
                    FMT: tl.constexpr, G: tl.constexpr, NV: tl.constexpr, ADD: tl.constexpr,
                    OUT_BF16: tl.constexpr, TWO: tl.constexpr, FMT_B: tl.constexpr,
                    G_B: tl.constexpr, NV_B: tl.constexpr, BLOCK_K_B: tl.constexpr):  # fmt: skip
    t = tl.program_id(0)
    es, wts = _slot_experts(chosen_ptr, weights_ptr, t, 0, shared_row, TOPK, SP)
    n0 = tl.program_id(1) * BLOCK_N
    acc, _ = _rows_dot(w_ptr, w_ptr, s_ptr, s_ptr, gs_ptr, gs_ptr, es, wts, n0, D,
                       h_ptr + t * SLOTS * I, I, I, stride_we, stride_wn, stride_se, stride_sn,
                       False, SLOTS, SP, BLOCK_N, BLOCK_K, UNROLL, FMT, G, NV)  # fmt: skip
    offs_n = n0 + tl.arange(0, BLOCK_N)
    n_ok = offs_n < D
    if TWO:  # bank b's row 0 (weight 1), rounded alone, then added: the bits of a + b in torch
        ones = tl.full((SP,), 1.0, dtype=tl.float32)
        acc_b, _ = _rows_dot(b_ptr, b_ptr, bs_ptr, bs_ptr, bgs_ptr, bgs_ptr,
                             tl.zeros((SP,), dtype=tl.int64), ones, n0, D, hb_ptr + t * IB, IB,
                             IB, b_stride_we, b_stride_wn, b_stride_se, b_stride_sn, False, 1, SP,
                             BLOCK_N, BLOCK_K_B, UNROLL, FMT_B, G_B, NV_B)  # fmt: skip
        acc_b = acc_b.to(out_ptr.dtype.element_ty).to(tl.float32)
        acc = round_out(acc.to(out_ptr.dtype.element_ty).to(tl.float32) + acc_b, out_ptr,
                        OUT_BF16)  # fmt: skip
    if ADD:  # the rounded slot sum + the shared expert's row: the bits of out + add in torch
        extra = tl.load(add_ptr + t * D + offs_n, mask=n_ok, other=0.0).to(tl.float32)
        acc = round_out(acc.to(out_ptr.dtype.element_ty).to(tl.float32) + extra, out_ptr,
                        OUT_BF16)  # fmt: skip
    tl.store(out_ptr + t * stride_ot + offs_n, acc.to(out_ptr.dtype.element_ty), mask=n_ok)


def moe_experts_slots(
    x: torch.Tensor,
    chosen: torch.Tensor,
    weights: torch.Tensor,
    bank: ExpertWeights,
    limit: float,
    shared_row: int | None = None,
    out: torch.Tensor | None = None,
    tiles: SlotTiles | None = None,
    add: torch.Tensor | None = None,
    shared: ExpertWeights | None = None,
    shared_tiles: SlotTiles | None = None,
) -> torch.Tensor:
    """``x`` [T, d], ``chosen`` int [T, k], ``weights`` [T, k] -> [T, d] in x's dtype (into
    ``out`` when given): the sum over slots of weight * expert(x), plus the shared expert when
    ``shared_row`` is given (``chosen`` / ``weights`` None: the shared row alone, top-k 0).
    ``add`` [T, d] (x's dtype): rows added to the rounded sum in the w2 kernel's epilogue, the
    bits of ``moe_experts_slots(...) + add`` in one launch. ``shared``: a bank of its own whose
    row 0 (the shared expert, any format and width) runs in the same two launches, one more
    program per token in the w1/w3 kernel, its row rounded alone then added in the w2 kernel:
    the bits of ``moe_experts_slots(...) + moe_experts_slots(x, None, None, shared, limit, 0)``
    in two launches instead of four and an add. ``tiles`` / ``shared_tiles``: the launch shapes
    of each bank (default :func:`slot_tiles` as for a call of its own)."""
    t, d = x.shape
    _, inter = bank.check(d)
    slots = routed_slots(chosen, shared_row) + (shared_row is not None)
    if shared is not None and shared_row is not None:
        raise ValueError("a shared bank and a shared row: one shared expert expected")
    inter_b = 0 if shared is None else shared.check(d)[1]
    h = torch.empty(t * slots, inter, dtype=x.dtype, device=x.device)  # [T * S, I]
    hb = None if shared is None else torch.empty(t, inter_b, dtype=x.dtype, device=x.device)
    out = torch.empty(t, d, dtype=x.dtype, device=x.device) if out is None else out
    if t == 0:
        return out
    # each bank's tiles as in a call of its own: the same fp32 sums, the same bits
    # a shared bank of its own runs in the same launches: both banks' guessed tiles (measured
    # rows are per bank and need not agree on what one launch shares)
    tiles = tiles or slot_tiles(bank.fmt, t * slots, t, inter, d, measured=shared is None)
    if shared is not None:
        shared_tiles = shared_tiles or slot_tiles(shared.fmt, t, t, inter_b, d, measured=False)
        if _one_launch(shared_tiles) != _one_launch(tiles):
            raise ValueError(f"the w2 N tile, warps and unroll of {shared_tiles} and {tiles} "
                             "differ: one launch runs both banks")  # fmt: skip
    launch = _SlotLaunch(x, chosen, weights, bank, shared_row, tiles, shared, shared_tiles)
    launch.w13(h, limit, hb)
    launch.w2(h, out, add, hb)
    return out


def _one_launch(tiles: SlotTiles) -> tuple[int, int, int]:
    """What both banks of one slot launch share: the w2 N tile, warps, unroll."""
    return tiles.block_d, tiles.warps, tiles.unroll


class _SlotLaunch:
    """The two slot-kernel launches of one call (apart, so that the benchmark times each)."""

    def __init__(self, x, chosen, weights, bank: ExpertWeights, shared_row, tiles: SlotTiles,
                 shared: ExpertWeights | None = None,
                 shared_tiles: SlotTiles | None = None):  # fmt: skip
        self.x, self.shared, self.tiles_b = x.contiguous(), shared, shared_tiles or tiles
        topk = routed_slots(chosen, shared_row)
        # top-k 0: the kernels read neither (stand-ins)
        self.chosen = self.x if chosen is None else chosen.contiguous()
        self.weights = self.x if weights is None else weights.float().contiguous()
        self.bank, self.tiles = bank, tiles
        self.t, self.d = x.shape
        self.inter = bank.w1.w.shape[1]
        slots = topk + (shared_row is not None)
        self.common = dict(
            chosen_ptr=self.chosen, D=self.d, I=self.inter,
            shared_row=-1 if shared_row is None else shared_row, TOPK=topk,
            SLOTS=slots, SP=max(2, triton.next_power_of_2(slots)), UNROLL=tiles.unroll,
            weights_ptr=self.weights, num_warps=tiles.warps, **bank.constexprs(),
        )  # fmt: skip
        b = bank if shared is None else shared  # stand-ins without a shared bank (never read)
        self.inter_b = 0 if shared is None else shared.w1.w.shape[1]
        self.common |= dict(TWO=shared is not None, IB=self.inter_b,
                            **{f"{k}_B": v for k, v in b.constexprs().items()})  # fmt: skip

    def _bank_b(self, projs: tuple[str, ...], names: tuple[str, ...], hb, stand_in) -> dict:
        """The shared bank's pointers (``names``) and strides, or stand-ins without it."""
        b = self.bank if self.shared is None else self.shared
        ops = [t for k in projs for t in b.operands(getattr(b, k))]
        out = {n: t for n, t in zip(names, ops, strict=True)} | {
            "hb_ptr": stand_in if hb is None else hb
        }
        return out | {f"b_{k}": v for k, v in bank_strides(ops[0], ops[1]).items()}

    def w13(self, h: torch.Tensor, limit: float, hb: torch.Tensor | None = None) -> None:
        """h [T * S, I] = SwiGLU(w1 x, w3 x) of every token slot (hb [T, IB]: the shared
        bank's)."""
        (w1, s1, gs1), (w3, s3, gs3) = (self.bank.operands(p) for p in self.bank[:2])
        b = self._bank_b(("w1", "w3"), ("b1_ptr", "bs1_ptr", "bgs1_ptr", "b3_ptr", "bs3_ptr",
                                        "bgs3_ptr"), hb, h)  # fmt: skip
        rows = h.shape[0] + (0 if hb is None else hb.shape[0])
        tb = self.tiles_b
        n_tiles = max(triton.cdiv(self.inter, self.tiles.block_i),
                      triton.cdiv(self.inter_b, tb.block_i))  # fmt: skip
        _slot_w13_kernel[(rows, n_tiles)](
            x_ptr=self.x, w1_ptr=w1, w3_ptr=w3, s1_ptr=s1, s3_ptr=s3, gs1_ptr=gs1, gs3_ptr=gs3,
            h_ptr=h, T=self.t, limit=float(limit), stride_xt=self.x.stride(0),
            BLOCK_N=self.tiles.block_i, BLOCK_K=self.tiles.k_i, BLOCK_N_B=tb.block_i,
            BLOCK_K_B=tb.k_i, **bank_strides(w1, s1), **b, **self.common,
        )  # fmt: skip

    def w2(self, h: torch.Tensor, out: torch.Tensor, add: torch.Tensor | None = None,
           hb: torch.Tensor | None = None) -> None:  # fmt: skip
        """out [T, d] = sum over slots of weight * w2 h (+ the shared bank's w2 hb, + add
        [T, d], contiguous)."""
        w2, s2, gs2 = self.bank.operands(self.bank.w2)
        check_add(add, out)
        b = self._bank_b(("w2",), ("b_ptr", "bs_ptr", "bgs_ptr"), hb, h)
        _slot_w2_kernel[(self.t, triton.cdiv(self.d, self.tiles.block_d))](
            h_ptr=h, w_ptr=w2, s_ptr=s2, gs_ptr=gs2, add_ptr=out if add is None else add,
            out_ptr=out, stride_ot=out.stride(0), BLOCK_N=self.tiles.block_d,
            BLOCK_K=self.tiles.k_d, BLOCK_K_B=self.tiles_b.k_d, ADD=add is not None,
            OUT_BF16=out.dtype == torch.bfloat16, **bank_strides(w2, s2), **b, **self.common,
        )  # fmt: skip
