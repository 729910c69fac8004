"""Speculative decoding (EAGLE / MTP draft, top-k 1) on the DSV4 backend and pools.

Target verify. A ``TARGET_VERIFY`` batch carries ``n`` tokens per request (the last verified
token + the draft chain) at positions ``P .. P+n-1`` (``P`` = its ``seq_lens``). It runs as
static-shape device work, CUDA-graph captured on the GPU like a decode step, over ``B * n``
rows: every row stores its raw KV first, then attends as a decode query at its own position
(its swa window, the c128 entries, the c4 indexer's top-k: a row sees only what lies before its
position, so the batch is causal), while each request's compressors are fed its ``n`` tokens in
order (the multi-token flush kernel on the GPU, ``n`` batched ``compress_decode`` steps in the
twin). :func:`verify_meta` builds the rows' :class:`VerifyMeta`; the ops are
:class:`VerifyTorch` (twin) and ``attention.verify_kernels.VerifyKernels``.

Rejected tokens. A rejected token's raw rows sit at slots the scheduler frees; entries and indexer
keys of the windows it completes are visible only from the token that completes the window on,
which rewrites them first; boundary rows live with the swa page of a block's last token,
rewritten likewise. Only the compressor tails outlive it. A tail is the raw slot values (``kv``,
``score + ape``) of the windows still open at the request's progress (``ref.compressor``), so the
tail after ``P + k`` tokens (``0 <= k <= n``) is a gather from "the tail before the verify, then
the verify tokens' slot values". :class:`VerifyJournal` keeps exactly that per request slot in
device buffers; the request's next batch (prefix ``P + k``) commits it on the device, gated per
row (no host read): a verify batch in its captured metadata, an extend through ``plan_batch``'s
commit callback.

Draft decode. SGLang runs ``num_steps - 1`` draft decode steps over one forward batch whose
positions it advances in place after each step; :class:`DraftDecodeSteps` (SGLang's
"multi-step draft backend" contract: ``attn_backends[i]``, ``init_forward_metadata`` and, for
the draft's CUDA graphs, ``init_cuda_graph_state`` / ``init_forward_metadata_out_graph`` /
``init_forward_metadata_in_graph``) builds each step's decode metadata up front at its own
positions and cache slots.
"""

from dataclasses import dataclass, fields
from functools import partial

import torch

from sglang_dsv4.attention.decode import DecodeMeta, DecodeTorch, _flush, decode_attention
from sglang_dsv4.mem.pools import TailBuffers

__all__ = [
    "DraftDecodeSteps",
    "RequestTables",
    "VerifyJournal",
    "VerifyMeta",
    "VerifyTorch",
    "verify_meta",
    "verify_metadata",
    "verify_ops",
    "verify_tokens",
]


def verify_tokens(forward_batch) -> int:
    """Tokens per request of a target-verify batch (the draft tokens)."""
    return int(forward_batch.spec_info.draft_token_num)


# ---------------------------------------------------------------- the journal


@dataclass
class _Journaled:
    """One compressor tail of the pool and its journal: ``ext`` [n_slots, coff*r + n, C] per
    request slot = the tail before the request's last verify, then its verify tokens' slots."""

    tail: TailBuffers
    ratio: int
    ext: TailBuffers

    @property
    def slots(self) -> int:  # coff * r
        return self.tail.kv.shape[1]


class VerifyJournal:
    """Device-side undo of the rejected verify tokens' tail updates (module docstring). ``n``:
    verify tokens per request (0: not speculating, nothing kept). Memory: about one more copy
    of the pool's tails, ``schema.journal_bytes(n)`` per tail row, which the pool sizing
    reserves (``mem.sizing``)."""

    def __init__(self, pool, n: int):
        self.pool, self.n = pool, n
        self.tails: dict[int, _Journaled] = {}  # tail.kv.data_ptr() -> its journal
        n_slots = pool.spare_tail_row + 1
        device = pool.tail_pos.device
        for lc in pool.schema.layers if n else ():
            lk = pool.layer(lc.layer)
            shapes = pool.schema.journal_shapes(lc, n)  # (main, indexer), as sizing counts
            for tail, shape in zip((lk.tail, lk.index_tail), shapes, strict=True):
                if tail is not None:
                    ext = TailBuffers.empty(n_slots, shape, device)
                    self.tails[tail.kv.data_ptr()] = _Journaled(tail, lc.kind.ratio, ext)
        # [n_slots] int64: P of the request slot's last verify, -1 when nothing is journaled
        # (empty when not speculating: the sizing reserved nothing, ``schema.journal_bytes``)
        self.prefix = torch.full((n_slots if n else 0,), -1, dtype=torch.int64, device=device)

    def _rows(self, slots: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Journal rows of the batch's requests; invalid (padded) rows go to the spare row."""
        return torch.where(valid, slots.long(), self.pool.spare_tail_row)

    def commit_rows(self, slots, prefix, valid) -> torch.Tensor:
        """Device ops only: each valid row's request slot ``slots`` [B] continues at ``prefix``
        [B]; where its last verify ran from ``P0 <= prefix <= P0 + n``, its tails become those
        after ``prefix`` tokens and its progress ``prefix``. The journal entry is dropped either
        way. Returns the rows committed [B] bool."""
        rows, prefix = self._rows(slots, valid), prefix.long()
        p0 = self.prefix[rows]
        act = valid & (p0 >= 0) & (prefix >= p0) & (prefix <= p0 + self.n)
        for j in self.tails.values():
            _commit_tail(j, rows, p0, prefix, act, self.n)
        self.pool.tail_pos[rows] = torch.where(act, prefix, self.pool.tail_pos[rows])
        # index_fill_, not ``[rows] = -1``: that copies a CPU scalar (refused under capture)
        self.prefix.index_fill_(0, rows, -1)
        return act

    def begin_rows(self, slots, prefix, valid) -> None:
        """Device ops only, before a verify's layers run (after its commit): journal the tails
        of the valid rows' requests, about to be fed the tokens from ``prefix``."""
        rows = self._rows(slots, valid)
        for j in self.tails.values():
            j.ext.kv[rows, : j.slots] = j.tail.kv[rows]
            j.ext.score[rows, : j.slots] = j.tail.score[rows]
        self.prefix[rows] = prefix.long()

    def record(self, tail: TailBuffers, rows, positions, kv, score, ape) -> None:
        """A verify's slot values of one compressor: ``kv``, ``score`` [B*n, C] (``wkv(x)``,
        ``wgate(x)``, as the flush reads them) of the tokens at ``positions`` [B*n] of the tail
        rows ``rows`` [B] (the spare row for padding)."""
        j = self.tails.get(tail.kv.data_ptr())
        if j is None:
            return
        b = rows.numel()
        cols = j.slots + torch.arange(self.n, device=rows.device)
        score = score.float() + ape.float()[positions % j.ratio]  # as the flush adds it
        j.ext.kv[rows.long().unsqueeze(1), cols] = kv.float().reshape(b, self.n, -1)
        j.ext.score[rows.long().unsqueeze(1), cols] = score.reshape(b, self.n, -1)

    def commit(self, slot: int, generation: int, prefix: int) -> bool:
        """``plan_batch``'s callback (a host-planned batch, its request's own tails): commit
        ``slot`` at ``prefix``; whether it had a verify to commit (one device read)."""
        if not self.tails:
            return False
        device = self.prefix.device
        slots = torch.tensor([slot], device=device)
        act = self.commit_rows(slots, torch.tensor([prefix], device=device), slots >= 0)
        return bool(act.item())

    def forget(self, slots: torch.Tensor) -> None:
        """A host-planned batch's requests start from what the plan resumed (their own tails,
        committed, or fresh / rebuilt ones of a new owner): no journal entry survives it."""
        if self.tails:
            self.prefix[slots.long()] = -1


def _commit_tail(j: _Journaled, rows, p0, prefix, act, n: int) -> None:
    """Tail rows := the slots of positions ``base .. prefix-1`` gathered from the journal, where
    ``act``; slot ``i`` of a tail at progress ``Q`` holds position ``(Q // r - coff + 1) r + i``
    (``ref.compressor``); a journal row holds the tail at ``p0``, then positions ``p0 ..``."""
    r, s = j.ratio, j.slots
    coff = s // r
    base0 = (p0.clamp(min=0) // r - coff + 1) * r  # [B] first position of the journaled tail
    base = (prefix // r - coff + 1) * r  # [B] ... of the committed tail
    pos = base.unsqueeze(1) + torch.arange(s, device=rows.device)  # [B, s]
    old = pos < p0.unsqueeze(1)
    idx = torch.where(old, pos - base0.unsqueeze(1), s + pos - p0.unsqueeze(1))
    idx = idx.clamp(0, s + n - 1)  # rows without a journal read anything: not committed
    keep = (pos < prefix.unsqueeze(1)).unsqueeze(2)  # [B, s, 1] later slots are empty
    kv = torch.where(keep, j.ext.kv[rows.unsqueeze(1), idx], 0.0)
    score = torch.where(keep, j.ext.score[rows.unsqueeze(1), idx], float("-inf"))
    on = act.view(-1, 1, 1)
    j.tail.kv[rows] = torch.where(on, kv, j.tail.kv[rows])
    j.tail.score[rows] = torch.where(on, score, j.tail.score[rows])


# ---------------------------------------------------------------- verify metadata and ops


@dataclass
class RequestTables:
    """A verify batch's per-request tables, named as ``DecodeMeta``'s per-row ones (what the
    compressor flush reads: the decode kernels' flush takes them as they are)."""

    valid: torch.Tensor  # [B] bool (padded requests: False)
    tail_rows: torch.Tensor  # [B] int64 tail rows (spare row for padding)
    tail_rows_i32: torch.Tensor  # [B] int32
    positions_i32: torch.Tensor  # [B] int32 P, the first verify token's position
    pages_i32: torch.Tensor  # [B, P] int32 full pages
    # [B, P] int32: the swa page of the block's last token where it is a verify token (its c4
    # state is kept there), else -1
    boundary_table: torch.Tensor


@dataclass
class VerifyMeta(DecodeMeta):
    """The ``B * n`` rows' decode metadata (row ``b*n + i``: token ``i`` of request ``b``) and
    each request's tables (request ``b``'s first row), for its compressors."""

    n: int
    requests: RequestTables


def verify_metadata(journal: VerifyJournal, ops, fb, req_to_token, *, n: int, n_pages: int):
    """Device ops only (recorded in the verify's CUDA graph): commit each request's last
    verify at this one's prefix, journal its tails, and build the batch's :class:`VerifyMeta`
    from SGLang's (graph-static) ``req_pool_indices`` [B], ``positions`` / ``out_cache_loc``
    [B*n] (padded requests: slot 0 everywhere)."""
    b = fb.positions.numel() // n
    slots = fb.req_pool_indices[:b]
    prefix = fb.positions.view(b, n)[:, 0]  # P = seq_lens
    valid = fb.out_cache_loc.view(b, n)[:, 0] > 0  # SGLang pads with slot 0, never owned
    journal.commit_rows(slots, prefix, valid)
    journal.begin_rows(slots, prefix, valid)
    pool = journal.pool
    return verify_meta(
        ops, slots, fb.positions, fb.out_cache_loc, pool, req_to_token, n=n, n_pages=n_pages
    )


def verify_meta(
    decode_ops, req_slots, positions, out_loc, pool, req_to_token, *, n: int, n_pages: int
) -> VerifyMeta:
    """Device ops only: the metadata of a verify batch of ``B = req_slots.numel()`` requests,
    ``positions`` / ``out_loc`` [B*n] (SGLang's verify layout). Also leaves the tails' progress
    at ``P + n`` (``pool.tail_pos``)."""
    b = req_slots.numel()
    rows = req_slots.unsqueeze(1).expand(b, n).reshape(-1)  # [B*n]
    meta = decode_ops.build_meta(
        rows,
        positions,
        out_loc,
        req_to_token,
        pool.full_to_swa_index_mapping,
        pool.spare_tail_row,
        pool.tail_pos,
        window=pool.schema.sliding_window,
        block=pool.schema.block_size,
        n_pages=n_pages,
    )
    first = torch.arange(b, device=positions.device) * n  # [B] each request's first row
    tail_rows = meta.tail_rows[first]
    # build_meta wrote every row's progress (n per tail row, in no set order): the last one
    pool.tail_pos[tail_rows] = meta.positions[first] + n
    block_end = ((meta.positions + 1) % pool.schema.block_size == 0).view(b, n, 1)
    boundary = torch.where(block_end, meta.boundary_table.view(b, n, -1), -1).amax(1)
    return VerifyMeta(
        **{f.name: getattr(meta, f.name) for f in fields(DecodeMeta)},
        n=n,
        requests=RequestTables(
            valid=meta.valid[first],
            tail_rows=tail_rows,
            tail_rows_i32=meta.tail_rows_i32[first],
            positions_i32=meta.positions_i32[first],
            pages_i32=meta.pages_i32[first],
            boundary_table=boundary.int(),
        ),
    )


class VerifyTorch(DecodeTorch):
    """The twin of a verify batch (``ref`` math, CPU): :func:`verify_attention`."""

    def __init__(self, journal: VerifyJournal):
        self.journal = journal

    def plan_verify(self, bs: int, n: int, pages: int) -> None:
        return None

    def run(self, plan, kind, lk, meta, q, kv, sink, scale, comp=None, kv_norm=None):
        if kv_norm is not None:
            kv = kv_norm.apply(kv)
        return verify_attention(lk, meta, q, kv, sink, scale, comp, self.journal)


def verify_attention(lk, meta: VerifyMeta, q, kv, sink, scale, comp, journal) -> torch.Tensor:
    """``decode_attention`` of ``B * n`` rows whose compressors take each request's ``n``
    tokens in order (``q`` [B*n, H, D], ``kv`` [B*n, D] normed and roped)."""
    flush = partial(_flush_steps, journal=journal)
    return decode_attention(lk, meta, q, kv, sink, scale, comp, flush=flush)


def _flush_steps(write, per_page, tail, boundary, meta: VerifyMeta, comp, w, journal) -> None:
    """The compressor fed token ``i`` of every request at step ``i`` (``compress_decode``, as
    a decode step), recording each token's slot values in the journal."""
    n = meta.n
    kv, score = [], []
    for i in range(n):
        step = _rows_of(meta, slice(i, None, n))
        x = comp.x[i::n]  # [B, hidden]
        kv.append(x.float() @ w.wkv.float().T)  # what compress_decode projects
        score.append(x.float() @ w.wgate.float().T)
        _flush(write, per_page, tail, boundary, step, x, w, comp)
    kv, score = torch.stack(kv, 1).flatten(0, 1), torch.stack(score, 1).flatten(0, 1)
    journal.record(tail, meta.requests.tail_rows, meta.positions, kv, score, w.ape)


def _rows_of(meta: DecodeMeta, rows: slice) -> DecodeMeta:
    """The metadata of some rows (a step of the verify)."""
    return DecodeMeta(**{f.name: getattr(meta, f.name)[rows] for f in fields(DecodeMeta)})


def verify_ops(decode_ops, journal: VerifyJournal):
    """The verify ops matching the backend's decode ops (chosen once, as they were)."""
    if type(decode_ops) is DecodeTorch:
        return VerifyTorch(journal)
    from sglang_dsv4.attention.verify_kernels import VerifyKernels

    return VerifyKernels.of(decode_ops, journal)


# ---------------------------------------------------------------- draft decode steps


class DraftDecodeSteps:
    """The draft's decode steps: ``attn_backends[i]`` serves step ``i`` (0-based, of
    ``num_steps - 1``), whose token sits at ``positions + i`` in cache slots
    ``out_cache_loc`` step ``i`` (SGLang's ``per_step_draft_out_cache_loc`` layout). Under the
    draft's CUDA graph (``EAGLEDraftCudaGraphRunner``) the host plans every step before a
    capture or replay and the metadata is built inside the graph."""

    def __init__(self, model_runner, topk: int, num_steps: int):
        from sglang_dsv4.attention.backend import DSV4AttnBackend

        if topk != 1:
            raise ValueError(f"DSV4 speculative decoding drafts a chain: top-k 1, got {topk}")
        self.topk, self.num_steps = topk, num_steps
        self.attn_backends = [DSV4AttnBackend(model_runner) for _ in range(num_steps - 1)]

    def init_forward_metadata(self, forward_batch) -> None:
        """Eager: every step planned for this batch."""
        self._plan(forward_batch, in_capture=False, replay=False)
        self.init_forward_metadata_in_graph(forward_batch)

    def init_cuda_graph_state(self, max_bs: int, max_num_tokens: int) -> None:
        for backend in self.attn_backends:
            backend.init_cuda_graph_state(max_bs, max_num_tokens)

    def init_forward_metadata_out_graph(self, forward_batch, in_capture: bool = False) -> None:
        self._plan(forward_batch, in_capture, replay=not in_capture)

    def _plan(self, fb, in_capture: bool, replay: bool) -> None:
        for i, backend in enumerate(self.attn_backends):
            backend.plan_step(fb, i, in_capture=in_capture, replay=replay)

    def init_forward_metadata_in_graph(self, forward_batch) -> None:
        from sglang.srt.speculative.eagle_utils import per_step_draft_out_cache_loc

        fb = forward_batch
        if fb.forward_mode.is_idle():
            return
        locs = per_step_draft_out_cache_loc(fb.out_cache_loc, fb.batch_size, 1, self.num_steps)
        for i, backend in enumerate(self.attn_backends):
            backend.step_metadata(fb, fb.positions + i, locs[i])

    def on_after_cuda_graph_warmup(self) -> None:
        for backend in self.attn_backends:
            backend.on_after_cuda_graph_warmup()
