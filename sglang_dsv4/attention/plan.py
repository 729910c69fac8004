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

from sglang_dsv4.attention.plan_facts import (
    PendingChecks,
    check_pending,
    device_facts,
    host_slots,
)
from sglang_dsv4.attention.plan_tables import (
    FRESH,
    KEEP,
    MODE,
    OWN,
    PREFIX,
    REBUILD,
    SLOT,
    BatchTables,
    TablesIn,
    facts_host,
    tables_torch,
)
from sglang_dsv4.mem.h2d import to_device

__all__ = ["BatchPlan", "BatchTables", "RequestPlan", "TailMode", "plan_batch"]


class TailMode:
    KEEP = "keep"
    FRESH = "fresh"
    REBUILD = "rebuild"


# the int codes of ``kernels.compressor`` (TAIL_KEEP / TAIL_FRESH / TAIL_REBUILD)
_MODE_CODE = {TailMode.KEEP: KEEP, TailMode.FRESH: FRESH, TailMode.REBUILD: REBUILD}
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
class BatchPlan:
    requests: tuple[RequestPlan, ...]
    out_loc: torch.Tensor  # [T] full slots of the new tokens, in batch order
    out_loc_swa: torch.Tensor  # [T] their swa slots
    tables: BatchTables | None = None


def plan_batch(forward_batch, pool, req_to_token_pool, commit=None, commit_rows=None,
               tables=tables_torch) -> BatchPlan:  # fmt: skip
    """Build the plan of an extend, target-verify or decode batch (see module docstring).
    ``commit(slot, generation, prefix) -> bool``: makes a request's tails those after
    ``prefix`` tokens when its last batch was a verify that went further (the rejected tokens'
    updates undone, :class:`~sglang_dsv4.attention.speculative.VerifyJournal`);
    ``commit_rows``: the same for a batch, device ops only (the journal's ``commit_rows``);
    ``tables``: the builder of the device half (:func:`~sglang_dsv4.attention.plan_tables.
    tables_builder`: torch ops or one kernel).

    Host syncs: none where SGLang gave the request slots on the host (``SlottedLens``: the
    checks are raised at the next plan, :mod:`~sglang_dsv4.attention.plan_facts`), else one
    device-to-host read per batch; the lengths come from SGLang's host copies, and every
    host-to-device copy is queued without a sync (:func:`~sglang_dsv4.mem.h2d.to_device`)."""
    fb = forward_batch
    check_pending(pool)
    prefix_lens, seq_lens = _host_lengths(fb)
    block, window = pool.schema.block_size, pool.schema.sliding_window
    compressed = any(lc.kind.compressed for lc in pool.schema.layers)
    lows = [max(0, p - window + 1) for p in prefix_lens]
    slots = host_slots(fb, len(seq_lens))
    rtt = req_to_token_pool.req_to_token
    if slots is None:  # the read path: the slots and the tails' facts are device values
        facts, modes, dev = _read_facts(fb, pool, req_to_token_pool, prefix_lens, lows, seq_lens,
                                        compressed, commit)  # fmt: skip
    else:
        generations = _generations(req_to_token_pool, slots)
        own = [pool.tail_owner[s] == g for s, g in zip(slots, generations, strict=True)]
        # an own tail's progress is not read: None, the device decides its mode
        facts = [(s, None if o else -1, 1, None) for s, o in zip(slots, own, strict=True)]
        modes = _host_modes(pool, facts, generations, prefix_lens, lows, compressed, commit)
        codes = [-1 if m is None else _MODE_CODE[m] for m in modes]
        # every per-request host fact in ONE queued copy (a copy each costs a launch and a
        # pinned block); the per-token tables are built from it on the device
        host = facts_host(slots, prefix_lens, seq_lens, lows, own, codes)
        dev = to_device(host, pool.tail_pos.device)
        if commit_rows is not None:  # a verify's overshoot undone before the progress is read
            s_dev, p_dev = dev[SLOT, :-1].long(), dev[PREFIX, :-1].long()
            commit_rows(s_dev, p_dev, dev[OWN, :-1].bool() & (pool.tail_pos[s_dev] > p_dev))
    inp = TablesIn(
        dev, n_tokens=sum(seq_lens) - sum(prefix_lens), n_window=sum(seq_lens) - sum(lows),
        n_blocks=max(1, -(-max(seq_lens, default=1) // block)),
        max_window=max((s - lo for s, lo in zip(seq_lens, lows, strict=True)), default=0),
        compressed=compressed,
    )  # fmt: skip
    out = tables(pool, rtt, inp)
    if slots is not None:
        pool.plan_checks = PendingChecks(slots, prefix_lens, out.flags)
        facts = [(s, p, ok, out.last_page[b]) for b, (s, p, ok, _) in enumerate(facts)]
    sizes = [s - lo for lo, s in zip(lows, seq_lens, strict=True)]
    win = out.tables.window_slots.split(sizes)
    rows = (facts, prefix_lens, seq_lens, lows, win, modes)
    requests = _requests(rows, out.tables.tail_mode, rtt, block)
    out_loc = fb.out_cache_loc.long()
    # decode batches too: served decode never plans here, but the extend wrappers are the decode
    # path's oracle in tests (tests/attention/test_decode.py) and need the same tables
    return BatchPlan(tuple(requests), out_loc, pool.translate_loc_from_full_to_swa(out_loc),
                     out.tables)  # fmt: skip


def _read_facts(fb, pool, req_to_token_pool, prefix_lens, lows, seq_lens, compressed, commit):
    """The read path (no host slots): the facts of :func:`~sglang_dsv4.attention.plan_facts.
    device_facts` in one read, the modes decided on the host; returns (facts, modes, the
    device facts [R, B+1] with the slots and the modes filled in)."""
    b = len(seq_lens)
    host = facts_host(None, prefix_lens, seq_lens, lows, None, [-1] * b)
    dev = to_device(host, pool.tail_pos.device)
    dev[SLOT, :b] = fb.req_pool_indices.to(dev.device)
    slots_dev, prefix_dev = dev[SLOT, :b].long(), dev[PREFIX, :b].long()
    facts = device_facts(pool, req_to_token_pool, slots_dev, prefix_dev)
    generations = _generations(req_to_token_pool, [f[0] for f in facts])
    modes = _host_modes(pool, facts, generations, prefix_lens, lows, compressed, commit)
    codes = torch.tensor([_MODE_CODE[m] for m in modes], dtype=torch.int32)
    dev[MODE, :b] = to_device(codes, dev.device)
    return facts, modes, dev


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
