"""CuTe DSL (nvidia-cutlass-dsl 4.8) sm90 kernel of the sparse MQA decode (wrapper and math:
``kernels.cute_sparse_mqa``; the Triton twin: ``kernels.attention``).

One CTA = one query row x 64 heads x one split of the concatenated (main, extra) row list,
384 threads in three warpgroups (warp specialization, as FlashMLA's sm90 sparse decode):

* warpgroup 0, the producer: per 64-row block, gathers the FP8 rows by index (16-byte loads of
  the e4m3 bytes, the UE8M0 scale bytes and the bf16 RoPE part of FlashMLA's 584-byte record,
  paged), dequantizes them to bf16 (e4m3 * 2^(s-127), exact) and writes them into a 128B-swizzled
  K tile in shared memory; a per-row bias (0 / -inf) marks empty slots. Two stages, handed over by
  an mbarrier pipeline (``PipelineAsync``: 128 producer arrivals fill a stage, 256 consumer
  arrivals free it).
* warpgroups 1 and 2, the consumers: ``S = Q K^T`` (wgmma 64x64x16, Q and K from shared memory;
  each warpgroup computes all of S, which keeps them independent), the online softmax in the exp2
  domain, then ``O += P V`` (wgmma 64x256x16, P from registers, V = the same K tile read
  MN-major), warpgroup w owning output channels [256 w, 256 w + 256).
* epilogue: one split -> bf16 output with the sink in the denominator and the natural-log LSE.
  Several splits -> fp32 partials ``(o / l, m + log2 l)``; the last CTA of a (row, head block) to
  finish (a counter in global memory, reset by that CTA, so CUDA-graph replays start at 0) merges
  them: no separate combine launch.
"""

from __future__ import annotations

from typing import NamedTuple

import cutlass
import cutlass.cute as cute
import cutlass.pipeline as pipeline
from cutlass import BFloat16, Float32, Int32, Int64, Uint8
from cutlass.cute.nvgpu import warpgroup

BH = 64  # heads per CTA (the wgmma M)
BN = 64  # rows per block
D = 512  # head dim
NOPE = 448  # e4m3 channels; the last 64 are bf16 RoPE
DATA = 576  # bytes of a row's nope + RoPE part
SCALE_BYTES = 8  # 7 UE8M0 exponents + 1 pad
STAGES = 2
THREADS = 384
# setmaxnreg moves registers between warpgroups inside the CTA's launch allocation (168 a thread
# at 384 threads = 64512): 128 * 64 + 256 * 216 = 63488. More than that and the consumers'
# increase waits forever.
PRODUCER_REGS, CONSUMER_REGS = 64, 216
LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
_FLOOR = -1.0e30  # finite floor of the running max: exp2(m - m_new) stays defined


def _swz(key, dim):
    """Byte offset of element (key, dim) of a [BN, D] bf16 tile stored as 128B-swizzled K-major
    atoms (8 rows x 64 channels), keys tiled first: the layout ``tile_to_shape(K_SW128, (BN, D))``
    describes, with the swizzle applied to the byte address (16-byte chunk ^= row % 8)."""
    lin = (dim // 64) * 4096 + (key // 8) * 512 + (key % 8) * 64
    return lin * 2 + ((((dim % 64) // 8) ^ (key % 8)) * 16)


class Geometry(NamedTuple):
    """Runtime strides (elements) and shapes of one call; fixed per plan and cache."""

    q_st: Int32  # q row stride
    q_sh: Int32  # q head stride
    o_st: Int32  # out row stride
    o_sh: Int32  # out head stride
    i_st: Int32  # main index row stride
    x_st: Int32  # extra index row stride
    page: Int32  # rows per page, main cache
    pstride: Int32  # bytes between pages, main cache
    xpage: Int32
    xpstride: Int32
    k: Int32  # main list width
    k2: Int32  # extra list width
    chunk: Int32  # list positions per split (a multiple of BN)


class SparseMQAKernel:
    """Static configuration of one compiled kernel (the compile-cache key)."""

    def __init__(self, heads: int, has_extra: bool, has_len: bool, has_xlen: bool, split: bool,
                 write_lse: bool):  # fmt: skip
        self.heads = heads
        self.head_blocks = heads // BH
        self.has_extra, self.has_len, self.has_xlen = has_extra, has_len, has_xlen
        self.split, self.write_lse = split, write_lse

    # ------------------------------------------------------------------ host side

    @cute.jit
    def __call__(self, q: cute.Pointer, kv: cute.Pointer, idx: cute.Pointer, lens: cute.Pointer,
                 xkv: cute.Pointer, xidx: cute.Pointer, xlens: cute.Pointer, sink: cute.Pointer,
                 out: cute.Pointer, lse: cute.Pointer, part_o: cute.Pointer,
                 part_lse: cute.Pointer, counters: cute.Pointer, geo: Geometry,
                 qk_scale: Float32, num_tokens: Int32, num_splits: Int32, stream):  # fmt: skip
        """Pointers as ``kernels.cute_sparse_mqa`` passes them (unused ones: any pointer),
        ``geo`` the strides, page shapes and list widths, ``qk_scale`` = scale * log2(e)."""
        bf16 = BFloat16
        atom_k = warpgroup.make_smem_layout_atom(warpgroup.SmemLayoutAtomKind.K_SW128, bf16)
        atom_mn = warpgroup.make_smem_layout_atom(warpgroup.SmemLayoutAtomKind.MN_SW128, bf16)
        q_layout = cute.tile_to_shape(atom_k, (BH, D), order=(0, 1))
        # The K tile (keys, channels) and its V view (channels, keys) address the same bytes:
        # both tile the 8 x 64 swizzle atom keys-first (``_swz``).
        k_layout = cute.tile_to_shape(atom_k, (BN, D, STAGES), order=(0, 1, 2))
        v_layout = cute.tile_to_shape(atom_mn, (D, BN, STAGES), order=(1, 0, 2))

        qk_mma = _tiled_mma(warpgroup.OperandMajorMode.K, (BH, BN), (1, 1, 1), smem_a=True)
        pv_mma = _tiled_mma(warpgroup.OperandMajorMode.MN, (BH, 256), (1, 2, 1), smem_a=False)

        @cute.struct
        class Storage:
            bars: cute.struct.MemRange[Int64, STAGES * 2]
            flag: cute.struct.MemRange[Int32, 4]
            bias: cute.struct.MemRange[Float32, STAGES * BN]
            sq: cute.struct.Align[cute.struct.MemRange[bf16, cute.cosize(q_layout)], 1024]
            sk: cute.struct.Align[cute.struct.MemRange[bf16, cute.cosize(k_layout)], 1024]

        self.storage = Storage
        self.kernel(
            qk_mma, pv_mma, q_layout, k_layout, v_layout, q, kv, idx, lens, xkv, xidx, xlens,
            sink, out, lse, part_o, part_lse, counters, geo, qk_scale, num_splits,
        ).launch(
            grid=(num_tokens * self.head_blocks, num_splits, 1),
            block=(THREADS, 1, 1),
            stream=stream,
            min_blocks_per_mp=1,
        )  # fmt: skip

    # ------------------------------------------------------------------ device side

    @cute.kernel
    def kernel(self, qk_mma: cute.TiledMma, pv_mma: cute.TiledMma, q_layout: cute.ComposedLayout,
               k_layout: cute.ComposedLayout, v_layout: cute.ComposedLayout, q: cute.Pointer,
               kv: cute.Pointer, idx: cute.Pointer, lens: cute.Pointer, xkv: cute.Pointer,
               xidx: cute.Pointer, xlens: cute.Pointer, sink: cute.Pointer, out: cute.Pointer,
               lse: cute.Pointer, part_o: cute.Pointer, part_lse: cute.Pointer,
               counters: cute.Pointer, geo: Geometry, qk_scale: Float32,
               num_splits: Int32):  # fmt: skip
        tidx, _, _ = cute.arch.thread_idx()
        pid, split, _ = cute.arch.block_idx()
        wg = cute.arch.make_warp_uniform(tidx // 128)
        smem = cutlass.utils.SmemAllocator()
        st = smem.allocate(self.storage)
        t = pid // self.head_blocks
        h0 = (pid % self.head_blocks) * BH
        lo = split * geo.chunk
        hi = cutlass.min(lo + geo.chunk, geo.k + geo.k2)
        nblk = (hi - lo + BN - 1) // BN

        pipe = pipeline.PipelineAsync.create(
            num_stages=STAGES,
            producer_group=pipeline.CooperativeGroup(pipeline.Agent.Thread, 128),
            consumer_group=pipeline.CooperativeGroup(pipeline.Agent.Thread, 256),
            barrier_storage=st.bars.data_ptr(),
            defer_sync=True,
        )
        if wg > 0:
            self._load_q(q, geo, t, h0, st.sq.data_ptr(), tidx - 128)
        cute.arch.mbarrier_init_fence()
        cute.arch.fence_view_async_shared()
        cute.arch.sync_threads()

        if wg == 0:
            cute.arch.setmaxregister_decrease(PRODUCER_REGS)
            self._produce(pipe, kv, idx, lens, xkv, xidx, xlens, geo, t, lo, hi, nblk,
                          st.sk.data_ptr(), st.bias.data_ptr(), tidx)  # fmt: skip
        else:
            cute.arch.setmaxregister_increase(CONSUMER_REGS)
            sq = st.sq.get_tensor(q_layout.outer, swizzle=q_layout.inner)
            sk = st.sk.get_tensor(k_layout.outer, swizzle=k_layout.inner)
            sv = cute.make_tensor(cute.recast_ptr(sk.iterator, v_layout.inner), v_layout.outer)
            bias = cute.make_tensor(st.bias.data_ptr(), cute.make_layout((BN, STAGES)))
            acc, m, lsum = self._consume(qk_mma, pv_mma, pipe, sq, sk, sv, bias, nblk, qk_scale,
                                         tidx - 128)  # fmt: skip
            self._epilogue(pv_mma, acc, m, lsum, sink, out, lse, part_o, part_lse, counters, geo,
                           t, h0, split, num_splits, st.flag.data_ptr(), tidx - 128)  # fmt: skip

    @cute.jit
    def _load_q(self, q: cute.Pointer, geo: Geometry, t: Int32, h0: Int32, sq: cute.Pointer,
                ct: Int32):  # fmt: skip
        """The 256 consumer threads copy Q[t, h0:h0+64, :] into the swizzled Q tile, 16 bytes at
        a time (the Q tile is the K tile's layout with heads for keys)."""
        base = q.toint() + (Int64(t) * geo.q_st + Int64(h0) * geo.q_sh) * 2
        for i in cutlass.range_constexpr(BH * D // 8 // 256):
            c = ct + i * 256
            h = c // (D // 8)
            d = (c % (D // 8)) * 8
            src = cute.make_tensor(
                cute.make_ptr(BFloat16, base + Int64(h) * geo.q_sh * 2 + d * 2,
                              cute.AddressSpace.gmem, assumed_align=16),
                cute.make_layout(8),
            )  # fmt: skip
            dst = cute.make_tensor(
                cute.make_ptr(BFloat16, sq.toint() + _swz(h, d), cute.AddressSpace.smem,
                              assumed_align=16),
                cute.make_layout(8),
            )  # fmt: skip
            cute.autovec_copy(src, dst)

    # ------------------------------------------------------------------ producer

    @cute.jit
    def _produce(self, pipe, kv: cute.Pointer, idx: cute.Pointer, lens: cute.Pointer,
                 xkv: cute.Pointer, xidx: cute.Pointer, xlens: cute.Pointer, geo: Geometry,
                 t: Int32, lo: Int32, hi: Int32, nblk: Int32, sk: cute.Pointer,
                 bias: cute.Pointer, tidx: Int32):  # fmt: skip
        """Thread ``tidx`` fills row ``tidx // 2`` of each block, channel blocks
        ``4 * (tidx % 2) .. + 4`` (the second half holds the RoPE block)."""
        row = tidx // 2
        half = tidx % 2
        n_main = geo.k
        if cutlass.const_expr(self.has_len):
            n_main = cutlass.min(n_main, cute.make_tensor(lens, cute.make_layout(1 << 30))[t])
        n_extra = geo.k2
        if cutlass.const_expr(self.has_xlen):
            n_extra = cutlass.min(n_extra, cute.make_tensor(xlens, cute.make_layout(1 << 30))[t])
        state = pipeline.make_pipeline_state(pipeline.PipelineUserType.Producer, STAGES)
        for b in cutlass.range(nblk, unroll=1):
            pos = lo + b * BN + row
            ok = pos < hi
            row_id = Int32(-1)
            use_main = pos < geo.k
            if ok and use_main and pos < n_main:
                row_id = cute.make_tensor(idx, cute.make_layout(1 << 30))[Int64(t) * geo.i_st + pos]
            if cutlass.const_expr(self.has_extra):
                p2 = pos - geo.k
                if ok and not use_main and p2 < n_extra:
                    row_id = cute.make_tensor(xidx, cute.make_layout(1 << 30))[
                        Int64(t) * geo.x_st + p2
                    ]
            pipe.producer_acquire(state)
            stage_base = sk.toint() + state.index * (BN * D * 2)
            if row_id >= 0:
                if use_main:
                    self._gather_row(kv, geo.page, geo.pstride, row_id, stage_base, row, half)
                else:
                    self._gather_row(xkv, geo.xpage, geo.xpstride, row_id, stage_base, row, half)
            else:
                self._zero_row(stage_base, row, half)
            if half == 0:
                b_t = cute.make_tensor(bias, cute.make_layout(STAGES * BN))
                val = Float32(0.0)
                if row_id < 0:
                    val = -Float32.inf
                b_t[state.index * BN + row] = val
            # the consumers' wgmma reads the tile through the async proxy
            cute.arch.fence_view_async_shared()
            pipe.producer_commit(state)
            state.advance()

    @cute.jit
    def _gather_row(self, cache: cute.Pointer, page_size: Int32, page_stride: Int32,
                    row_id: Int32, stage_base, row: Int32, half: Int32):  # fmt: skip
        """Dequantize half a row of one FP8 record into the tile: channel blocks 0-3, or 4-6 and
        the bf16 RoPE block."""
        page = row_id // page_size
        slot = row_id - page * page_size
        base = cache.toint() + Int64(page) * page_stride
        data = base + slot * DATA
        sc = cute.make_rmem_tensor(cute.make_layout(SCALE_BYTES), Uint8)
        cute.autovec_copy(_gmem(Uint8, base + page_size * DATA + slot * SCALE_BYTES, 8, 8), sc)
        for j in cutlass.range_constexpr(3):
            s = sc[4 + j]
            if half == 0:
                s = sc[j]
            self._nope_block(data, half * 4 + j, s, stage_base, row)
        if half == 0:
            self._nope_block(data, 3, sc[3], stage_base, row)
        else:
            y = cute.make_rmem_tensor(cute.make_layout(8), BFloat16)
            for c in cutlass.range_constexpr(8):
                cute.autovec_copy(_gmem(BFloat16, data + NOPE + c * 16, 8, 16), y)
                self._st16(y, 0, stage_base, row, NOPE + c * 8)

    @cute.jit
    def _nope_block(self, data, blk: Int32, sbyte, stage_base, row: Int32):
        """64 e4m3 channels of block ``blk`` times 2^(s - 127) (from the exponent bits: exact
        for every scale byte) -> bf16 in the tile, 16 channels per 16-byte load."""
        scale = (Int32(sbyte) << 23).bitcast(Float32)
        raw = cute.make_rmem_tensor(cute.make_layout(16), Uint8)
        y = cute.make_rmem_tensor(cute.make_layout(16), BFloat16)
        for c in cutlass.range_constexpr(4):
            cute.autovec_copy(_gmem(Uint8, data + blk * 64 + c * 16, 16, 16), raw)
            x = cute.recast_tensor(raw, cutlass.Float8E4M3FN).load().to(Float32)
            y.store((x * scale).to(BFloat16))
            for e in cutlass.range_constexpr(2):
                self._st16(y, e * 8, stage_base, row, blk * 64 + c * 16 + e * 8)

    @cute.jit
    def _st16(self, y: cute.Tensor, first: int, stage_base, row: Int32, d: Int32):
        """Eight bf16 of ``y`` from ``first`` -> tile (row, d .. d+8): one 16-byte store."""
        dst = cute.make_tensor(
            cute.make_ptr(BFloat16, stage_base + _swz(row, d), cute.AddressSpace.smem,
                          assumed_align=16),
            cute.make_layout(8),
        )  # fmt: skip
        src = cute.make_tensor(y.iterator + first, cute.make_layout(8))
        cute.autovec_copy(src, dst)

    @cute.jit
    def _zero_row(self, stage_base, row: Int32, half: Int32):
        """An empty slot: zeros (stale bits could be NaN, and 0 * NaN is NaN)."""
        y = cute.make_rmem_tensor(cute.make_layout(8), BFloat16)
        y.fill(0.0)
        for c in cutlass.range_constexpr(32):
            self._st16(y, 0, stage_base, row, half * 256 + c * 8)

    # ------------------------------------------------------------------ consumers

    @cute.jit
    def _consume(self, qk_mma: cute.TiledMma, pv_mma: cute.TiledMma, pipe, sq: cute.Tensor,
                 sk: cute.Tensor, sv: cute.Tensor, bias: cute.Tensor, nblk: Int32,
                 qk_scale: Float32, ct: Int32):  # fmt: skip
        """Online softmax over the CTA's blocks -> (O accumulator [rows of 2 x 256 channels],
        running max (log2 domain) and this thread's partial row sums, per accumulator row)."""
        thr_qk = qk_mma.get_slice(ct % 128)
        thr_pv = pv_mma.get_slice(ct)
        r_q = thr_qk.make_fragment_A(thr_qk.partition_A(sq))
        r_k = thr_qk.make_fragment_B(thr_qk.partition_B(sk))
        r_v = thr_pv.make_fragment_B(thr_pv.partition_B(sv))
        acc_o = thr_pv.make_fragment_C(thr_pv.partition_shape_C((BH, D)))
        acc_o.fill(0.0)
        o_mn = _rows_view(acc_o)
        m = cute.make_rmem_tensor(cute.make_layout(2), Float32)
        lsum = cute.make_rmem_tensor(cute.make_layout(2), Float32)
        m.fill(_FLOOR)
        lsum.fill(0.0)
        lane = ct % 4
        state = pipeline.make_pipeline_state(pipeline.PipelineUserType.Consumer, STAGES)
        for _ in cutlass.range(nblk, unroll=1):
            pipe.consumer_wait(state)
            acc_s = thr_qk.make_fragment_C(thr_qk.partition_shape_C((BH, BN)))
            warpgroup.fence()
            for kb in cutlass.range_constexpr(cute.size(r_q, mode=[2])):
                qk_mma.set(warpgroup.Field.ACCUMULATE, kb != 0)
                cute.gemm(qk_mma, acc_s, r_q[None, None, kb], r_k[None, None, kb, state.index],
                          acc_s)  # fmt: skip
            warpgroup.commit_group()
            warpgroup.wait_group(0)
            s_mn = _rows_view(acc_s)
            for r in cutlass.range_constexpr(2):
                mx = m[r]
                for j in cutlass.range_constexpr(cute.size(s_mn, mode=[1])):
                    key = (j // 2) * 8 + lane * 2 + j % 2
                    s_mn[r, j] = s_mn[r, j] * qk_scale + bias[key, state.index]
                    mx = cute.arch.fmax(mx, s_mn[r, j])
                mx = cute.arch.warp_reduction_max(mx, threads_in_group=4)
                alpha = cute.math.exp2(m[r] - mx, fastmath=True)
                m[r] = mx
                part = Float32(0.0)
                for j in cutlass.range_constexpr(cute.size(s_mn, mode=[1])):
                    s_mn[r, j] = cute.math.exp2(s_mn[r, j] - mx, fastmath=True)
                    part += s_mn[r, j]
                lsum[r] = lsum[r] * alpha + part
                for j in cutlass.range_constexpr(cute.size(o_mn, mode=[1])):
                    o_mn[r, j] = o_mn[r, j] * alpha
            r_p = _acc_to_operand_a(acc_s, pv_mma)
            warpgroup.fence()
            pv_mma.set(warpgroup.Field.ACCUMULATE, True)
            for kb in cutlass.range_constexpr(cute.size(r_p, mode=[2])):
                cute.gemm(pv_mma, acc_o, r_p[None, None, kb], r_v[None, None, kb, state.index],
                          acc_o)  # fmt: skip
            warpgroup.commit_group()
            warpgroup.wait_group(0)
            pipe.consumer_release(state)
            state.advance()
        return acc_o, m, lsum

    # ------------------------------------------------------------------ epilogue

    @cute.jit
    def _epilogue(self, pv_mma: cute.TiledMma, acc: cute.Tensor, m: cute.Tensor,
                  lsum: cute.Tensor, sink: cute.Pointer, out: cute.Pointer, lse: cute.Pointer,
                  part_o: cute.Pointer, part_lse: cute.Pointer, counters: cute.Pointer,
                  geo: Geometry, t: Int32, h0: Int32, split: Int32, num_splits: Int32,
                  flag: cute.Pointer, ct: Int32):  # fmt: skip
        """Accumulator element (r, j) of consumer thread ``ct``: head ``h0 + 16 warp + lane / 4
        + 8 r``, channel ``256 wg + 8 (j / 2) + 2 (lane % 4) + j % 2``."""
        o_mn = _rows_view(acc)
        lane = ct % 32
        head0 = h0 + ((ct % 128) // 32) * 16 + lane // 4
        col0 = (ct // 128) * 256 + (lane % 4) * 2
        sinks = cute.make_tensor(sink, cute.make_layout(self.heads))
        for r in cutlass.range_constexpr(2):
            lsum[r] = cute.arch.warp_reduction_sum(lsum[r], threads_in_group=4)
        for r in cutlass.range_constexpr(2):
            head = head0 + 8 * r
            row_lse = m[r] + cute.math.log2(lsum[r], fastmath=False)
            if cutlass.const_expr(self.split):
                inv = 1.0 / cutlass.max(lsum[r], Float32(1.0))  # l is 0 or >= 1
                row = (Int64(t) * num_splits + split) * self.heads + head
                for j in cutlass.range_constexpr(0, cute.size(o_mn, mode=[1]), 2):
                    pair = cute.make_rmem_tensor(cute.make_layout(2), Float32)
                    pair[0] = o_mn[r, j] * inv
                    pair[1] = o_mn[r, j + 1] * inv
                    at = part_o.toint() + (row * D + col0 + (j // 2) * 8) * 4
                    _store(pair, Float32, at, 8)
                if ct < 128 and lane % 4 == 0:
                    cute.make_tensor(part_lse, cute.make_layout(1 << 30))[row] = row_lse
            else:
                sink2 = sinks[head] * LOG2E
                inv = 1.0 / (lsum[r] + cute.math.exp2(sink2 - m[r], fastmath=False))
                base = out.toint() + (Int64(t) * geo.o_st + Int64(head) * geo.o_sh + col0) * 2
                for j in cutlass.range_constexpr(0, cute.size(o_mn, mode=[1]), 2):
                    pair = cute.make_rmem_tensor(cute.make_layout(2), BFloat16)
                    pair[0] = (o_mn[r, j] * inv).to(BFloat16)
                    pair[1] = (o_mn[r, j + 1] * inv).to(BFloat16)
                    _store(pair, BFloat16, base + (j // 2) * 16, 4)
                if cutlass.const_expr(self.write_lse):  # noqa: SIM102 - a compile-time switch
                    if ct < 128 and lane % 4 == 0:
                        cute.make_tensor(lse, cute.make_layout(1 << 30))[t * self.heads + head] = (
                            row_lse * LN2
                        )
        if cutlass.const_expr(self.split):
            self._last_combines(sinks, out, lse, part_o, part_lse, counters, geo, t, h0,
                                num_splits, flag, ct)  # fmt: skip

    @cute.jit
    def _last_combines(self, sinks: cute.Tensor, out: cute.Pointer, lse: cute.Pointer,
                       part_o: cute.Pointer, part_lse: cute.Pointer, counters: cute.Pointer,
                       geo: Geometry, t: Int32, h0: Int32, num_splits: Int32,
                       flag: cute.Pointer, ct: Int32):  # fmt: skip
        """The last CTA of (t, head block) to write its partials merges all of them: thread
        ``ct`` owns head ``ct / 4``, channels ``128 (ct % 4) .. + 128``."""
        flags = cute.make_tensor(flag, cute.make_layout(4))
        cute.arch.fence_acq_rel_gpu()  # this CTA's partials before its count
        cute.arch.barrier(barrier_id=1, number_of_threads=256)
        cidx = t * self.head_blocks + h0 // BH
        if ct == 0:
            old = cute.arch.atomic_add(
                (counters + cidx).llvm_ptr, Int32(1), sem="acq_rel", scope="gpu"
            )
            flags[0] = Int32(0)
            if old == num_splits - 1:
                flags[0] = Int32(1)
        cute.arch.barrier(barrier_id=1, number_of_threads=256)
        if flags[0] == 1:
            cute.arch.fence_acq_rel_gpu()  # every CTA's partials after their counts
            head = h0 + ct // 4
            lse_t = cute.make_tensor(part_lse, cute.make_layout(1 << 30))
            first = Int64(t) * num_splits * self.heads + head
            top = -Float32.inf
            for s in cutlass.range(num_splits, unroll=1):
                top = cute.arch.fmax(top, lse_t[first + s * self.heads])
            if top == -Float32.inf:
                top = Float32(0.0)  # every split empty: weights 0, output 0
            total = Float32(0.0)
            for s in cutlass.range(num_splits, unroll=1):
                total += cute.math.exp2(lse_t[first + s * self.heads] - top, fastmath=False)
            inv = 1.0 / (total + cute.math.exp2(sinks[head] * LOG2E - top, fastmath=False))
            acc = cute.make_rmem_tensor(cute.make_layout(32), Float32)
            x = cute.make_rmem_tensor(cute.make_layout(32), Float32)
            y = cute.make_rmem_tensor(cute.make_layout(32), BFloat16)
            for c in cutlass.range_constexpr(4):
                col = (ct % 4) * 128 + c * 32
                acc.fill(0.0)
                for s in cutlass.range(num_splits, unroll=1):
                    w = cute.math.exp2(lse_t[first + s * self.heads] - top, fastmath=False)
                    at = part_o.toint() + ((first + s * self.heads) * D + col) * 4
                    cute.autovec_copy(_gmem(Float32, at, 32, 16), x)
                    acc.store(acc.load() + x.load() * w)
                y.store((acc.load() * inv).to(BFloat16))
                at = out.toint() + (Int64(t) * geo.o_st + Int64(head) * geo.o_sh + col) * 2
                cute.autovec_copy(y, _gmem(BFloat16, at, 32, 16))
            if cutlass.const_expr(self.write_lse) and ct % 4 == 0:
                cute.make_tensor(lse, cute.make_layout(1 << 30))[t * self.heads + head] = (
                    top + cute.math.log2(total, fastmath=False)
                ) * LN2
            if ct == 0:
                cute.make_tensor(counters, cute.make_layout(1 << 30))[cidx] = Int32(0)


# ---------------------------------------------------------------------- helpers


def _tiled_mma(b_major, tiler_mn, atom_layout, smem_a: bool) -> cute.TiledMma:
    """bf16 x bf16 -> fp32 wgmma, A K-major (from shared memory or registers)."""
    src = warpgroup.OperandSource.SMEM if smem_a else warpgroup.OperandSource.RMEM
    op = warpgroup.MmaF16BF16Op(
        BFloat16, Float32, (*tiler_mn, 16), src, warpgroup.OperandMajorMode.K, b_major
    )
    return cute.make_tiled_mma(cute.make_mma_atom(op), atom_layout)


@cute.jit
def _rows_view(acc: cute.Tensor) -> cute.Tensor:
    """A wgmma fp32 accumulator ((2, 2, N/8), 1, 1) as (2 rows, N/4 columns): value
    (c, r, g) sits in row 8 r (+ lane / 4) and column 8 g + c (+ 2 (lane % 4))."""
    n = cute.size(acc)
    return cute.make_tensor(acc.iterator, cute.make_layout((2, (2, n // 4)), stride=(2, (1, 4))))


@cute.jit
def _acc_to_operand_a(acc: cute.Tensor, mma: cute.TiledMma) -> cute.Tensor:
    """The softmax probabilities in ``acc`` (the S accumulator) as bf16 register operand A of
    the P V wgmma: each k16 slice of A is two 8-column groups of the accumulator."""
    a = mma.tv_layout_A.shape[1]
    c = acc.layout
    layout = cute.make_layout(
        (a, c.shape[1], (c.shape[2], cute.size(c, mode=[0]) // cute.size(a))),
        stride=(c.stride[0], c.stride[1], (c.stride[2], cute.size(a, mode=[2]) * c.stride[0][2])),
    )
    op = cute.make_rmem_tensor(layout, BFloat16)
    cute.make_tensor(op.iterator, acc.layout).store(acc.load().to(BFloat16))
    return op


@cute.jit
def _gmem(dtype, at, n: int, align: int) -> cute.Tensor:
    return cute.make_tensor(
        cute.make_ptr(dtype, at, cute.AddressSpace.gmem, assumed_align=align), cute.make_layout(n)
    )


@cute.jit
def _store(src: cute.Tensor, dtype, at, align: int):
    cute.autovec_copy(src, _gmem(dtype, at, cute.size(src), align))
