"""Speculative decoding (EAGLE / MTP draft, top-k 1) on the DSV4 backend and pools.

Target verify. A ``TARGET_VERIFY`` batch is an extend of each request by its ``n`` draft tokens
(the last verified token + the draft chain). It writes, for every one of them, what a normal
extend writes: raw window rows at their swa slots, compressed entries / indexer keys completed
by them, boundary rows at block ends, and the compressor tails. Only the tails outlive a rejected
token: the scheduler frees the rejected tokens' slots (their raw rows go with them), an entry or
key row is visible only from the token that completes its window on, which rewrites it first,
and boundary rows live with the swa page of a block's last token. So :class:`VerifyJournal`
keeps, per request, the tails as they were before the verify and the verify tokens' compressor
inputs; the request's next batch (the next verify, or any extend) shows how many tokens were
kept (its prefix), and :meth:`VerifyJournal.commit` restores the tails and re-feeds exactly the
kept tokens (:func:`sglang_dsv4.ref.compressor.compress`), before the plan resumes the tail.

Draft decode. SGLang runs ``num_steps - 1`` draft decode steps over one forward batch whose
positions it advances in place after each step; :class:`DraftDecodeSteps` (SGLang's
"multi-step draft backend" contract: ``attn_backends[i]`` + ``init_forward_metadata``) builds
each step's decode metadata up front at its own positions and cache slots.
"""

from dataclasses import dataclass, field

from sglang_dsv4.attention.plan import BatchPlan, TailMode
from sglang_dsv4.attention.wrappers import CompressedInputs
from sglang_dsv4.ref.compressor import CompressorState, compress

__all__ = ["DraftDecodeSteps", "VerifyJournal", "verify_tokens"]


def verify_tokens(forward_batch) -> int:
    """Tokens per request of a target-verify batch (the draft tokens)."""
    return int(forward_batch.spec_info.draft_token_num)


@dataclass
class _Entry:
    generation: int
    prefix: int  # tail progress before the verify
    n: int  # verify tokens
    tokens: slice  # the request's rows in the verify batch
    tails: dict = field(default_factory=dict)  # layer -> (tail, index tail) CompressorStates
    inputs: dict = field(default_factory=dict)  # layer -> CompressedInputs of the batch


class VerifyJournal:
    """Undo of the rejected verify tokens' compressor-tail updates (module docstring)."""

    def __init__(self, pool):
        self.pool = pool
        self.layers = [lc.layer for lc in pool.schema.layers if lc.kind.compressed]
        self._entries: dict[int, _Entry] = {}  # request slot -> its last verify
        self._batch: list[tuple[int, _Entry]] = []

    def begin(self, plan: BatchPlan, generations) -> None:
        """Before a verify batch's layers run: snapshot the tails of its requests."""
        self._batch = []
        for req in plan.requests:
            self._entries.pop(req.req_slot, None)
            if req.tail != TailMode.KEEP or not self.layers:
                continue
            e = _Entry(
                int(generations[req.req_slot]), req.prefix, req.seq_len - req.prefix, req.tokens
            )
            for layer in self.layers:
                lk = self.pool.layer(layer)
                e.tails[layer] = tuple(
                    None if t is None else _state(t, req.req_slot) for t in (lk.tail, lk.index_tail)
                )
            self._entries[req.req_slot] = e
            self._batch.append((req.req_slot, e))

    def record(self, layer: int, comp: CompressedInputs) -> None:
        """A verify layer's compressor inputs (the batch's: a request's rows in ``tokens``)."""
        for _, e in self._batch:
            e.inputs[layer] = comp

    def end(self) -> None:
        self._batch = []

    def commit(self, slot: int, generation: int, prefix: int) -> bool:
        """Make request ``slot``'s tails those after ``prefix`` tokens, if its last verify ran
        from at most ``prefix`` to at least ``prefix``; False when there is nothing to undo."""
        e = self._entries.pop(slot, None)
        if e is None or e.generation != generation or not e.prefix <= prefix <= e.prefix + e.n:
            return False
        kept = prefix - e.prefix
        for layer, comp in e.inputs.items():  # the layers the verify ran
            tail, index_tail = e.tails[layer]
            lk = self.pool.layer(layer)
            x = comp.x[e.tokens][:kept]  # [kept, hidden]
            _feed(lk.tail, slot, tail, x, e.prefix, comp.compressor, comp)
            if index_tail is not None:
                _feed(lk.index_tail, slot, index_tail, x, e.prefix, comp.indexer.compressor, comp)
        return True


def _state(tail, slot: int) -> CompressorState:
    return CompressorState(tail.kv[slot].clone(), tail.score[slot].clone())


def _feed(tail, slot, state: CompressorState, x, start: int, weights, comp) -> None:
    """Tail row ``slot`` := ``state`` fed the tokens ``x`` from position ``start``."""
    if x.shape[0]:
        _, _, state = compress(x, start, state.clone(), weights, comp.inv_freq, comp.norm_eps)
    tail.kv[slot] = state.kv
    tail.score[slot] = state.score


class DraftDecodeSteps:
    """The draft's decode steps: ``attn_backends[i]`` serves step ``i`` (0-based, of
    ``num_steps - 1``), whose token sits at ``positions + i`` in cache slots
    ``out_cache_loc`` step ``i`` (SGLang's ``per_step_draft_out_cache_loc`` layout)."""

    def __init__(self, model_runner, topk: int, num_steps: int):
        from sglang_dsv4.attention.backend import DSV4AttnBackend

        if topk != 1:
            raise ValueError(f"DSV4 speculative decoding drafts a chain: top-k 1, got {topk}")
        self.topk, self.num_steps = topk, num_steps
        self.attn_backends = [DSV4AttnBackend(model_runner) for _ in range(num_steps - 1)]

    def init_forward_metadata(self, forward_batch) -> None:
        from sglang.srt.speculative.eagle_utils import per_step_draft_out_cache_loc

        fb = forward_batch
        locs = per_step_draft_out_cache_loc(fb.out_cache_loc, fb.batch_size, 1, self.num_steps)
        for i, backend in enumerate(self.attn_backends):
            backend.init_step_metadata(fb, fb.positions + i, locs[i])
