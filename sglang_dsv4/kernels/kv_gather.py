"""The FlashMLA extend workspace of one layer in one launch: every request's entries, then every
request's window rows, gathered from the layer's two pools into one bf16 buffer [N, 1, D].

FlashMLA's sparse prefill (``flash_mla_sparse_fwd``) reads one bf16 KV buffer; for FP8 pools
``attention.extend_choice.AttendFlashMLA`` used to fill it with SGLang's
``dequantize_k_cache_paged`` (``sglang.kernels.ops.attention.dsv4.dequant_k_cache``), once per
pool: two launches per c4 / c128 layer, each building three dtype views of its pool on the host.
Here one program per workspace row reads its row id (row ``r < n_ent``: entry row
``ent_rows[r]`` of ``ent_cache``, else raw row ``raw_rows[r - n_ent]`` of ``raw_cache``) and
writes its ``D`` channels; the page constants are the layouts' (``kv_store.FP8RowLayout.paged``:
a page's rows' 576 data bytes, then their 8 scale bytes).

The arithmetic is SGLang's kernel's, element for element: e4m3 -> fp32, times
``exp2(float(scale_byte - 127))``, rounded to bf16; the RoPE channels copied as bf16. The
GPU output is therefore bit-equal to SGLang's (the test compares both on random bytes, NaN and
Inf codes included). Plain bf16 pools (rows ``[n, D]``) are copied (``fp8=False``).

Twin: :func:`gather_rows_torch` (the pools' reader: ``FP8RowLayout.read`` +
``ref.kv_layout.unpack_fp8_rows`` rounded to bf16, or ``index_select`` of plain rows).
"""

import functools

import torch
import triton
import triton.language as tl

from sglang_dsv4.kernels.kv_store import FP8RowLayout
from sglang_dsv4.ref.kv_layout import unpack_fp8_rows

__all__ = ["gather_fp8_rows", "gather_plain_rows", "gather_rows_torch"]

_TILE = 64  # channels per FP8 scale (SGLang's TILE_SIZE)


@triton.jit
def _fp8_row(cache_ptr, loc, PAGE: tl.constexpr, PAGE_BYTES: tl.constexpr, NOPE: tl.constexpr,
             ROPE: tl.constexpr):  # fmt: skip
    """Byte pointers of row ``loc``'s data (nope e4m3, then RoPE bf16) and of its scales."""
    DATA: tl.constexpr = NOPE + 2 * ROPE
    SCALES: tl.constexpr = NOPE // 64 + 1  # one byte per 64 channels + the pad byte
    page = cache_ptr + (loc // PAGE) * PAGE_BYTES
    return page + (loc % PAGE) * DATA, page + PAGE * DATA + (loc % PAGE) * SCALES


@triton.jit(do_not_specialize=["n_ent"])
def _gather_rows_kernel(
    ent_ptr, ent_rows_ptr, raw_ptr, raw_rows_ptr, out_ptr, n_ent,
    ENT_PAGE: tl.constexpr, ENT_PAGE_BYTES: tl.constexpr,
    RAW_PAGE: tl.constexpr, RAW_PAGE_BYTES: tl.constexpr,
    NOPE: tl.constexpr, ROPE: tl.constexpr, TILES: tl.constexpr, FP8: tl.constexpr,
):  # fmt: skip
    r = tl.program_id(0)
    D: tl.constexpr = NOPE + ROPE
    out = out_ptr + r.to(tl.int64) * D
    if FP8:
        # uint8 pools: the row's data and scale bytes (entries first, then the raw rows)
        if r < n_ent:
            loc = tl.load(ent_rows_ptr + r).to(tl.int64)
            data, scales = _fp8_row(ent_ptr, loc, ENT_PAGE, ENT_PAGE_BYTES, NOPE, ROPE)
        else:
            loc = tl.load(raw_rows_ptr + (r - n_ent)).to(tl.int64)
            data, scales = _fp8_row(raw_ptr, loc, RAW_PAGE, RAW_PAGE_BYTES, NOPE, ROPE)
        tile = tl.arange(0, TILES)  # [TILES] (NOPE / 64 of them, padded to a power of 2)
        ch = tile[:, None] * 64 + tl.arange(0, 64)[None, :]  # [TILES, 64] nope channels
        ok = tile < NOPE // 64
        x = tl.load(data + ch, mask=ok[:, None], other=0).to(tl.float8e4nv, bitcast=True)
        s = tl.load(scales + tile, mask=ok, other=127).to(tl.int32)
        # SGLang's ops in its order (bit-equal bf16): fp32 value, exp2 of the unbiased exponent
        v = x.to(tl.float32) * tl.exp2((s - 127).to(tl.float32))[:, None]
        tl.store(out + ch, v.to(tl.bfloat16), mask=ok[:, None])
        rope = (data + NOPE).to(tl.pointer_type(tl.bfloat16))  # even byte offsets: aligned
        j = tl.arange(0, ROPE)
        tl.store(out + NOPE + j, tl.load(rope + j))
    else:
        # plain bf16 rows [n, D]: a copy
        if r < n_ent:
            row = ent_ptr + tl.load(ent_rows_ptr + r).to(tl.int64) * D
        else:
            row = raw_ptr + tl.load(raw_rows_ptr + (r - n_ent)).to(tl.int64) * D
        c = tl.arange(0, TILES)
        tl.store(out + c, tl.load(row + c, mask=c < D), mask=c < D)


def _launch(ent_cache, ent_rows, raw_cache, raw_rows, out, fp8, pages, page_bytes, rope_dim):
    """``out`` [n_ent + n_raw, 1, D] bf16 (contiguous rows); an empty entry list reads no
    entry pool (SWA layers have none: the raw pool stands in as the unused pointer)."""
    n_ent, d = ent_rows.numel(), out.shape[-1]
    nope = d - rope_dim
    tiles = triton.next_power_of_2(nope // _TILE) if fp8 else triton.next_power_of_2(d)
    _gather_rows_kernel[(out.shape[0],)](
        ent_ptr=raw_cache if n_ent == 0 else ent_cache, ent_rows_ptr=ent_rows,
        raw_ptr=raw_cache, raw_rows_ptr=raw_rows, out_ptr=out, n_ent=n_ent,
        ENT_PAGE=pages[0], ENT_PAGE_BYTES=page_bytes[0], RAW_PAGE=pages[1],
        RAW_PAGE_BYTES=page_bytes[1], NOPE=nope, ROPE=rope_dim, TILES=tiles, FP8=fp8,
        num_warps=4,
    )  # fmt: skip
    return out


@functools.cache
def _page_bytes(rows_per_page: int, d: int, rope_dim: int) -> int:
    return FP8RowLayout.paged(rows_per_page, d, rope_dim).page_bytes


def gather_fp8_rows(
    *,
    ent_cache: torch.Tensor | None,
    ent_rows: torch.Tensor,
    ent_page: int,
    raw_cache: torch.Tensor,
    raw_rows: torch.Tensor,
    raw_page: int,
    out: torch.Tensor,
    rope_dim: int = 64,
) -> torch.Tensor:
    """FP8 pools (uint8 [pages, page bytes], FlashMLA pages of ``ent_page`` / ``raw_page`` rows)
    -> ``out`` [len(ent_rows) + len(raw_rows), 1, D] bf16: the entry rows ``ent_rows`` [NE],
    then the raw rows ``raw_rows`` [NW] (int32 / int64 flat row ids), dequantized."""
    d = out.shape[-1]
    page_bytes = (_page_bytes(ent_page, d, rope_dim), _page_bytes(raw_page, d, rope_dim))
    _check(ent_cache, ent_rows, raw_cache, raw_rows, out, torch.uint8, page_bytes)
    return _launch(ent_cache, ent_rows, raw_cache, raw_rows, out, True, (ent_page, raw_page),
                   page_bytes, rope_dim)  # fmt: skip


def gather_plain_rows(
    *,
    ent_cache: torch.Tensor | None,
    ent_rows: torch.Tensor,
    raw_cache: torch.Tensor,
    raw_rows: torch.Tensor,
    out: torch.Tensor,
) -> torch.Tensor:
    """Plain bf16 pools (rows of ``D`` channels, any leading shape) -> ``out`` as above."""
    _check(ent_cache, ent_rows, raw_cache, raw_rows, out, torch.bfloat16, None)
    return _launch(ent_cache, ent_rows, raw_cache, raw_rows, out, False, (1, 1), (0, 0), 0)


def _check(ent_cache, ent_rows, raw_cache, raw_rows, out, dtype, page_bytes) -> None:
    if out.dtype != torch.bfloat16 or not out.is_contiguous():
        raise ValueError(f"out: contiguous bf16 [N, 1, D], got {out.dtype} {tuple(out.shape)}")
    if out.shape[0] != ent_rows.numel() + raw_rows.numel():
        raise ValueError(f"out has {out.shape[0]} rows for {ent_rows.numel()} + "
                         f"{raw_rows.numel()}")  # fmt: skip
    for name, cache, i in (("entry", ent_cache, 0), ("raw", raw_cache, 1)):
        if cache is None:
            if name == "raw" or ent_rows.numel():
                raise ValueError(f"no {name} pool for {name} rows")
            continue
        if cache.dtype != dtype or not cache.is_contiguous():
            raise ValueError(f"{name} pool: contiguous {dtype}, got {cache.dtype}")
        if page_bytes is not None and cache.shape[-1] != page_bytes[i]:
            raise ValueError(f"{name} pool pages of {cache.shape[-1]} bytes, expected "
                             f"{page_bytes[i]}")  # fmt: skip


def gather_rows_torch(
    *,
    ent_cache: torch.Tensor | None,
    ent_rows: torch.Tensor,
    raw_cache: torch.Tensor,
    raw_rows: torch.Tensor,
    out: torch.Tensor,
    pages: tuple[int, int] | None = None,
    rope_dim: int = 64,
) -> torch.Tensor:
    """The twin: ``pages`` (entry, raw rows per page) for FP8 pools, None for plain rows."""
    d = out.shape[-1]
    parts = []
    for cache, rows, i in ((ent_cache, ent_rows, 0), (raw_cache, raw_rows, 1)):
        if rows.numel() == 0:
            continue
        if pages is None:
            parts.append(cache.reshape(-1, d).index_select(0, rows.long()))
        else:
            layout = FP8RowLayout.paged(pages[i], d, rope_dim)
            parts.append(unpack_fp8_rows(layout.read(cache, rows), d, rope_dim).bfloat16())
    out[:, 0] = torch.cat(parts) if parts else out[:, 0]
    return out
