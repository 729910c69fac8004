"""Decode batches as static-shape device work: the CUDA-graph path of every layer kind.

A decode batch has one new token per request, so everything a layer needs can be computed on
the device from four tensors SGLang keeps in graph-static buffers (``req_pool_indices``,
``positions``, ``out_cache_loc``; ``req_to_token`` and the full -> swa map are pool tensors):

* ``window``  [B, W]  swa slots of positions ``t-W+1 .. t`` (-1 before position 0)
* ``pages``   [B, P]  full page ids of the request's blocks ``0 .. P-1`` (``P`` static: the
  batch's longest sequence in eager mode, the context length under a captured graph); entry
  ``i`` of a c4 / c128 layer is flat entry row ``pages[i // (B/r)] * (B/r) + i % (B/r)``
* ``tail_rows`` [B]   the requests' tail rows, or the pool's spare row for padding
* ``valid`` [B]      real tokens: SGLang pads graph batches with token slot 0 (never owned)
* ``hca_rows`` [B, E] int32: flat c128 entry rows of entries ``0 .. E-1`` (-1 past the visible
  count; ``E`` = every entry of ``P`` blocks padded to a multiple of 64, FlashMLA's list unit)
* ``boundary_table`` [B, P] int32: the swa page of this token in its block's column, -1
  elsewhere and on padded rows (where the kernels keep c4 block-end state, see
  ``kernels.compressor``)

Compressed layers then run the batched compressor step with its entry / block-end stores gated
on the device, so no host branch exists. Padded rows write only to page 0, swa slot 0 and the
spare tail row.

Ops (chosen once at backend construction, see ``decode_ops``): :class:`DecodeTorch` is the
twin (the ``ref`` math: ``compress_decode``, ``index_scores`` / ``index_topk``, ``attend`` on rows
read through ``LayerKV``); ``attention.decode_kernels.DecodeKernels`` the GPU kernels. Both:
``build_meta(...)`` once per step (the twin: :func:`build_decode_meta`'s ~45 torch ops; the
kernels: one launch, ``kernels.decode_meta``), ``plan(bs, pages)`` once per batch (host;
returns the batch's kernel state, kept by captured graphs) and
``run(plan, kind, lk, meta, q, kv, sink, scale, comp, kv_norm)`` per layer. With a
:class:`KVNorm`, ``kv`` is the raw ``wkv(x)`` and the store applies ``kv_norm`` + RoPE (fused
into the KV-store kernel on the GPU); without, ``kv`` is already normed and roped.
"""

from dataclasses import dataclass

import torch

from sglang_dsv4.config import AttnKind
from sglang_dsv4.mem.pools import LayerKV
from sglang_dsv4.ref.attention import attend
from sglang_dsv4.ref.compressor import CompressorWeights, compress_decode
from sglang_dsv4.ref.indexer import fp8_rotated_queries, index_scores, index_topk
from sglang_dsv4.ref.norm import rms_norm
from sglang_dsv4.ref.rope import apply_rope, rope_cos_sin

__all__ = [
    "DecodeMeta",
    "DecodeTorch",
    "KVNorm",
    "build_decode_meta",
    "decode_attention",
    "decode_ops",
    "hca_list_width",
]

_LIST_ALIGN = 64  # FlashMLA reads index lists in multiples of 64


def hca_list_width(n_pages: int, block: int) -> int:
    """Width of a decode query's c128 entry list: every entry of ``n_pages`` blocks, padded."""
    n = max(n_pages * (block // 128), 1)
    return -(-n // _LIST_ALIGN) * _LIST_ALIGN


@dataclass
class KVNorm:
    """What turns the raw ``wkv(x)`` [T, D] into the stored KV row: ``kv_norm`` + RoPE."""

    weight: torch.Tensor  # [D] kv_norm weight
    inv_freq: torch.Tensor  # [rope_dim // 2] fp32, the layer's RoPE
    positions: torch.Tensor  # [T] int64
    eps: float

    def apply(self, kv: torch.Tensor) -> torch.Tensor:
        """The ``ref`` math (``RefDSV4.project``'s kv)."""
        cos, sin = rope_cos_sin(self.positions, self.inv_freq)
        return apply_rope(rms_norm(kv, self.weight, self.eps), cos, sin)


@dataclass
class DecodeMeta:
    positions: torch.Tensor  # [B] int64
    valid: torch.Tensor  # [B] bool
    tail_rows: torch.Tensor  # [B] int64
    out_swa: torch.Tensor  # [B] int64 swa slot of the new token
    window: torch.Tensor  # [B, W] int64 swa slots, -1 before position 0
    pages: torch.Tensor  # [B, P] int64 full page ids (0 where the request has none)
    entry_page: torch.Tensor  # [B] full page of this token's block (0 for padding)
    swa_page: torch.Tensor  # [B] swa page of this token (0 for padding)
    # int32 copies the kernels take (built once per step, shared by every layer)
    positions_i32: torch.Tensor
    tail_rows_i32: torch.Tensor
    window_i32: torch.Tensor
    pages_i32: torch.Tensor
    hca_rows: torch.Tensor
    # [B] int32 visible c128 entries (the valid prefix of hca_rows), at least 1: FlashMLA's
    # schedule wants a non-empty list (the -1 there is skipped), as SGLang clamps them
    hca_lengths: torch.Tensor
    boundary_table: torch.Tensor


def build_decode_meta(
    req_slots: torch.Tensor,
    positions: torch.Tensor,
    out_loc: torch.Tensor,
    req_to_token: torch.Tensor,
    full_to_swa: torch.Tensor,
    spare_tail_row: int,
    window: int,
    block: int,
    n_pages: int,
) -> DecodeMeta:
    """Device ops only (recordable in a CUDA graph); see the module docstring."""
    req_slots, positions, out_loc = req_slots.long(), positions.long(), out_loc.long()
    valid = out_loc > 0
    rows = req_slots.unsqueeze(1)  # [B, 1]: index only the columns needed, never whole rows
    cols = positions.unsqueeze(1) + torch.arange(-window + 1, 1, device=positions.device)
    full = req_to_token[rows, cols.clamp(min=0)].long()  # [B, W]
    win = torch.where(cols >= 0, full_to_swa[full], -1)
    starts = torch.arange(n_pages, device=positions.device) * block
    starts = starts.clamp(max=req_to_token.shape[1] - 1).unsqueeze(0)
    pages = req_to_token[rows, starts].long() // block  # [B, P]
    zero = torch.zeros_like(out_loc)
    tail_rows = torch.where(valid, req_slots, spare_tail_row)
    pages = torch.where(valid.unsqueeze(1), pages, 0)
    swa_page = torch.where(valid, full_to_swa[out_loc] // block, zero)
    return DecodeMeta(
        positions=positions,
        valid=valid,
        tail_rows=tail_rows,
        out_swa=full_to_swa[out_loc],
        window=win,
        pages=pages,
        entry_page=torch.where(valid, out_loc // block, zero),
        swa_page=swa_page,
        positions_i32=positions.int(),
        tail_rows_i32=tail_rows.int(),
        window_i32=win.int(),
        pages_i32=pages.int(),
        hca_rows=_hca_rows(pages, positions, block),
        hca_lengths=((positions + 1) // 128).clamp(min=1, max=hca_list_width(n_pages, block)).int(),
        boundary_table=torch.where(
            torch.arange(n_pages, device=positions.device) == (positions // block).unsqueeze(1),
            torch.where(valid, swa_page, -1).unsqueeze(1),
            -1,
        ).int(),
    )


def _hca_rows(pages: torch.Tensor, positions: torch.Tensor, block: int) -> torch.Tensor:
    """See ``DecodeMeta.hca_rows`` (c128: ``block // 128`` entries per page)."""
    per_page = block // 128
    offsets = torch.arange(per_page, device=pages.device)
    rows = (pages.unsqueeze(-1) * per_page + offsets).flatten(1)  # [B, P * per_page]
    width = hca_list_width(pages.shape[1], block)
    rows = torch.nn.functional.pad(rows, (0, width - rows.shape[1]), value=-1)
    ids = torch.arange(width, device=pages.device)
    return torch.where(ids < ((positions + 1) // 128).unsqueeze(1), rows, -1).int()


class DecodeTorch:
    """The twin: the ``ref`` math of a decode step on the pools (CPU, fp32 / bf16 rows)."""

    def build_meta(
        self,
        req_slots: torch.Tensor,
        positions: torch.Tensor,
        out_loc: torch.Tensor,
        req_to_token: torch.Tensor,
        full_to_swa: torch.Tensor,
        spare_tail_row: int,
        tail_pos: torch.Tensor,
        *,
        window: int,
        block: int,
        n_pages: int,
    ) -> DecodeMeta:
        """The step's :class:`DecodeMeta` (:func:`build_decode_meta`, device ops only) and the
        tails' progress ``tail_pos[tail_row] = pos + 1`` (on the device: no host sync per step;
        extend plans read it)."""
        meta = build_decode_meta(
            req_slots, positions, out_loc, req_to_token, full_to_swa, spare_tail_row, window,
            block, n_pages,
        )  # fmt: skip
        tail_pos[meta.tail_rows] = meta.positions + 1
        return meta

    def plan(self, bs: int, pages: int) -> None:
        """No host work: the torch ops size themselves."""
        return None

    def after_warmup(self, plan) -> None:
        """Between a graph's warm-up run and its capture (kernels reset schedules here)."""

    def run(
        self,
        plan,
        kind: AttnKind,
        lk: LayerKV,
        meta: DecodeMeta,
        q: torch.Tensor,
        kv: torch.Tensor,
        sink: torch.Tensor,
        scale: float,
        comp=None,
        kv_norm: KVNorm | None = None,
    ) -> torch.Tensor:
        """``q`` [B, H, D], ``kv`` [B, D] (raw with ``kv_norm``, else normed and roped) ->
        ``o`` [B, H, D]."""
        if kv_norm is not None:
            kv = kv_norm.apply(kv)
        return decode_attention(lk, meta, q, kv, sink, scale, comp)


def decode_ops(pool, num_heads: int, index_topk: int, index_heads: int, kernels: bool):
    """The decode ops of a pool, chosen once: GPU kernels (``kernels``) or the torch twin."""
    if not kernels:
        return DecodeTorch()
    from sglang_dsv4.attention.decode_kernels import DecodeKernels

    return DecodeKernels(pool.schema, num_heads, index_topk, index_heads, pool.device)


def decode_attention(
    lk: LayerKV,
    meta: DecodeMeta,
    q: torch.Tensor,
    kv: torch.Tensor,
    sink: torch.Tensor,
    scale: float,
    comp=None,
    flush=None,
) -> torch.Tensor:
    """``q`` [B, H, D], ``kv`` [B, D] of the new tokens -> ``o`` [B, H, D] (all layer kinds:
    ``comp`` carries the compressor / indexer inputs of c4 and c128 layers), the ``ref`` math.
    ``flush(write, per_page, tail, boundary, meta, comp, w)`` feeds the compressors (default:
    one token per row; a speculative verify feeds each request's tokens in order)."""
    flush = flush or _flush_rows
    lk.write_raw(meta.out_swa, kv)
    keys = lk.read_raw(meta.window.clamp(min=0))  # [B, W, D]
    valid = meta.window >= 0
    if comp is not None:
        per_page = lk.entry_rows.rows_per_page
        flush(lk.write_entries, per_page, lk.tail, lk.boundary, meta, comp, comp.compressor)
        if comp.indexer is not None:
            flush(
                lk.write_index_keys, per_page, lk.index_tail, lk.index_boundary, meta, comp,
                comp.indexer.compressor,
            )  # fmt: skip
        rows, ok = _entry_rows(lk, meta, comp)  # [B, K] flat entry rows each query attends
        keys = torch.cat([keys, lk.read_entries(rows.clamp(min=0)).to(keys.dtype)], dim=1)
        valid = torch.cat([valid, ok], dim=1)
    return attend(q, keys, valid, sink, scale)


def _flush_rows(write, per_page: int, tail, boundary, meta: DecodeMeta, comp, w) -> None:
    """Each row's token into its request's compressor (a decode step)."""
    _flush(write, per_page, tail, boundary, meta, comp.x, w, comp)


def _entry_rows(lk: LayerKV, meta: DecodeMeta, comp) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of the flattened entries a c128 query sees (all visible) or a c4 query picks (the
    indexer's top-k), [B, K], with their validity."""
    per_page = lk.entry_rows.rows_per_page
    offsets = torch.arange(per_page, device=meta.pages.device)
    rows = (meta.pages.unsqueeze(-1) * per_page + offsets).flatten(1)  # [B, E] entry i -> row
    n_visible = (meta.positions + 1) // comp.compressor.ratio  # [B]
    if comp.indexer is None:
        ids = torch.arange(rows.shape[1], device=rows.device)
        return rows, ids < n_visible.unsqueeze(1)
    ix = comp.indexer
    index_keys = lk.read_index_keys(rows)  # [B, E, Di] (key rows = entry rows on c4)
    # FP8 keys: the kernels score e4m3 queries (extend and decode alike)
    q = ix.q if lk.key_rows.layout is None else fp8_rotated_queries(ix.q)
    scores = index_scores(q, ix.weights, index_keys)  # [B, E]
    picks = index_topk(scores, meta.positions, comp.compressor.ratio, ix.topk)  # [B, k]
    return rows.gather(1, picks.clamp(min=0)), picks >= 0


def _flush(
    write,
    per_page: int,
    tail,
    boundary,
    meta: DecodeMeta,
    x: torch.Tensor,
    w: CompressorWeights,
    comp,
) -> None:
    """One compressor step for every request; stores are gated on the device. ``write``:
    ``LayerKV.write_entries`` / ``write_index_keys``; ``per_page``: entries per block."""
    rows = meta.tail_rows
    entry, emit, kv, score = compress_decode(
        x, meta.positions, tail.kv[rows], tail.score[rows], w, comp.inv_freq, comp.norm_eps
    )
    tail.kv[rows], tail.score[rows] = kv, score
    ratio = w.ratio
    # Entry pos // r sits in this token's block at row (pos % block) // r; others go to page 0.
    row = (meta.positions % (per_page * ratio)) // ratio
    page = torch.where(emit & meta.valid, meta.entry_page, 0)
    write(page * per_page + row, entry)
    if boundary is not None:  # c4: keep the state at block ends with the swa page
        block_end = (meta.positions + 1) % (per_page * ratio) == 0
        at = torch.where(block_end & meta.valid, meta.swa_page, 0)
        half, d = boundary.kv.shape[1], boundary.kv.shape[2]
        boundary.kv[at] = kv[:, :half, :d]
        boundary.score[at] = score[:, :half, :d]
