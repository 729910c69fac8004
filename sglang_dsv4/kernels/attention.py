"""Sparse MQA attention of DSV4 over per-query row lists, for Hopper (twin:
``ref.attention.sparse_attention``).

One kernel family serves every attention call of the model: CSA decode (top-k entries + the
``swa_window``), HCA decode (all visible entries + the window), MTP rows and prefill / extend
(every query row carries its own lists, so causal visibility is whatever the lists say). Query
``t`` attends to the rows ``indices[t]`` of a main cache and, optionally, ``extra_indices[t]`` of
an extra cache (FlashMLA's ``indices`` / ``extra_indices_in_kvcache``); ``-1`` is an empty slot,
and an optional per-query length cuts each list (FlashMLA's ``topk_length``). With
``l_i = q[t, h] . k_i * scale`` over the valid rows of both lists:

    o[t, h] = sum_i exp(l_i) k_i / (sum_i exp(l_i) + exp(sink[h]))      (K = V, one KV head)
    lse[t, h] = log sum_i exp(l_i)      (natural log, sink excluded, -inf for an empty list)

Caches (``D`` = head dim, the last 64 channels are RoPE):

* FP8, FlashMLA's DSV4 layout: a row is ``D-64`` e4m3 nope channels, 64 bf16 RoPE channels, one
  UE8M0 exponent byte per 64 nope channels and one pad byte (584 bytes at D=512, see
  ``ref.kv_layout``). A 2-D uint8 ``[N, row_bytes]`` tensor holds one such row per index. A 3-D
  ``[pages, P, row_bytes]`` or 4-D ``[pages, P, 1, row_bytes]`` tensor is FlashMLA's paged form:
  index ``i`` is slot ``i % P`` of page ``i // P``; a page stores the ``P`` nope+RoPE parts
  (``D+64`` bytes each) first, then the ``P`` scale parts, and pages are ``stride(0)`` bytes apart
  (``fp8_rows_to_pages`` builds it). The 2-D form is the paged form with ``P = 1``.
* bf16: ``[N, D]``, ``[pages, P, D]`` or ``[pages, P, 1, D]`` (any page and row strides).

Tiling (kernels in ``attention_kernels``): one program owns one query row, ``block_h`` heads
(all heads sharing the key tile, so a key row is gathered and dequantized once per head group) and
one split of the concatenated list. It walks the list ``block_n`` rows at a time: gather the rows,
dequantize FP8 -> bf16 in registers, ``S = Q K^T`` and ``O += P K`` on the tensor cores, online
softmax in the exp2 domain. With one split the program applies the sink and writes bf16 output
directly; with several (small batches, long lists) each split writes an fp32 partial
``(o / l, log2 l + m)`` and a combine kernel merges them.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from sglang_dsv4.kernels.attention_kernels import (
    KSHIFT,
    LOG2E,
    ROPE_DIM,
    sparse_mqa_combine,
    sparse_mqa_fwd,
)

__all__ = ["SparseMQA", "TileConfig", "fp8_page_bytes", "fp8_rows_to_pages", "plan_splits"]

# See plan_splits: a 64-row tile costs ~25x the write + combine of one more split's partial.
_TILE_TO_SPLIT_COST = 25.0


def fp8_page_bytes(page_size: int, head_dim: int = 512) -> int:
    """Bytes of one FlashMLA page of ``page_size`` rows, padded to a multiple of 576 as FlashMLA's
    own packer does."""
    nope = head_dim - ROPE_DIM
    raw = page_size * (nope + 2 * ROPE_DIM + nope // 64 + 1)
    return -(-raw // 576) * 576


def fp8_rows_to_pages(rows: torch.Tensor, page_size: int, head_dim: int = 512) -> torch.Tensor:
    """uint8 ``[N, row_bytes]`` rows (``ref.kv_layout.pack_fp8_rows``) -> FlashMLA pages, viewed
    ``[pages, page_size, 1, row_bytes]`` as FlashMLA takes them (N is padded with zero rows)."""
    data = head_dim - ROPE_DIM + 2 * ROPE_DIM
    row_bytes = rows.shape[1]
    n_pages = -(-rows.shape[0] // page_size)
    padded = rows.new_zeros(n_pages * page_size, row_bytes)
    padded[: rows.shape[0]] = rows
    padded = padded.view(n_pages, page_size, row_bytes)
    buf = rows.new_zeros(n_pages, fp8_page_bytes(page_size, head_dim))
    buf[:, : page_size * data] = padded[:, :, :data].reshape(n_pages, -1)
    buf[:, page_size * data : page_size * row_bytes] = padded[:, :, data:].reshape(n_pages, -1)
    return buf[:, : page_size * row_bytes].view(n_pages, page_size, 1, row_bytes)


@dataclass(frozen=True)
class TileConfig:
    """Launch shape. ``dequant``: 0 = the compiler's e4m3 -> fp32 conversion, 1 = integer bit
    placement into fp32, 2 = the same into bf16, 3 = the same as packed PTX (GPU only). 1-3
    support scale bytes <= 194, i.e. 64-channel blocks with amax < 448 * 2^67. ``prefetch``:
    0 = none, 1 = each tile's index list one tile ahead, 2 = also its rows (registers)."""

    block_h: int = 64
    block_n: int = 64
    num_warps: int = 8
    num_stages: int = 1
    dequant: int = 3
    prefetch: int = 0


def _cache_geometry(cache: torch.Tensor) -> tuple[torch.Tensor, int, int, int]:
    """-> (cache with a 1-byte or bf16 element type, page size, page stride, row stride), strides
    in elements. 2-D caches are one row per index (page size 1)."""
    if cache.dtype != torch.bfloat16 and cache.dtype != torch.uint8:
        cache = cache.view(torch.uint8)  # float8 views of the same bytes
    if cache.dim() == 2:
        return cache, 1, cache.stride(0), cache.stride(0)
    return cache, cache.shape[1], cache.stride(0), cache.stride(1)


def _flat_indices(indices: torch.Tensor) -> torch.Tensor:
    """[T, K] or FlashMLA's [B, S_q, K] -> [T, K] (a view)."""
    return indices.flatten(0, -2) if indices.dim() == 3 else indices


# sparse_mqa_fwd's arguments for the main and the extra list, in _list_args's order.
_MAIN_ARGS = ("kv", "idx_ptr", "stride_it", "len_ptr", "page_size", "page_stride", "row_stride",
              "K")  # fmt: skip
_EXTRA_ARGS = ("xkv", "xidx_ptr", "stride_xt", "xlen_ptr", "xpage_size", "xpage_stride",
               "xrow_stride", "K2")  # fmt: skip


def _list_args(
    names: tuple[str, ...],
    kv: torch.Tensor,
    indices: torch.Tensor,
    lengths: torch.Tensor | None,
    topk: int,
) -> dict:
    """Kernel arguments of one row list (``names``: which list): its cache and geometry, its
    [T, topk] indices and per-query lengths (the indices stand in when there are none: the
    kernel's HAS_LEN / HAS_XLEN is then off and it reads no length)."""
    indices = _flat_indices(indices)
    kv, page, page_stride, row_stride = _cache_geometry(kv)
    lens = indices if lengths is None else lengths
    values = (kv, indices, indices.stride(0), lens, page, page_stride, row_stride, topk)
    return dict(zip(names, values, strict=True))


def plan_splits(
    keys: int, block_n: int, units: int, num_sms: int, num_splits: int | None = None
) -> tuple[int, int]:
    """(keys per split, splits) for lists of ``keys`` slots in blocks of ``block_n``, ``units``
    programs per split (rows x head blocks). ``num_splits`` overrides the heuristic: split the
    lists until the grid covers the SMs once."""
    tiles = max(1, -(-keys // block_n))
    if num_splits is None:
        # One program per SM (255 registers a thread), one wave: units * splits <= SMs.
        # Each split adds a fp32 [H, D] partial to write and combine:
        # time ~ tile_cost * tiles / splits + split_cost * splits, minimal at
        # sqrt(tiles * tile_cost / split_cost); the ratio is ~25 on an H100 (1M-context HCA
        # at batch 1: 130 splits 53 us, 65 splits 40 us, 33 splits 47 us).
        num_splits = min(
            num_sms // max(1, units), max(1, round(math.sqrt(_TILE_TO_SPLIT_COST * tiles)))
        )
    num_splits = max(1, min(num_splits, tiles))
    chunk = -(-tiles // num_splits) * block_n
    return chunk, -(-max(1, keys) // chunk)


class SparseMQA:
    """Plan/run wrapper (FlashInfer style) of the sparse MQA kernels.

    ``plan()`` does the host work of a batch once (split count, grids, workspace); ``run()`` only
    launches, so it can be captured in a CUDA graph and replayed with new values in the same
    tensors. One plan serves every layer of a kind in a step.

    Example::

        attn = SparseMQA(num_heads=64, head_dim=512, kv_fp8=True, device="cuda")
        attn.plan(num_tokens=T, topk=128, extra_topk=512)
        for layer in layers:
            o = attn.run(q, swa, swa_idx, sink, scale, extra_kv=c4, extra_indices=c4_idx)
    """

    def __init__(
        self,
        num_heads: int,
        head_dim: int = 512,
        *,
        kv_fp8: bool = True,
        device: torch.device | str = "cuda",
        config: TileConfig | None = None,
        num_sms: int | None = None,
    ):
        if head_dim % 64 or (head_dim // 64) & (head_dim // 64 - 1):
            raise ValueError(f"head_dim {head_dim} must be 64 times a power of 2")
        if kv_fp8 and head_dim < 2 * ROPE_DIM:
            raise ValueError(f"FP8 rows need nope channels: head_dim {head_dim} <= {ROPE_DIM}")
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.kv_fp8 = kv_fp8
        self.device = torch.device(device)
        cfg = config or TileConfig()
        block_h = max(16, min(cfg.block_h, triton.next_power_of_2(num_heads)))
        dequant = cfg.dequant if kv_fp8 else 0
        if self.device.type != "cuda":
            dequant = min(dequant, 1)  # the interpreter has no PTX and no bf16 arithmetic
        self.config = dataclasses.replace(cfg, block_h=block_h, dequant=dequant)
        if num_sms is None:
            num_sms = (
                torch.cuda.get_device_properties(self.device).multi_processor_count
                if self.device.type == "cuda"
                else 132
            )
        self.num_sms = num_sms

    def plan(
        self,
        num_tokens: int,
        topk: int,
        extra_topk: int = 0,
        *,
        num_splits: int | None = None,
        return_lse: bool = False,
    ) -> None:
        """Host work for a batch of ``num_tokens`` query rows with lists of ``topk`` (main) and
        ``extra_topk`` (extra cache, 0 = none) slots. ``num_splits`` overrides the heuristic:
        split the lists until the grid covers the SMs once."""
        cfg = self.config
        self.num_tokens, self.topk, self.extra_topk = num_tokens, topk, extra_topk
        head_blocks = -(-self.num_heads // cfg.block_h)
        self.chunk, self.num_splits = plan_splits(
            topk + extra_topk, cfg.block_n, num_tokens * head_blocks, self.num_sms, num_splits
        )
        self.grid = (max(1, num_tokens) * head_blocks, self.num_splits)
        dev = self.device
        h, d = self.num_heads, self.head_dim
        self.out = torch.empty(num_tokens, h, d, dtype=torch.bfloat16, device=dev)
        self.lse = torch.empty(num_tokens, h, device=dev) if return_lse else None
        if self.num_splits > 1:
            self.part_o = torch.empty(num_tokens, self.num_splits, h, d, device=dev)
            self.part_lse = torch.empty(num_tokens, self.num_splits, h, device=dev)
            # Enough combine programs to spread the partial reads over the SMs.
            self.comb_h = 16 if num_tokens * -(-h // 16) * (d // 64) >= self.num_sms else 4
            self.comb_d = 64
            self.comb_grid = (max(1, num_tokens), -(-h // self.comb_h), d // self.comb_d)
        else:
            self.part_o = self.part_lse = None

    def run(
        self,
        q: torch.Tensor,
        kv: torch.Tensor,
        indices: torch.Tensor,
        sink: torch.Tensor,
        scale: float,
        *,
        extra_kv: torch.Tensor | None = None,
        extra_indices: torch.Tensor | None = None,
        lengths: torch.Tensor | None = None,
        extra_lengths: torch.Tensor | None = None,
        out: torch.Tensor | None = None,
        lse: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``q`` [T, H, D] bf16 (last dim contiguous); ``kv`` / ``extra_kv`` caches (module
        docstring); ``indices`` [T, topk] / ``extra_indices`` [T, extra_topk] int32 rows (-1 =
        none; FlashMLA's [B, S_q, K] also accepted); ``lengths`` / ``extra_lengths`` [T] int32
        valid prefix of each list (optional); ``sink`` [H] fp32; ``scale`` the logit scale.
        Writes and returns ``out`` [T, H, D] bf16 (default: the planned buffer, overwritten by
        the next run); the natural-log LSE goes to ``lse`` [T, H] (default: the planned one,
        when planned with ``return_lse``)."""
        if q.dtype != torch.bfloat16:
            raise ValueError(f"q must be bf16, got {q.dtype}")
        out = self.out if out is None else out
        lse = self.lse if lse is None else lse
        self._launch_fwd(
            q, kv, indices, lengths, extra_kv, extra_indices, extra_lengths, sink, scale, out, lse
        )
        if self.num_splits > 1:
            self._launch_combine(sink, out, lse)
        return out

    def _launch_fwd(
        self,
        q: torch.Tensor,
        kv: torch.Tensor,
        indices: torch.Tensor,
        lengths: torch.Tensor | None,
        extra_kv: torch.Tensor | None,
        extra_indices: torch.Tensor | None,
        extra_lengths: torch.Tensor | None,
        sink: torch.Tensor,
        scale: float,
        out: torch.Tensor,
        lse: torch.Tensor | None,
    ) -> None:
        """The attention kernel over both lists: final output with one split, else the fp32
        partials of every split. An absent optional tensor is replaced by some tensor of the
        right kind (the kernel never reads it: its constexpr flag is off), since Triton takes no
        ``None`` for a pointer."""
        cfg = self.config
        main = _list_args(_MAIN_ARGS, kv, indices, lengths, self.topk)
        has_extra = extra_kv is not None
        if has_extra:
            extra = _list_args(_EXTRA_ARGS, extra_kv, extra_indices, extra_lengths, self.extra_topk)
        else:  # never read (HAS_EXTRA, HAS_XLEN off): the main list's tensors stand in, at a
            # fixed geometry (one compiled variant whatever the main cache's pages)
            extra = dict(zip(_EXTRA_ARGS, main.values(), strict=True))
            extra |= {"xpage_size": 1, "xpage_stride": 0, "xrow_stride": 0, "K2": self.extra_topk}
        # The bit-placement dequant leaves keys 2^-KSHIFT too small: scale logits and output back.
        shift = 2.0**KSHIFT if cfg.dequant else 1.0
        split = self.num_splits > 1
        d = self.head_dim
        sparse_mqa_fwd[self.grid](
            q_ptr=q,
            stride_qt=q.stride(0),
            stride_qh=q.stride(1),
            **main,
            **extra,
            sink_ptr=sink,
            qk_scale=scale * LOG2E * shift,
            out_scale=shift,
            out_ptr=out,
            stride_ot=out.stride(0),
            stride_oh=out.stride(1),
            lse_ptr=lse if lse is not None else sink,
            part_o_ptr=self.part_o if split else out,
            part_lse_ptr=self.part_lse if split else sink,
            H=self.num_heads,
            chunk=self.chunk,
            num_splits=self.num_splits,
            D=d,
            NOPE_BLOCKS=(d - ROPE_DIM) // 64,
            BH=cfg.block_h,
            BN=cfg.block_n,
            FP8=self.kv_fp8,
            DEQUANT=cfg.dequant,
            HAS_EXTRA=has_extra,
            HAS_LEN=lengths is not None,
            HAS_XLEN=has_extra and extra_lengths is not None,
            SPLIT=split,
            WRITE_LSE=lse is not None,
            PREFETCH=cfg.prefetch,
            # The interpreter multiplies bf16 as raw uint16: give it fp32 operands.
            DOT_T=tl.bfloat16 if q.is_cuda else tl.float32,
            num_warps=cfg.num_warps,
            num_stages=cfg.num_stages,
        )

    def _launch_combine(
        self, sink: torch.Tensor, out: torch.Tensor, lse: torch.Tensor | None
    ) -> None:
        """Merge the splits' partials (and the sink) into ``out`` / ``lse``."""
        sparse_mqa_combine[self.comb_grid](
            part_o_ptr=self.part_o,
            part_lse_ptr=self.part_lse,
            sink_ptr=sink,
            out_ptr=out,
            stride_ot=out.stride(0),
            stride_oh=out.stride(1),
            lse_ptr=lse if lse is not None else sink,
            H=self.num_heads,
            num_splits=self.num_splits,
            D=self.head_dim,
            CH=self.comb_h,
            CD=self.comb_d,
            BS=triton.next_power_of_2(self.num_splits),
            WRITE_LSE=lse is not None,
            num_warps=4,
        )
