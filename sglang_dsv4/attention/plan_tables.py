"""The device half of an extend plan: :class:`BatchTables`, the tail modes, the page of token
``P-1`` and the plan's checks, built from the batch's ``[R, B+1]`` host facts (one queued copy).

Two builders with one signature, chosen once by the backend (:func:`tables_builder`):

* :func:`tables_torch` -- torch ops (the CPU path, and the twin the kernel is tested against);
* :func:`tables_triton` -- one launch (:mod:`~sglang_dsv4.kernels.extend_meta`). On a GPU the
  torch form is ~130 small ops per extend step (gathers, ``repeat_interleave``, ``where``,
  casts), each a launch and host dispatch while the GPU waits for the step's first kernel.

Both advance ``pool.tail_pos`` of the batch's slots to ``S``, after reading the progress the
checks compare with ``P``.
"""

from dataclasses import dataclass

import torch

from sglang_dsv4.kernels.extend_meta import FACT_ROWS

__all__ = [
    "ENTRY_RATIOS",
    "FACT_ROWS",
    "BatchTables",
    "TablesIn",
    "TablesOut",
    "facts_host",
    "held",
    "last_pages",
    "tables_builder",
    "tables_torch",
    "tables_triton",
]

# the facts' rows (the kernel reads them by the same names); the entry starts from ENT on
SLOT, PREFIX, SEQ, LO, OWN, MODE, TOK0, WIN0, ENT = range(len(FACT_ROWS) - 1)
ENTRY_RATIOS = (4, 128)  # the ratio of each entry-start row

# the int codes of ``kernels.compressor`` (TAIL_KEEP / TAIL_FRESH / TAIL_REBUILD)
KEEP, FRESH, REBUILD = 0, 1, 2


@dataclass(frozen=True)
class BatchTables:
    """Device tensors of an extend batch of ``B`` requests and ``T`` new tokens."""

    req_slots: torch.Tensor  # [B] int32 tail rows (req_pool_idx)
    prefix: torch.Tensor  # [B] int32 P
    seq_lens: torch.Tensor  # [B] int32 S
    window_lo: torch.Tensor  # [B] int32 first position a query of the batch sees
    cu_seqlens: torch.Tensor  # [B+1] int32 token offsets of the requests in the batch
    tail_mode: torch.Tensor  # [B] int32 compressor tail mode code (c4)
    tail_mode_c128: torch.Tensor  # [B] int32 the same with REBUILD -> FRESH (no boundary)
    rebuild_page: torch.Tensor  # [B] int32 swa page of token P-1 (REBUILD), else -1
    block_table: torch.Tensor  # [B, n_blocks] int32 full page of each block
    boundary_table: torch.Tensor  # [B, n_blocks] int32 swa page of a block's last token where
    # that block end lies in (P, S] (its c4 state is kept there), else 0 (the dummy page)
    query_req: torch.Tensor  # [T] int32 request of each new token
    positions: torch.Tensor  # [T] int64 position of each new token
    window_rows: torch.Tensor  # [T, W] int32 swa slots of each query's swa_window (-1: none)
    window_slots: torch.Tensor  # [M] swa slots (the map's dtype) of positions window_lo..S-1 of
    # every request in order (M = sum of S - window_lo; ``RequestPlan.window_slots`` are views)
    window_ids: torch.Tensor  # [T, W] int64 id in ``window_slots`` of each query's swa_window
    # positions (-1: none); ``window_rows = window_slots[window_ids]``
    entry_start: torch.Tensor  # [2, B+1] int32 exclusive starts of the requests' c4 / c128
    # entries (``ENTRY_RATIOS``), totals in column B

    @property
    def max_blocks(self) -> int:
        return self.block_table.shape[1]


@dataclass(frozen=True)
class TablesIn:
    """What a builder needs besides the pools: the facts on the device and their host sizes."""

    facts: torch.Tensor  # [R, B+1] int32 (FACT_ROWS)
    n_tokens: int  # T
    n_window: int  # M
    n_blocks: int  # block table columns: the longest S in blocks (>= 1)
    max_window: int  # the longest S - window_lo
    compressed: bool  # the model has compressor tails (else every mode is KEEP)


@dataclass(frozen=True)
class TablesOut:
    tables: BatchTables
    last_page: torch.Tensor  # [B] int64 swa page of token P-1 (of position 0 where P = 0)
    flags: torch.Tensor  # [2, B] bool: an own tail's progress is P (or needs not be), the
    # prefix window's swa rows are held -- the host path's checks, read one batch later


def facts_host(slots, prefix_lens, seq_lens, lows, own, codes) -> torch.Tensor:
    """[R, B+1] int32 host facts (FACT_ROWS); ``slots`` None: zeros (the read path fills the
    row on the device), ``codes``: host-decided tail mode codes, -1 where the device decides."""
    b = len(seq_lens)
    starts = [[0] for _ in range(2 + len(ENTRY_RATIOS))]  # tokens, window slots, entries
    for p, s, lo in zip(prefix_lens, seq_lens, lows, strict=True):
        for row, n in zip(starts, (s - p, s - lo, *(s // r for r in ENTRY_RATIOS)), strict=True):
            row.append(row[-1] + n)
    rows = [slots or [0] * b, prefix_lens, seq_lens, lows, [int(o) for o in own or [0] * b], codes]
    return torch.tensor([[*r, 0] for r in rows] + starts, dtype=torch.int32)


def last_pages(pool, rtt, slots, prefix) -> torch.Tensor:
    """[B] swa page of token ``P-1`` of each request (of position 0 where ``P = 0``), whose
    boundary rows a REBUILD resumes from; ``slots`` / ``prefix`` [B] int64."""
    full = rtt[slots, (prefix - 1).clamp(min=0)]
    return pool.translate_loc_from_full_to_swa(full) // pool.schema.block_size


def held(pool, rtt, slots, prefix) -> torch.Tensor:
    """[B] bool: every swa slot of positions ``max(0, P - window + 1) .. P-1`` of each request
    is nonzero (its queries still see them); ``slots`` / ``prefix`` [B] int64."""
    window = pool.schema.sliding_window
    back = torch.arange(max(1, window - 1), device=slots.device)  # [W-1]
    pos = prefix.unsqueeze(1) - 1 - back  # [B, W-1] positions P-1, P-2, .. (< 0: none)
    swa = pool.translate_loc_from_full_to_swa(rtt[slots.unsqueeze(1), pos.clamp(min=0)])
    return ((swa > 0) | (pos < 0)).all(1)


def tables_builder(kernels: bool):
    """The builder of the plan's device half: the kernel on a GPU pool, else the torch form."""
    return tables_triton if kernels else tables_torch


def tables_triton(pool, rtt: torch.Tensor, inp: TablesIn) -> TablesOut:
    """One launch (:func:`~sglang_dsv4.kernels.extend_meta.extend_meta_fields`)."""
    # looked up per call: the CPU tests reload the kernel module under the interpreter
    from sglang_dsv4.kernels.extend_meta import extend_meta_fields

    s = pool.schema
    f = extend_meta_fields(
        inp.facts, rtt, pool.full_to_swa_index_mapping, pool.tail_pos, n_tokens=inp.n_tokens,
        n_window=inp.n_window, n_blocks=inp.n_blocks, max_window=inp.max_window,
        window=s.sliding_window, block=s.block_size, compressed=inp.compressed,
    )  # fmt: skip
    last, flags = f.pop("last_page"), f.pop("flags")
    return TablesOut(BatchTables(**_fact_fields(inp.facts), **f), last, flags)


def _fact_fields(facts: torch.Tensor) -> dict[str, torch.Tensor]:
    """The tables' [B] int32 facts: views of the copied rows (no launch)."""
    b = facts.shape[1] - 1
    return {
        "req_slots": facts[SLOT, :b],
        "prefix": facts[PREFIX, :b],
        "seq_lens": facts[SEQ, :b],
        "window_lo": facts[LO, :b],
        "cu_seqlens": facts[TOK0],
        "entry_start": facts[ENT:],
    }


def tables_torch(pool, rtt: torch.Tensor, inp: TablesIn) -> TablesOut:
    """The torch form of :func:`tables_triton` (module docstring)."""
    f = inp.facts
    b = f.shape[1] - 1
    block, window = pool.schema.block_size, pool.schema.sliding_window
    slots, prefix, seq, lo = (f[r, :b].long() for r in (SLOT, PREFIX, SEQ, LO))
    own = f[OWN, :b].bool()
    to_swa = pool.translate_loc_from_full_to_swa
    progress = pool.tail_pos[slots].clone()  # [B] before this plan's update
    last = last_pages(pool, rtt, slots, prefix)  # [B]
    mode = _modes(f[MODE, :b], own, progress, prefix, block, inp.compressed)
    # an own tail elsewhere than P restarts FRESH / REBUILD at a block end; elsewhere it is lost
    progress_ok = (progress == prefix) | ~own | (prefix % block == 0) | (not inp.compressed)
    flags = torch.stack([progress_ok, held(pool, rtt, slots, prefix)])
    pool.tail_pos[slots] = seq
    req, pos = ragged(seq - lo, lo, inp.n_window)
    window_slots = to_swa(rtt[slots[req], pos])  # [M]
    query_req, positions = ragged(seq - prefix, prefix, inp.n_tokens)  # [T] each
    starts = torch.arange(inp.n_blocks, device=rtt.device) * block  # [n_blocks]
    cols = starts.clamp(max=rtt.shape[1] - 1).unsqueeze(0)
    block_table = (rtt[slots.unsqueeze(1), cols] // block).int()  # [B, n_blocks]
    ends = starts + block  # block ends, kept when P < end <= S
    end_slot = rtt[slots.unsqueeze(1), (ends - 1).clamp(max=rtt.shape[1] - 1).unsqueeze(0)]
    kept = (ends.unsqueeze(0) > prefix.unsqueeze(1)) & (ends.unsqueeze(0) <= seq.unsqueeze(1))
    swa_page = to_swa(torch.where(kept, end_slot, 0)) // block
    # every query's window (positions t-W+1 .. t of its request, ref.window_indices) as ids into
    # the batch's window slots (they hold positions window_lo .. S-1 of each request in order)
    first = (f[WIN0, :b].long() - lo)[query_req]  # [T] id of position 0 of its request
    win = positions.unsqueeze(1) + torch.arange(1 - window, 1, device=rtt.device)  # [T, W]
    window_ids = torch.where(win >= 0, first.unsqueeze(1) + win, -1)
    window_rows = torch.where(win >= 0, window_slots[window_ids.clamp(min=0)], -1)
    tables = BatchTables(
        **_fact_fields(f),
        tail_mode=mode,
        tail_mode_c128=torch.where(mode == REBUILD, FRESH, mode),
        rebuild_page=torch.where(mode == REBUILD, last, -1).int(),
        block_table=block_table,
        boundary_table=torch.where(kept, swa_page, 0).int(),
        query_req=query_req.int(),
        positions=positions,
        window_rows=window_rows.int(),
        window_slots=window_slots,
        window_ids=window_ids,
    )
    return TablesOut(tables, last, flags)


def _modes(host_codes, own, progress, prefix, block: int, compressed: bool) -> torch.Tensor:
    """[B] int32 tail mode codes: the host's where it decided (>= 0), else KEEP where the tail
    is the request's own and its ``progress`` is ``P`` (or ``P`` is no place to restart from:
    the pending check raises at the next plan), else FRESH at ``P == 0``, REBUILD at a block
    end (the host raised where a new owner has neither)."""
    if not compressed:  # no tails: nothing to resume
        return torch.where(host_codes >= 0, host_codes, KEEP).int()
    alt = torch.where(prefix % block == 0, REBUILD, -1)
    alt = torch.where(prefix == 0, FRESH, alt)  # [B]
    kept = own & ((progress == prefix) | (alt < 0))
    return torch.where(host_codes >= 0, host_codes, torch.where(kept, KEEP, alt)).int()


def ragged(sizes: torch.Tensor, starts: torch.Tensor, total: int):
    """``(request, position)`` [total] int64 of positions ``starts[b] .. starts[b] + sizes[b]
    - 1`` of every request ``b`` in order (``ref.window_indices``' batch form), on the device of
    ``sizes`` / ``starts`` [B]. ``total`` = ``sizes.sum()`` as a host int: the output size, so
    that ``repeat_interleave`` does not read it back."""
    device = sizes.device
    req = torch.repeat_interleave(torch.arange(sizes.numel(), device=device), sizes,
                                  output_size=total)  # fmt: skip
    shift = starts - (sizes.cumsum(0) - sizes)  # [B] start minus the request's flat offset
    return req, torch.arange(total, device=device) + shift[req]
