"""A decode step's metadata in one launch (twin: ``attention.decode.build_decode_meta``).

``build_decode_meta`` is ~45 small torch ops (index, where, clamp, casts, aranges), each a kernel
of a captured decode step: more launches than a whole attention layer. Here one launch computes
every field of ``DecodeMeta`` from SGLang's graph-static buffers and the pool maps, and advances
each request's tail progress (``tail_pos[tail_row] = pos + 1``). Programs: per request, one per
256 pages / c128 list entries (both as long as the graph's context, not the request's: a 1M
context is 8192 pages), the first also writing the request's own fields and window, so the
step's latency does not grow with the context length:

* ``valid = out_loc > 0``; ``tail_rows`` = the request's slot, or ``spare_tail_row`` (padding);
* ``out_swa = full_to_swa[out_loc]``; ``swa_page`` / ``entry_page`` its / ``out_loc``'s page
  (0 on padded rows);
* ``window[j]`` = the swa slot of position ``pos - W + 1 + j`` (-1 before 0);
* ``pages[i]`` = full page of block ``i`` (``req_to_token`` at ``min(i * block, width - 1)``; 0
  on padded rows); ``boundary_table[i]`` = ``swa_page`` where ``i`` is the token's block (-1
  elsewhere and on padded rows);
* ``hca_rows[e]`` = flat c128 entry row of entry ``e`` (``pages[e // pp] * pp + e % pp``, ``pp``
  entries per page) while ``e < (pos + 1) // 128``, else -1; ``hca_lengths`` that count clamped
  to ``[1, width]``;
* int32 copies of positions, tail rows, window and pages.

Padded rows (several may share one spare tail row) write the same values there.
"""

import torch
import triton
import triton.language as tl

__all__ = ["decode_meta_fields"]

_CHUNK = 256  # pages / c128 list entries per program

# Every field of ``DecodeMeta`` the kernel writes (its argument ``<name>_ptr``): shape in units of
# B requests, W window, P pages, E c128 list width, and dtype. ``positions`` is SGLang's buffer.
_OUTPUTS = (
    ("valid", "B", torch.bool),
    ("tail_rows", "B", torch.int64),
    ("tail_rows_i32", "B", torch.int32),
    ("positions_i32", "B", torch.int32),
    ("out_swa", "B", torch.int64),
    ("swa_page", "B", torch.int64),
    ("entry_page", "B", torch.int64),
    ("window", "BW", torch.int64),
    ("window_i32", "BW", torch.int32),
    ("pages", "BP", torch.int64),
    ("pages_i32", "BP", torch.int32),
    ("boundary_table", "BP", torch.int32),
    ("hca_rows", "BE", torch.int32),
    ("hca_lengths", "B", torch.int32),
)


@triton.jit(do_not_specialize=["n_pages", "width", "r2t_stride", "spare", "r2t_cols"])
def _decode_meta_kernel(
    req_ptr, positions_ptr, loc_ptr, r2t_ptr, r2t_stride, r2t_cols, f2s_ptr, spare, tail_pos_ptr,
    valid_ptr, tail_rows_ptr, tail_rows_i32_ptr, positions_i32_ptr, out_swa_ptr, swa_page_ptr,
    entry_page_ptr, window_ptr, window_i32_ptr, pages_ptr, pages_i32_ptr, boundary_table_ptr,
    hca_rows_ptr, hca_lengths_ptr,
    n_pages, width,
    W: tl.constexpr, WB: tl.constexpr, BLOCK: tl.constexpr, PP: tl.constexpr, CH: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    c = tl.program_id(1) * CH  # this program's pages / c128 list entries: c .. c + CH - 1
    req = tl.load(req_ptr + b).to(tl.int64)
    pos = tl.load(positions_ptr + b).to(tl.int64)
    loc = tl.load(loc_ptr + b).to(tl.int64)
    valid = loc > 0
    out_swa = tl.load(f2s_ptr + loc).to(tl.int64)
    swa_page = tl.where(valid, out_swa // BLOCK, 0)
    row = r2t_ptr + req * r2t_stride
    if c == 0:  # the request's own fields, once
        _request_fields(b, req, pos, loc, valid, spare, out_swa, swa_page, row, f2s_ptr,
                        tail_pos_ptr, valid_ptr, tail_rows_ptr, tail_rows_i32_ptr,
                        positions_i32_ptr, out_swa_ptr, swa_page_ptr, entry_page_ptr, window_ptr,
                        window_i32_ptr, W, WB, BLOCK)  # fmt: skip
    i = c + tl.arange(0, CH)
    ok = i < n_pages
    start = tl.minimum(i.to(tl.int64) * BLOCK, r2t_cols - 1)
    page = tl.load(row + start, mask=ok & valid, other=0).to(tl.int64) // BLOCK
    tl.store(pages_ptr + b * n_pages + i, page, mask=ok)
    tl.store(pages_i32_ptr + b * n_pages + i, page.to(tl.int32), mask=ok)
    bnd = tl.where((i == pos // BLOCK) & valid, swa_page, -1)
    tl.store(boundary_table_ptr + b * n_pages + i, bnd.to(tl.int32), mask=ok)
    visible = (pos + 1) // 128
    e = i
    inside = e < n_pages * PP
    start = tl.minimum((e // PP).to(tl.int64) * BLOCK, r2t_cols - 1)
    page = tl.load(row + start, mask=inside & valid, other=0).to(tl.int64) // BLOCK
    hca = tl.where(inside & (e < visible), page * PP + e % PP, -1)
    tl.store(hca_rows_ptr + b * width + e, hca.to(tl.int32), mask=e < width)
    if c == 0:
        tl.store(hca_lengths_ptr + b, tl.minimum(tl.maximum(visible, 1), width).to(tl.int32))


@triton.jit
def _request_fields(b, req, pos, loc, valid, spare, out_swa, swa_page, row, f2s_ptr,
                    tail_pos_ptr, valid_ptr, tail_rows_ptr, tail_rows_i32_ptr, positions_i32_ptr,
                    out_swa_ptr, swa_page_ptr, entry_page_ptr, window_ptr, window_i32_ptr,
                    W: tl.constexpr, WB: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    """Request ``b``'s scalar fields, its window, and its tail's progress."""
    tail = tl.where(valid, req, spare)
    tl.store(valid_ptr + b, valid)
    tl.store(tail_rows_ptr + b, tail)
    tl.store(tail_rows_i32_ptr + b, tail.to(tl.int32))
    tl.store(positions_i32_ptr + b, pos.to(tl.int32))
    tl.store(out_swa_ptr + b, out_swa)
    tl.store(swa_page_ptr + b, swa_page)
    tl.store(entry_page_ptr + b, tl.where(valid, loc // BLOCK, 0))
    tl.store(tail_pos_ptr + tail, pos + 1)
    j = tl.arange(0, WB)
    cols = pos - W + 1 + j
    full = tl.load(row + tl.maximum(cols, 0), mask=j < W, other=0).to(tl.int64)
    slot = tl.load(f2s_ptr + full, mask=(j < W) & (cols >= 0), other=0).to(tl.int64)
    win = tl.where(cols >= 0, slot, -1)
    tl.store(window_ptr + b * W + j, win, mask=j < W)
    tl.store(window_i32_ptr + b * W + j, win.to(tl.int32), mask=j < W)


def decode_meta_fields(
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
    hca_width: int,
) -> dict[str, torch.Tensor]:
    """The fields of ``attention.decode.DecodeMeta`` (module docstring) for ``B`` requests:
    ``req_slots`` / ``positions`` / ``out_loc`` [B] (int32 / int64), ``req_to_token`` [slots,
    width] (rows contiguous), ``full_to_swa`` [full slots + 1]; advances ``tail_pos``."""
    bs, dev = positions.shape[0], positions.device
    if req_to_token.stride(1) != 1:
        raise ValueError("req_to_token rows must be contiguous")
    dims = {"B": bs, "W": window, "P": n_pages, "E": hca_width}
    f = {"positions": positions.long()}  # SGLang's int64 buffer itself (no copy)
    for name, shape, dtype in _OUTPUTS:
        f[name] = torch.empty(*(dims[d] for d in shape), dtype=dtype, device=dev)
    # one program per request and CH pages / list entries: the latency of a request's gathers
    # from req_to_token stays one chunk's however long the context (the graph's pages)
    _decode_meta_kernel[(bs, triton.cdiv(max(n_pages, hca_width), _CHUNK))](
        req_ptr=req_slots, loc_ptr=out_loc, r2t_ptr=req_to_token,
        r2t_stride=req_to_token.stride(0), r2t_cols=req_to_token.shape[1], f2s_ptr=full_to_swa,
        spare=spare_tail_row, tail_pos_ptr=tail_pos, n_pages=n_pages, width=hca_width, W=window,
        WB=triton.next_power_of_2(window), BLOCK=block, PP=block // 128, CH=_CHUNK, num_warps=4,
        **{f"{name}_ptr": t for name, t in f.items()},
    )  # fmt: skip
    return f
