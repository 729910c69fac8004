"""An extend plan's device tables in one launch (twin: ``attention.plan_tables.tables_torch``).

Inputs: the batch's host facts ``[R, B+1]`` int32 (``plan_tables.FACT_ROWS``: slot, P, S,
window_lo, own tail, host mode code or -1, exclusive token / window starts with their totals in
column B), SGLang's ``req_to_token``, the full -> swa map and ``tail_pos``. Programs:

* per ``TT`` new tokens (the first ``cdiv(T, TT)``): each token's request (the count of request
  starts at or before it), position, and its window -- positions ``t-W+1 .. t`` as ids into the
  batch's window slots and as swa slots (``req_to_token`` then the map: the same values the
  window slots hold, read from the tables rather than from the other programs' output);
* per request and ``CH`` window slots / blocks (the rest): the request's window slots
  (positions ``window_lo .. S-1``), its block table and boundary table (the swa page of a block's
  last token where the block end lies in ``(P, S]``); the first chunk also the request's fields:
  the swa page of token ``P-1``, the tail mode (the host's code, else decided from the tail's
  progress), the two checks, and ``tail_pos = S``.
"""

import torch
import triton
import triton.language as tl

__all__ = ["FACT_ROWS", "extend_meta_fields"]

# Rows of the host facts [R, B+1] int32 (column B: 0, except the starts' totals): exclusive
# starts of the requests' new tokens (T), window slots (M) and c4 / c128 entries (S // ratio:
# FlashMLA's workspace layout, ``kernels.flashmla_lists``); the plan builds them
# (``attention.plan_tables.facts_host``)
FACT_ROWS = (
    "slot", "prefix", "seq", "window_lo", "own", "mode", "token_start", "window_start",
    "c4_entry_start", "c128_entry_start",
)  # fmt: skip
_SLOT, _PREFIX, _SEQ, _LO, _OWN, _MODE, _TOK0, _WIN0 = (tl.constexpr(i) for i in range(8))

_TT = 16  # new tokens per program (x the window's columns)
_CH = 256  # window slots / blocks per request program
_BB = 64  # request starts compared per step when finding a token's request


@triton.jit
def _fact(facts_ptr, row: tl.constexpr, b, fs):
    """Fact ``row`` of request(s) ``b`` as int64."""
    return tl.load(facts_ptr + row * fs + b).to(tl.int64)


@triton.jit(do_not_specialize=["n_req", "n_tokens", "n_blocks", "n_tok_progs", "n_chunks",
                               "r2t_stride", "r2t_cols"])  # fmt: skip
def _extend_meta_kernel(
    facts_ptr, r2t_ptr, r2t_stride, r2t_cols, f2s_ptr, tail_pos_ptr,
    query_req_ptr, positions_ptr, window_ids_ptr, window_rows_ptr, window_slots_ptr,
    block_table_ptr, boundary_table_ptr, tail_mode_ptr, tail_mode_c128_ptr, rebuild_page_ptr,
    last_page_ptr, flags_ptr,
    n_req, n_tokens, n_blocks, n_tok_progs, n_chunks,
    W: tl.constexpr, WB: tl.constexpr, HB: tl.constexpr, BLOCK: tl.constexpr,
    COMPRESSED: tl.constexpr, TT: tl.constexpr, CH: tl.constexpr, BB: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    fs = n_req + 1  # the facts' row stride
    if pid < n_tok_progs:
        _token_rows(pid, facts_ptr, fs, n_req, n_tokens, r2t_ptr, r2t_stride, f2s_ptr,
                    query_req_ptr, positions_ptr, window_ids_ptr, window_rows_ptr,
                    W, WB, TT, BB)  # fmt: skip
    else:
        q = pid - n_tok_progs
        b = q // n_chunks
        c = (q % n_chunks) * CH
        row = r2t_ptr + _fact(facts_ptr, _SLOT, b, fs) * r2t_stride
        _request_rows(b, c, facts_ptr, fs, row, r2t_cols, f2s_ptr, n_blocks, window_slots_ptr,
                      block_table_ptr, boundary_table_ptr, BLOCK, CH)  # fmt: skip
        if c == 0:
            _request_fields(b, facts_ptr, fs, n_req, row, f2s_ptr, tail_pos_ptr, tail_mode_ptr,
                            tail_mode_c128_ptr, rebuild_page_ptr, last_page_ptr, flags_ptr,
                            W, HB, BLOCK, COMPRESSED)  # fmt: skip


@triton.jit
def _token_rows(pid, facts_ptr, fs, n_req, n_tokens, r2t_ptr, r2t_stride, f2s_ptr,
                query_req_ptr, positions_ptr, window_ids_ptr, window_rows_ptr,
                W: tl.constexpr, WB: tl.constexpr, TT: tl.constexpr, BB: tl.constexpr):  # fmt: skip
    """Tokens ``pid * TT ..``: request, position, window ids and window swa slots."""
    t = pid * TT + tl.arange(0, TT)
    tm = t < n_tokens
    req = tl.zeros([TT], dtype=tl.int32)
    for c0 in range(0, n_req, BB):  # requests 1.. whose first token is at or before t
        bb = c0 + tl.arange(0, BB)
        start = tl.load(facts_ptr + _TOK0 * fs + bb, mask=(bb > 0) & (bb < n_req), other=2**30)
        req += tl.sum((start[None, :] <= t[:, None]).to(tl.int32), axis=1)
    slot = _fact(facts_ptr, _SLOT, req, fs)
    pos = _fact(facts_ptr, _PREFIX, req, fs) + t - _fact(facts_ptr, _TOK0, req, fs)  # [TT]
    first = _fact(facts_ptr, _WIN0, req, fs) - _fact(facts_ptr, _LO, req, fs)  # id of position 0
    tl.store(query_req_ptr + t, req, mask=tm)
    tl.store(positions_ptr + t, pos, mask=tm)
    j = tl.arange(0, WB)
    p = pos[:, None] - W + 1 + j[None, :]  # [TT, WB]
    inside = tm[:, None] & (j[None, :] < W)
    seen = p >= 0
    ids = tl.where(seen, first[:, None] + p, -1)
    full = tl.load(r2t_ptr + slot[:, None] * r2t_stride + tl.maximum(p, 0), mask=inside & seen,
                   other=0).to(tl.int64)  # fmt: skip
    swa = tl.load(f2s_ptr + full, mask=inside & seen, other=0)
    out = t.to(tl.int64)[:, None] * W + j[None, :]
    tl.store(window_ids_ptr + out, ids, mask=inside)
    tl.store(window_rows_ptr + out, tl.where(seen, swa, -1).to(tl.int32), mask=inside)


@triton.jit
def _request_rows(b, c, facts_ptr, fs, row, r2t_cols, f2s_ptr, n_blocks, window_slots_ptr,
                  block_table_ptr, boundary_table_ptr, BLOCK: tl.constexpr,
                  CH: tl.constexpr):  # fmt: skip
    """Request ``b``'s window slots and block / boundary tables ``c .. c + CH - 1``."""
    prefix = _fact(facts_ptr, _PREFIX, b, fs)
    seq = _fact(facts_ptr, _SEQ, b, fs)
    lo = _fact(facts_ptr, _LO, b, fs)
    k = c + tl.arange(0, CH)
    km = lo + k < seq
    full = tl.load(row + lo + k, mask=km, other=0).to(tl.int64)
    swa = tl.load(f2s_ptr + full, mask=km, other=0)
    tl.store(window_slots_ptr + _fact(facts_ptr, _WIN0, b, fs) + k, swa, mask=km)
    i = k.to(tl.int64)
    im = i < n_blocks
    page = tl.load(row + tl.minimum(i * BLOCK, r2t_cols - 1), mask=im, other=0) // BLOCK
    tl.store(block_table_ptr + b * n_blocks + i, page.to(tl.int32), mask=im)
    end = i * BLOCK + BLOCK
    kept = (end > prefix) & (end <= seq)
    last = tl.load(row + tl.minimum(end - 1, r2t_cols - 1), mask=im & kept, other=0).to(tl.int64)
    swa_page = tl.load(f2s_ptr + last, mask=im & kept, other=0) // BLOCK
    tl.store(boundary_table_ptr + b * n_blocks + i, tl.where(kept, swa_page, 0).to(tl.int32),
             mask=im)  # fmt: skip


@triton.jit
def _request_fields(b, facts_ptr, fs, n_req, row, f2s_ptr, tail_pos_ptr, tail_mode_ptr,
                    tail_mode_c128_ptr, rebuild_page_ptr, last_page_ptr, flags_ptr,
                    W: tl.constexpr, HB: tl.constexpr, BLOCK: tl.constexpr,
                    COMPRESSED: tl.constexpr):  # fmt: skip
    """Request ``b``: page of token P-1, tail mode, the checks, ``tail_pos = S``."""
    slot = _fact(facts_ptr, _SLOT, b, fs)
    prefix = _fact(facts_ptr, _PREFIX, b, fs)
    own = _fact(facts_ptr, _OWN, b, fs)  # 1: the slot's tail is this request's
    host_code = _fact(facts_ptr, _MODE, b, fs)
    progress = tl.load(tail_pos_ptr + slot)
    full = tl.load(row + tl.maximum(prefix - 1, 0)).to(tl.int64)
    last = tl.load(f2s_ptr + full).to(tl.int64) // BLOCK
    at_end = prefix % BLOCK == 0
    if COMPRESSED:  # KEEP 0, FRESH 1, REBUILD 2 (plan_tables)
        alt = tl.where(prefix == 0, 1, tl.where(at_end, 2, -1))
        device_code = tl.where((own != 0) & ((progress == prefix) | (alt < 0)), 0, alt)
        progress_ok = (progress == prefix) | (own == 0) | at_end
    else:  # no tails: nothing to resume
        device_code = 0
        progress_ok = tl.full([], 1, tl.int1)
    mode = tl.where(host_code >= 0, host_code, device_code)
    tl.store(tail_mode_ptr + b, mode.to(tl.int32))
    tl.store(tail_mode_c128_ptr + b, tl.where(mode == 2, 1, mode).to(tl.int32))
    tl.store(rebuild_page_ptr + b, tl.where(mode == 2, last, -1).to(tl.int32))
    tl.store(last_page_ptr + b, last)
    # the prefix window's swa rows: positions P-1, P-2, .. down to max(0, P-W+1)
    back = tl.arange(0, HB)
    p = prefix - 1 - back
    look = (back < tl.maximum(W - 1, 1)) & (p >= 0)
    swa = tl.load(f2s_ptr + tl.load(row + tl.maximum(p, 0), mask=look, other=0), mask=look,
                  other=1)  # fmt: skip
    held = tl.sum((look & (swa <= 0)).to(tl.int32), axis=0) == 0
    tl.store(flags_ptr + b, progress_ok)
    tl.store(flags_ptr + n_req + b, held)
    tl.store(tail_pos_ptr + slot, _fact(facts_ptr, _SEQ, b, fs))


def extend_meta_fields(
    facts: torch.Tensor,
    req_to_token: torch.Tensor,
    full_to_swa: torch.Tensor,
    tail_pos: torch.Tensor,
    *,
    n_tokens: int,
    n_window: int,
    n_blocks: int,
    max_window: int,
    window: int,
    block: int,
    compressed: bool,
) -> dict[str, torch.Tensor]:
    """The device tables of an extend batch (module docstring): ``facts`` [R, B+1] int32,
    ``req_to_token`` [slots, width] (rows contiguous), ``full_to_swa`` [full slots + 1];
    advances ``tail_pos``. Returns ``BatchTables``' computed fields, ``last_page`` [B] int64
    and ``flags`` [2, B] bool."""
    if req_to_token.stride(1) != 1:
        raise ValueError("req_to_token rows must be contiguous")
    b, dev = facts.shape[1] - 1, facts.device
    t, nw = n_tokens, window
    f = {
        "query_req": torch.empty(t, dtype=torch.int32, device=dev),
        "positions": torch.empty(t, dtype=torch.int64, device=dev),
        "window_ids": torch.empty(t, nw, dtype=torch.int64, device=dev),
        "window_rows": torch.empty(t, nw, dtype=torch.int32, device=dev),
        "window_slots": torch.empty(n_window, dtype=full_to_swa.dtype, device=dev),
        "block_table": torch.empty(b, n_blocks, dtype=torch.int32, device=dev),
        "boundary_table": torch.empty(b, n_blocks, dtype=torch.int32, device=dev),
        "tail_mode": torch.empty(b, dtype=torch.int32, device=dev),
        "tail_mode_c128": torch.empty(b, dtype=torch.int32, device=dev),
        "rebuild_page": torch.empty(b, dtype=torch.int32, device=dev),
        "last_page": torch.empty(b, dtype=torch.int64, device=dev),
        "flags": torch.empty(2, b, dtype=torch.bool, device=dev),
    }
    n_tok_progs = triton.cdiv(t, _TT)
    n_chunks = max(1, triton.cdiv(max(max_window, n_blocks), _CH))
    _extend_meta_kernel[(n_tok_progs + b * n_chunks,)](
        facts_ptr=facts, r2t_ptr=req_to_token, r2t_stride=req_to_token.stride(0),
        r2t_cols=req_to_token.shape[1], f2s_ptr=full_to_swa, tail_pos_ptr=tail_pos,
        n_req=b, n_tokens=t, n_blocks=n_blocks, n_tok_progs=n_tok_progs, n_chunks=n_chunks,
        W=window, WB=triton.next_power_of_2(window), HB=triton.next_power_of_2(max(window - 1, 1)),
        BLOCK=block, COMPRESSED=compressed, TT=_TT, CH=_CH, BB=_BB, num_warps=4,
        **{f"{name}_ptr": x for name, x in f.items()},
    )  # fmt: skip
    return f
