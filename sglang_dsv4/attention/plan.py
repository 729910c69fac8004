"""Per-batch plan: all host work of a forward, done once before the first layer runs.

For every request of the batch it records where its tokens sit in the batch (``tokens``), its
prefix length ``P`` and new length ``S``, the full slots of positions ``0..S-1``, the swa slots
of the positions its queries can see through the ``swa_window`` (``window_lo .. S-1``), and how
its compressor tail must be obtained:

``keep``     the request's own tail continues (chunked prefill, decode)
``fresh``    no prefix: empty state
``rebuild``  a new owner of the slot with a prefix hit at a block end: the c4 a-halves come
             from the ``boundary`` rows kept with the swa page of token ``P-1``, everything else
             is empty

A tail is the request's own iff the slot's recorded owner generation and position match. The
position lives on the device (``pool.tail_pos``: decode graphs advance it); with the request
slots on the host it is not read at all (own tails have seen exactly ``P``, checked on the device
and raised at the next plan), else once per batch in one small copy
(:mod:`~sglang_dsv4.attention.plan_facts`), never per decode step.

For the batched kernels an extend plan also carries :class:`BatchTables`: the same facts as
device tensors (one row per request or per token), built once per batch.
"""

import functools
from dataclasses import dataclass

import torch

from sglang_dsv4.attention.plan_facts import check_pending, device_facts, host_facts, host_slots
from sglang_dsv4.mem.h2d import to_device

__all__ = ["BatchPlan", "BatchTables", "RequestPlan", "TailMode", "plan_batch"]


class TailMode:
    KEEP = "keep"
    FRESH = "fresh"
    REBUILD = "rebuild"


# the int codes of ``kernels.compressor`` (TAIL_KEEP / TAIL_FRESH / TAIL_REBUILD)
_MODE_CODE = {TailMode.KEEP: 0, TailMode.FRESH: 1, TailMode.REBUILD: 2}
_CODE_MODE = {c: m for m, c in _MODE_CODE.items()}


@dataclass(frozen=True)
class RequestPlan:
    req_slot: int
    prefix: int  # P: tokens already in the cache
    seq_len: int  # S: tokens in the cache after this forward
    tokens: slice  # this request's rows in the batch's token dim
    slots: torch.Tensor  # [S] int32 full slots of positions 0..S-1 (a view of req_to_token)
    window_lo: int  # first position a query of this forward sees: max(0, P - window + 1)
    window_slots: torch.Tensor  # [S - window_lo] int64 swa slots of positions window_lo..S-1
    tail_src: str | torch.Tensor  # TailMode, or its code as a 0-d device tensor where the
    # device decided it (plan_facts.host_facts: an own tail whose progress is not P)
    last_page: int | torch.Tensor  # the swa page holding token P-1 (a 0-d device tensor where
    # the plan read nothing back)
    block: int  # tokens per block (the schema's block size)

    @property
    def tail(self) -> str:
        """The TailMode (a host read for the torch twin where the device decided it)."""
        if isinstance(self.tail_src, str):
            return self.tail_src
        return _CODE_MODE[int(self.tail_src)]

    @property
    def rebuild_page(self) -> int:
        """REBUILD: the swa page of token P-1 (its boundary rows), else -1 (a host read for the
        torch twin; the kernels use ``BatchTables.rebuild_page``)."""
        return int(self.last_page) if self.tail == TailMode.REBUILD else -1

    @property
    def positions(self) -> torch.Tensor:
        return torch.arange(self.prefix, self.seq_len, device=self.slots.device)

    @functools.cached_property
    def block_ends(self) -> tuple[tuple[int, int], ...]:
        """(position, swa page of the token before it) per block end in (P, S]: what the torch
        twin of the flush needs (a host read; the kernels use ``BatchTables``)."""
        ends = range((self.prefix // self.block + 1) * self.block, self.seq_len + 1, self.block)
        pages = self.window_slots[[e - 1 - self.window_lo for e in ends]] // self.block
        return tuple(zip(ends, pages.tolist(), strict=True))


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
    window_slots: torch.Tensor  # [M] int64 swa slots of positions window_lo..S-1 of every
    # request in order (M = sum of S - window_lo; ``RequestPlan.window_slots`` are its views)
    window_ids: torch.Tensor  # [T, W] int64 id in ``window_slots`` of each query's swa_window
    # positions (-1: none); ``window_rows = window_slots[window_ids]``

    @property
    def max_blocks(self) -> int:
        return self.block_table.shape[1]


@dataclass(frozen=True)
class BatchPlan:
    requests: tuple[RequestPlan, ...]
    out_loc: torch.Tensor  # [T] full slots of the new tokens, in batch order
    out_loc_swa: torch.Tensor  # [T] their swa slots
    tables: BatchTables | None = None


def plan_batch(forward_batch, pool, req_to_token_pool, commit=None, commit_rows=None) -> BatchPlan:
    """Build the plan of an extend, target-verify or decode batch (see module docstring).
    ``commit(slot, generation, prefix) -> bool``: makes a request's tails those after
    ``prefix`` tokens when its last batch was a verify that went further (the rejected tokens'
    updates undone, :class:`~sglang_dsv4.attention.speculative.VerifyJournal`);
    ``commit_rows``: the same for a batch, device ops only (the journal's ``commit_rows``).

    Host syncs: none where SGLang gave the request slots on the host (``SlottedLens``:
    :func:`~sglang_dsv4.attention.plan_facts.host_facts`, checks raised at the next plan), else
    one device-to-host read per batch; the lengths come from SGLang's host copies, and every
    host-to-device copy is queued without a sync (:func:`~sglang_dsv4.mem.h2d.to_device`)."""
    fb = forward_batch
    check_pending(pool)
    prefix_lens, seq_lens = _host_lengths(fb)
    block, window = pool.schema.block_size, pool.schema.sliding_window
    device = pool.tail_pos.device
    slots_dev = fb.req_pool_indices.to(device).long()
    slots = host_slots(fb, len(seq_lens))
    generations = own = None
    if slots is not None:
        generations = _generations(req_to_token_pool, slots)
        own = [pool.tail_owner[s] == g for s, g in zip(slots, generations, strict=True)]
    # every per-request host fact in ONE queued copy (a copy each costs a launch and a pinned
    # block); the per-token tables are built from it on the device
    host = torch.tensor([prefix_lens, seq_lens, own or [False] * len(seq_lens)])  # [3, B]
    host = to_device(host, device)
    prefix_dev, seq_dev, own_dev = host[0], host[1], host[2].bool()
    rtt = req_to_token_pool.req_to_token
    to_swa = pool.translate_loc_from_full_to_swa
    last_dev = to_swa(rtt[slots_dev, (prefix_dev - 1).clamp(min=0)]) // block  # [B] page of P-1
    progress_dev = None
    if slots is None:
        facts = device_facts(pool, req_to_token_pool, slots_dev, prefix_dev, last_dev)
        generations = _generations(req_to_token_pool, [f[0] for f in facts])
    else:
        facts, progress_dev = host_facts(
            pool, req_to_token_pool, slots, own, own_dev, slots_dev, prefix_lens, prefix_dev,
            last_dev, commit_rows,
        )  # fmt: skip
    lows = [max(0, p - window + 1) for p in prefix_lens]
    compressed = any(lc.kind.compressed for lc in pool.schema.layers)
    modes = _host_modes(pool, facts, generations, prefix_lens, lows, compressed, commit)
    if progress_dev is None:  # the host decided every mode
        mode_dev = _device_codes(modes, device)
    else:
        mode_dev = _own_modes(own_dev, progress_dev, prefix_dev, block, compressed)
    lo_dev = (prefix_dev - window + 1).clamp(min=0)  # [B] window_lo
    win = _window_slots(pool, rtt, slots_dev, lo_dev, seq_dev, sum(seq_lens) - sum(lows))
    sizes = [s - lo for lo, s in zip(lows, seq_lens, strict=True)]
    rows = (facts, prefix_lens, seq_lens, lows, win.split(sizes), modes)
    requests = _requests(rows, mode_dev, rtt, block)
    pool.tail_pos[slots_dev] = seq_dev
    out_loc = fb.out_cache_loc.long()
    # decode batches too: served decode never plans here, but the extend wrappers are the decode
    # path's oracle in tests (tests/attention/test_decode.py) and need the same tables
    facts_dev = (slots_dev, prefix_dev, seq_dev, lo_dev, mode_dev, last_dev, win)
    tables = _tables(requests, pool, rtt, facts_dev)
    return BatchPlan(tuple(requests), out_loc, pool.translate_loc_from_full_to_swa(out_loc), tables)


def _host_modes(pool, facts, generations, prefix_lens, lows, compressed, commit) -> list:
    """Each request's TailMode where the host knows it, None where the device decides (an own
    tail whose progress the plan did not read); raises where a request's state is lost. Makes
    the requests the owners of their slots' tails."""
    block = pool.schema.block_size
    modes = []
    for (slot, pos, window_ok, _), gen, prefix, window_lo in zip(
        facts, generations, prefix_lens, lows, strict=True
    ):
        own = pool.tail_owner[slot] == gen
        if own and pos is not None and pos > prefix and commit is not None:
            pos = prefix if commit(slot, gen, prefix) else pos  # a verify's rejected tokens undone
        alt = TailMode.FRESH if prefix == 0 else TailMode.REBUILD if prefix % block == 0 else None
        if (own and pos == prefix) or not compressed:  # no tails: nothing to resume
            mode = TailMode.KEEP
        elif own and pos is None:
            mode = None  # the device decides: KEEP where its progress is P, else ``alt``
        elif alt is not None:
            mode = alt
        else:
            raise RuntimeError(
                f"request slot {slot}: prefix {prefix} is neither this request's own progress "
                f"({pos}) nor a block boundary; its compressor state is lost"
            )
        if not window_ok:
            raise RuntimeError(
                f"request slot {slot}: the swa rows of positions {window_lo}..{prefix - 1} "
                "were freed while its queries still need them"
            )
        modes.append(mode)
        pool.tail_owner[slot] = gen
    return modes


def _generations(req_to_token_pool, slots: list[int]) -> list[int]:
    """The requests' generations (``req_generation`` is a host tensor in SGLang: no sync)."""
    return [int(g) for g in req_to_token_pool.req_generation[slots].tolist()]


def _requests(rows, mode_dev, rtt, block: int) -> list[RequestPlan]:
    """The RequestPlans of ``rows`` = (facts, prefix lens, seq lens, window starts, window
    slots, host modes) per request; an undecided mode is the device's ``mode_dev[b]``."""
    requests, start = [], 0
    for b, ((slot, _, _, last), prefix, seq_len, window_lo, win, mode) in enumerate(
        zip(*rows, strict=True)
    ):
        n = seq_len - prefix
        full = rtt[slot, :seq_len]  # a view: no copy, no launch
        tail = mode if mode is not None else mode_dev[b]
        requests.append(
            RequestPlan(
                slot,
                prefix,
                seq_len,
                slice(start, start + n),
                full,
                window_lo,
                win,
                tail,
                last,
                block,
            )
        )
        start += n
    return requests


def _device_codes(modes: list, device) -> torch.Tensor:
    """[B] int32 codes of the host-decided ``modes`` on the device (one queued copy)."""
    return to_device(torch.tensor([_MODE_CODE[m] for m in modes], dtype=torch.int32), device)


def _own_modes(own_dev, progress_dev, prefix_dev, block: int, compressed: bool) -> torch.Tensor:
    """[B] int32 tail mode codes decided on the device (host slots, nothing read): KEEP where
    the tail is the request's own and its ``progress_dev`` is ``P`` (or ``P`` is no place to
    restart from: the pending check raises at the next plan), else FRESH at ``P == 0``, REBUILD
    at a block end (the host raised where a new owner has neither)."""
    keep, fresh = _MODE_CODE[TailMode.KEEP], _MODE_CODE[TailMode.FRESH]
    rebuild = _MODE_CODE[TailMode.REBUILD]
    if not compressed:  # no tails: nothing to resume
        return torch.full_like(prefix_dev, keep, dtype=torch.int32)
    alt = torch.where(prefix_dev % block == 0, rebuild, -1)
    alt = torch.where(prefix_dev == 0, fresh, alt)  # [B]
    kept = own_dev & ((progress_dev == prefix_dev) | (alt < 0))
    return torch.where(kept, keep, alt).int()


def _host_lengths(fb) -> tuple[list[int], list[int]]:
    """``(P, S)`` per request from SGLang's host copies (``seq_lens_cpu``, and for an extend
    ``extend_prefix_lens_cpu``; its device tensor is read only where SGLang kept no host copy)."""
    seq_lens = fb.seq_lens_cpu.tolist()
    if fb.forward_mode.is_decode():
        return [s - 1 for s in seq_lens], seq_lens
    if fb.forward_mode.is_target_verify():  # seq_lens exclude the draft tokens
        n = int(fb.spec_info.draft_token_num)
        return seq_lens, [s + n for s in seq_lens]
    host = getattr(fb, "extend_prefix_lens_cpu", None)
    prefix_lens = list(host) if host is not None else fb.extend_prefix_lens.tolist()
    return [int(p) for p in prefix_lens], seq_lens


def _window_slots(pool, rtt, slots_dev, lo_dev, seq_dev, total: int) -> torch.Tensor:
    """[total] int64 swa slots of positions ``window_lo .. S-1`` of every request in order (the
    requests' ``window_slots`` are views of it): one gather for the batch, its indices built on
    the device from the [B] facts (``total`` = sum of ``S - window_lo``, a host int)."""
    req, pos = _ragged(seq_dev - lo_dev, lo_dev, total)
    return pool.translate_loc_from_full_to_swa(rtt[slots_dev[req], pos])


def _ragged(sizes: torch.Tensor, starts: torch.Tensor, total: int):
    """``(request, position)`` [total] int64 of positions ``starts[b] .. starts[b] + sizes[b]
    - 1`` of every request ``b`` in order (``ref.window_indices``' batch form), on the device of
    ``sizes`` / ``starts`` [B]. ``total`` = ``sizes.sum()`` as a host int: the output size, so
    that ``repeat_interleave`` does not read it back."""
    device = sizes.device
    req = torch.repeat_interleave(torch.arange(sizes.numel(), device=device), sizes,
                                  output_size=total)  # fmt: skip
    shift = starts - (sizes.cumsum(0) - sizes)  # [B] start minus the request's flat offset
    return req, torch.arange(total, device=device) + shift[req]


def _tables(requests: list[RequestPlan], pool, rtt, facts_dev) -> BatchTables:
    """The device tables of an extend batch, from the [B] device facts ``facts_dev`` = (slots
    int64, P, S, window_lo, tail mode codes int32, swa page of token P-1, the flat window slots):
    per-token tables expanded on the device (no host tensor of the batch's tokens), page tables
    gathered from ``req_to_token`` (one gather each)."""
    slots_dev, prefix, seq, lo, mode_dev, last_dev, window_slots = facts_dev
    block = pool.schema.block_size
    device = rtt.device
    lens = seq - prefix  # [B]
    n_tokens = sum(r.seq_len - r.prefix for r in requests)
    query_req, positions = _ragged(lens, prefix, n_tokens)  # [T] each
    cu = torch.cat([lens.new_zeros(1), lens.cumsum(0)]).int()  # [B+1]
    n_blocks = max(1, -(-max((r.seq_len for r in requests), default=1) // block))
    starts = torch.arange(n_blocks, device=device) * block  # [n_blocks]
    cols = starts.clamp(max=rtt.shape[1] - 1).unsqueeze(0)
    rows = slots_dev.unsqueeze(1)
    block_table = (rtt[rows, cols] // block).int()  # [B, n_blocks]
    ends = starts + block  # block ends, kept when P < end <= S
    last = rtt[rows, (ends - 1).clamp(max=rtt.shape[1] - 1).unsqueeze(0)]
    kept = (ends.unsqueeze(0) > prefix.unsqueeze(1)) & (ends.unsqueeze(0) <= seq.unsqueeze(1))
    swa_page = pool.translate_loc_from_full_to_swa(torch.where(kept, last, 0)) // block
    # every query's window (positions t-W+1 .. t of its request, ref.window_indices) as ids into
    # the batch's window slots (they hold positions window_lo .. S-1 of each request in order):
    # one gather of rows already translated, not a [T, W] gather of req_to_token + translation
    n_win = seq - lo  # [B] window slots per request
    first = (n_win.cumsum(0) - n_win - lo)[query_req]  # [T] id of position 0 of its request
    window = positions.unsqueeze(1) + torch.arange(1 - pool.schema.sliding_window, 1, device=device)
    valid = window >= 0
    window_ids = torch.where(valid, first.unsqueeze(1) + window, -1)  # [T, W]
    window_rows = torch.where(valid, window_slots[window_ids.clamp(min=0)], -1)
    ints = torch.stack([slots_dev, prefix, seq, lo]).int()  # [4, B]: one conversion
    rebuild = _MODE_CODE[TailMode.REBUILD]
    return BatchTables(
        req_slots=ints[0],
        prefix=ints[1],
        seq_lens=ints[2],
        window_lo=ints[3],
        cu_seqlens=cu,
        tail_mode=mode_dev,
        tail_mode_c128=torch.where(mode_dev == rebuild, _MODE_CODE[TailMode.FRESH], mode_dev),
        rebuild_page=torch.where(mode_dev == rebuild, last_dev, -1).int(),
        block_table=block_table,
        boundary_table=torch.where(kept, swa_page, 0).int(),
        query_req=query_req.int(),
        positions=positions,
        window_rows=window_rows.int(),
        window_slots=window_slots,
        window_ids=window_ids,
    )
