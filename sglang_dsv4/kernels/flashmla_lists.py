"""FlashMLA's extend index lists and workspace entry rows of one layer kind, in one launch (twin:
``attention.extend_choice.lists_torch``).

The workspace holds every request's entries (request ``b``'s at ``entry_start[b]``), then every
request's window rows in the order of the plan's window slots. Programs:

* per ``TT`` new tokens (the first ``cdiv(T, TT)``): the token's list row -- its window ids
  shifted past the entries (-1 stays -1), for c128 its request's visible entries
  ``entry_start[b] + e`` for ``e < (pos + 1) // 128`` over ``extra`` columns, -1 elsewhere
  (the c4 picks' columns, which the picks op writes per layer, and the padding to 128);
* per request and ``CH`` entries (the rest, none for SWA): the flat entry row of entry ``i``,
  ``block_table[b, i // EPB] * EPB + i % EPB`` (``EPB`` entries per block = rows per page).
"""

import torch
import triton
import triton.language as tl

__all__ = ["flashmla_lists"]

_TT = 16  # tokens per program
_CH = 256  # entries per program
_EB = 128  # list columns per step


@triton.jit(do_not_specialize=["n_tokens", "n_blocks", "total_ent", "extra", "width",
                               "n_tok_progs", "n_chunks"])  # fmt: skip
def _flashmla_lists_kernel(
    query_req_ptr, positions_ptr, window_ids_ptr, entry_start_ptr, block_table_ptr, lists_ptr,
    ent_rows_ptr, n_tokens, n_blocks, total_ent, extra, width, n_tok_progs, n_chunks,
    W: tl.constexpr, WB: tl.constexpr, RATIO: tl.constexpr, EPB: tl.constexpr,
    TT: tl.constexpr, CH: tl.constexpr, EB: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    if pid < n_tok_progs:
        t = pid * TT + tl.arange(0, TT)
        tm = t < n_tokens
        row = lists_ptr + t.to(tl.int64)[:, None] * width  # [TT, 1]
        j = tl.arange(0, WB)
        jm = tm[:, None] & (j[None, :] < W)
        ids = tl.load(window_ids_ptr + t.to(tl.int64)[:, None] * W + j[None, :], mask=jm, other=-1)
        tl.store(row + j[None, :], tl.where(ids >= 0, ids + total_ent, -1).to(tl.int32), mask=jm)
        req = tl.load(query_req_ptr + t, mask=tm, other=0)
        visible = (tl.load(positions_ptr + t, mask=tm, other=0) + 1) // 128  # c128 entries seen
        base = tl.load(entry_start_ptr + req, mask=tm, other=0)
        for c0 in range(W, width, EB):
            col = c0 + tl.arange(0, EB)
            if RATIO == 128:
                e = col - W
                see = (e[None, :] < extra) & (e[None, :] < visible[:, None])
                val = tl.where(see, base[:, None] + e[None, :], -1)
            else:  # c4 picks' columns (written per layer) and padding
                val = tl.full([TT, EB], -1, tl.int32)
            tl.store(
                row + col[None, :], val.to(tl.int32), mask=tm[:, None] & (col[None, :] < width)
            )
    else:
        q = pid - n_tok_progs
        b = q // n_chunks
        i = (q % n_chunks) * CH + tl.arange(0, CH)
        start = tl.load(entry_start_ptr + b)
        m = i < tl.load(entry_start_ptr + b + 1) - start
        page = tl.load(block_table_ptr + b * n_blocks + i // EPB, mask=m, other=0).to(tl.int64)
        tl.store(ent_rows_ptr + start + i, page * EPB + i % EPB, mask=m)


def flashmla_lists(
    tables,
    entry_start: torch.Tensor | None,
    *,
    ratio: int,
    entries_per_block: int,
    total_ent: int,
    max_ent: int,
    extra: int,
    topk: int,
    width: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lists [T, 1, width] int32, entry rows [total_ent] int64)`` of one layer kind (module
    docstring) from the plan's ``tables`` (``attention.plan_tables.BatchTables``);
    ``entry_start`` [B+1] int32 the kind's exclusive entry starts (None: SWA, no entries);
    ``width`` = window + ``extra`` + ``topk`` rounded up to FlashMLA's multiple of 128."""
    t = tables
    n_tok, window = t.window_ids.shape
    b, dev = t.req_slots.shape[0], t.positions.device
    lists = torch.empty(n_tok, 1, width, dtype=torch.int32, device=dev)
    ent_rows = torch.empty(total_ent, dtype=torch.int64, device=dev)
    if entry_start is None:  # SWA: no entries; the programs read a zero start
        entry_start = torch.zeros(1, dtype=torch.int32, device=dev)
    n_tok_progs = triton.cdiv(n_tok, _TT)
    n_chunks = triton.cdiv(max_ent, _CH) if total_ent else 0
    _flashmla_lists_kernel[(n_tok_progs + b * n_chunks,)](
        query_req_ptr=t.query_req, positions_ptr=t.positions, window_ids_ptr=t.window_ids,
        entry_start_ptr=entry_start, block_table_ptr=t.block_table, lists_ptr=lists,
        ent_rows_ptr=ent_rows, n_tokens=n_tok, n_blocks=t.block_table.shape[1],
        total_ent=total_ent, extra=extra, width=width, n_tok_progs=n_tok_progs,
        n_chunks=max(n_chunks, 1), W=window, WB=triton.next_power_of_2(window), RATIO=ratio,
        EPB=entries_per_block, TT=_TT, CH=_CH, EB=_EB, num_warps=4,
    )  # fmt: skip
    return lists, ent_rows
