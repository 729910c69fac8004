"""Decode step of every layer kind as GPU kernels (twin: ``attention.decode.DecodeTorch``).

Per step: ``build_meta``, the step's ``DecodeMeta`` in one launch (``kernels.decode_meta``).
Per layer, all launches, no host sync, no host branch on values (CUDA-graph captured):

* ``kernels.kv_store.store_kv``: the new tokens' raw rows into their swa pages (FP8 584-byte
  rows in FlashMLA pages, or bf16 rows);
* compressed layers: ``kernels.compressor.CompressorFlush`` over the compressors' ``wkv(x)`` /
  ``wgate(x)`` (views of the model's one input GEMM, ``ops.proj``; ``plan_decode``: one
  program per request, entry and block-end stores gated on the device; boundary rows at the
  token's swa page): c4 main + c4 indexer (FP8 keys of the Hadamard-rotated key), c128 main;
* c4: ``kernels.indexer.IndexerTopK`` over the FP8 keys (its score kernel rotates the queries
  like the keys, ``rotate``), whose key rows are the entry rows of the picks;
* attention: ``kernels.attention.SparseMQA``, FlashMLA's sparse FP8 decode
  (:class:`FlashMLADecode`) or our CuTe DSL kernel (``kernels.cute_sparse_mqa.CuteSparseMQA``,
  where nvidia-cutlass-dsl is installed), picked per kind and batch shape in ``plan()`` by
  ``attention.choice.pick`` from the measured tables.

``plan(bs, pages)`` (host, once per batch) returns a :class:`DecodePlan` holding the planned
kernel objects and their buffers; captured graphs keep theirs alive.
"""

import logging
from dataclasses import dataclass

import torch

from sglang_dsv4.attention.choice import CUTE, FLASHMLA, flashmla_eligible, pick
from sglang_dsv4.attention.decode import DecodeMeta, DecodeTorch, KVNorm, hca_list_width
from sglang_dsv4.config import AttnKind
from sglang_dsv4.kernels.attention import SparseMQA
from sglang_dsv4.kernels.compressor import CompressorFlush
from sglang_dsv4.kernels.cute_sparse_mqa import CuteSparseMQA, cute_eligible
from sglang_dsv4.kernels.decode_meta import decode_meta_fields
from sglang_dsv4.kernels.indexer import IndexerTopK
from sglang_dsv4.kernels.kv_store import FP8RowLayout, IndexKeyLayout, store_kv
from sglang_dsv4.mem.pools import LayerKV
from sglang_dsv4.mem.schema import CacheSchema, EntryFormat

__all__ = [
    "DecodeKernels",
    "DecodePlan",
    "FlashMLADecode",
    "load_flashmla",
    "static_hca_schedule",
]

logger = logging.getLogger(__name__)


SCHEDULE_LAUNCH_US = 25.0
"""FlashMLA's per-step tile schedule (``get_mla_metadata_kernel``), one launch per step: 25-26
us at batch 1 and 32 (H100 profiles, 2026-12-06 and 2026-12-07 at a 32K context)."""

HCA_KEY_US = 3.9e-3
"""What one more key of an HCA list costs a FlashMLA decode call at batch 1 (latency-bound:
the key blocks spread over the SMs): (14.5 - 10.6) us / (1152 - 160) keys, H100 2026-11-22
(``docs/perf/attention_bench.json``)."""

KEY_QUERY_US = 5.7e-4
"""What one more key per query costs once the batch fills the GPU: CSA Flash at batch 128, 47
us for 128 x 640 keys (H100 2026-12-06, ``scripts/bench_attention.py``)."""


def static_hca_schedule(entries: int, hca_layers: int, bs: int) -> bool:
    """Whether HCA lists of ``entries`` c128 entries get a static FlashMLA schedule. Static, a
    short request's query walks the whole list (its -1 tail included) in every HCA layer: at
    most ``hca_layers * entries`` keys more per query than with its counts, costed from the
    measured per-key times (latency-bound at small batches, throughput-bound at large); the
    per-step schedule costs one launch per step instead. Requests as long as the list walk
    nothing extra either way, so this is the worst case."""
    per_key = max(HCA_KEY_US, bs * KEY_QUERY_US)
    return hca_layers * entries * per_key <= SCHEDULE_LAUNCH_US


class FlashMLADecode:
    """FlashMLA's sparse FP8 decode, called as SGLang 0.5.17's ``DeepseekV4AttnBackend`` calls
    it (``flash_mla_with_kvcache`` with ``indices`` / ``extra_indices_in_kvcache``, ``attn_sink``,
    a ``FlashMLASchedMeta`` per plan shared by the layers of a kind). Same ``run`` signature as
    ``SparseMQA`` (lists may hold -1: FlashMLA skips invalid indices).

    The tile schedule (FlashMLA's ``get_mla_metadata_kernel``, run by the first call of a plan)
    splits each query's key blocks over the SMs. For the sparse path its only inputs are the
    shapes (batch, heads, list widths) and, when given, the per-query ``extra_topk_length``
    (``csrc/smxx/decode/get_decoding_sched_meta``: ``cur_s_k = ceil(topk, 64) + extra_len``).
    So ``lengths=False`` (SWA: no extra list; CSA: the top-k list is passed without its count,
    its -1 tail is skipped) makes the schedule static: the first run of the plan (a captured
    graph's eager warm-up) computes it and every replay reuses it, no launch per step. CSA
    loses nothing: past 4 * top-k tokens every query picks all ``topk`` entries, so the
    schedule is the same. HCA's list spans every c128 entry of the context (mostly -1 on short
    requests): while walking the whole list costs less than the schedule launch
    (:func:`static_hca_schedule`: e.g. one HCA layer at batch 1 up to ~6400 entries, an 800K
    context; 21 layers up to ~300), it is static too; longer lists keep ``lengths=True``: the
    per-step schedule from the step's counts, one launch per step, computed inside the graph
    (``after_warmup`` drops the warm-up's); its counts must be >= 1 (FlashMLA wants a non-empty
    list; ``DecodeMeta.hca_lengths`` is)."""

    def __init__(self, flash_mla, head_dim: int = 512, *, lengths: bool = True):
        self._mla = flash_mla  # the ``sgl_kernel.flash_mla`` module (see ``load_flashmla``)
        self.head_dim = head_dim
        self.lengths = lengths  # schedule from the per-query extra counts (else static)
        self._extra_lengths = _given if lengths else _dropped

    def plan(self) -> None:
        # The first run of a plan computes the tile schedule; later layers reuse it.
        self.sched = self._mla.get_mla_metadata()[0]

    def after_warmup(self) -> None:
        """Between a graph's warm-up run and its capture: a schedule computed from that run's
        counts is dropped so that the graph computes it per replay; a static one is kept."""
        if self.lengths:
            self.plan()

    def run(
        self, q, kv, indices, sink, scale, *, extra_kv=None, extra_indices=None, extra_lengths=None
    ):
        fp8 = torch.float8_e4m3fn
        o, _ = self._mla.flash_mla_with_kvcache(
            q=q.unsqueeze(1),  # [B, 1, H, D]
            k_cache=kv.view(fp8),
            block_table=None,
            cache_seqlens=None,
            head_dim_v=self.head_dim,
            tile_scheduler_metadata=self.sched,
            softmax_scale=scale,
            is_fp8_kvcache=True,
            indices=indices.unsqueeze(1),
            attn_sink=sink.float(),  # FlashMLA takes fp32 sinks (a no-op when they are)
            extra_k_cache=None if extra_kv is None else extra_kv.view(fp8),
            extra_indices_in_kvcache=None if extra_indices is None else extra_indices.unsqueeze(1),
            extra_topk_length=self._extra_lengths(extra_lengths),
        )
        return o.squeeze(1)


def _given(lengths: torch.Tensor | None) -> torch.Tensor | None:
    """The per-step counts, at least 1 each (``DecodeMeta.hca_lengths`` is built so, in the
    step's metadata: no clamp kernel per layer)."""
    return lengths


def _dropped(lengths: torch.Tensor | None) -> None:
    """A static schedule: FlashMLA walks the whole list and skips its -1 tail."""
    return None


def load_flashmla():
    """``sgl_kernel.flash_mla`` (its extension loads on sm90 only), or None with a warning."""
    try:
        from sgl_kernel import flash_mla

        flash_mla.get_mla_metadata()  # raises when the extension did not load
    except Exception as e:  # serve with our kernel instead
        logger.warning("FlashMLA unavailable (%s: %s); decode uses ours", type(e).__name__, e)
        return None
    return flash_mla


@dataclass
class DecodePlan:
    """Planned kernels of one decode batch shape (kept alive by the graph captured with it)."""

    attn: dict  # AttnKind -> SparseMQA | FlashMLADecode, planned
    flush: dict  # "c4" / "c4_index" / "c128" -> CompressorFlush planned for the batch
    indexer: IndexerTopK | None
    cu_seqlens: torch.Tensor  # [B + 1] int32: one token per request
    query_req: torch.Tensor  # [B] int32
    choice: dict  # AttnKind -> "ours" / "flashmla" / "cute" (logged)


def _norm_args(kv_norm: KVNorm | None, meta: DecodeMeta) -> dict:
    """``store_kv`` keywords that fuse ``kv_norm`` + RoPE into the store."""
    if kv_norm is None:
        return {}
    return {
        "norm_weight": kv_norm.weight,
        "positions": meta.positions,
        "inv_freq": kv_norm.inv_freq,
        "eps": kv_norm.eps,
    }


class DecodeKernels(DecodeTorch):
    """GPU decode ops of one pool schema (module docstring). ``flashmla`` / ``cute`` False keep
    those kernels out of the choice (tests, or hosts without them); None: wherever they run."""

    def __init__(
        self,
        schema: CacheSchema,
        num_heads: int,
        index_topk: int,
        index_heads: int,
        device,
        *,
        flashmla: bool | None = None,
        cute: bool | None = None,
    ):
        if schema.fmt is EntryFormat.FP32 or schema.index_fmt is not EntryFormat.FP8:
            raise ValueError("decode kernels need FP8 or bf16 rows and FP8 indexer keys")
        self.schema, self.device = schema, torch.device(device)
        self.num_heads, self.index_topk, self.index_heads = num_heads, index_topk, index_heads
        self.fp8 = schema.fmt is EntryFormat.FP8
        d = schema.head_dim
        if flashmla is None:
            flashmla = flashmla_eligible(self.fp8, num_heads, d, self.device)
        self._mla = load_flashmla() if flashmla else None  # imported once, here
        self.flashmla = self._mla is not None
        # a candidate only where choice.CUTE_MEASURED says it wins (no rows yet)
        self.cute = cute_eligible(self.fp8, num_heads, d, self.device) if cute is None else cute
        self._raw_layout = FP8RowLayout.paged(schema.block_size, d) if self.fp8 else None
        di = schema.index_head_dim
        self._runs = {AttnKind.SWA: self._swa, AttnKind.HCA: self._hca, AttnKind.CSA: self._csa}
        self._logits: torch.Tensor | None = None  # the indexer's shared score workspace
        # Shapes the kernels cannot serve fail here, at start-up, not at the first decode step.
        SparseMQA(num_heads, d, kv_fp8=self.fp8, device=self.device)
        if schema.layers_of(AttnKind.CSA):
            IndexerTopK(index_topk, index_heads, di, rotate=True)

    # ------------------------------------------------------------------ plan (host)

    def plan(self, bs: int, pages: int) -> DecodePlan:
        s = self.schema
        window = s.sliding_window
        dev = self.device
        extra = {
            AttnKind.SWA: 0,
            AttnKind.HCA: hca_list_width(pages, s.block_size),
            AttnKind.CSA: 0,
        }
        csa = s.layers_of(AttnKind.CSA)
        indexer = None
        if csa:
            extra[AttnKind.CSA] = self.index_topk
            indexer = IndexerTopK(
                self.index_topk,
                self.index_heads,
                s.index_head_dim,
                key_layout=IndexKeyLayout("fp8", csa[0].index_keys_per_block, s.index_head_dim),
                rotate=True,  # FP8 keys hold hadamard(k): the score kernel rotates q
            )
            indexer.plan(bs, pages * csa[0].index_keys_per_block, dev)
            indexer.logits = self._shared_logits(indexer.logits.shape)
        attn, choice = {}, {}
        for kind, extra_topk in extra.items():
            choice[kind] = pick(
                kind, self.num_heads, bs, window + extra_topk, self.flashmla, self.cute
            )
            attn[kind] = self._attention(choice[kind], kind, bs, window, extra_topk)
        flush = {}
        for name, ratio, d, out in self._compressors():
            flush[name] = CompressorFlush(ratio, d, out, layout=self._entry_layout(name, ratio))
            flush[name].plan_decode(bs)
        return DecodePlan(
            attn=attn,
            flush=flush,
            indexer=indexer,
            cu_seqlens=torch.arange(bs + 1, dtype=torch.int32, device=dev),
            query_req=torch.arange(bs, dtype=torch.int32, device=dev),
            choice=choice,
        )

    def _shared_logits(self, shape: tuple[int, int]) -> torch.Tensor:
        """One fp32 score workspace for every plan (captured graphs replay one at a time):
        [queries, max keys] fp32 per graph size would add up to GBs at long contexts."""
        n = shape[0] * shape[1]
        if self._logits is None or self._logits.numel() < n:
            self._logits = torch.empty(n, dtype=torch.float32, device=self.device)
        return self._logits[:n].view(shape)

    def _attention(self, choice: str, kind: AttnKind, bs: int, window: int, extra_topk: int):
        if choice == FLASHMLA:
            # a static schedule but on HCA lists that cost more to walk than a schedule launch
            hca_layers = len(self.schema.layers_of(AttnKind.HCA))
            lengths = kind is AttnKind.HCA and not static_hca_schedule(extra_topk, hca_layers, bs)
            k = FlashMLADecode(self._mla, self.schema.head_dim, lengths=lengths)
            k.plan()
        elif choice == CUTE:
            k = CuteSparseMQA(self.num_heads, self.schema.head_dim, device=self.device)
            k.plan(bs, window, extra_topk)
        else:
            k = SparseMQA(self.num_heads, self.schema.head_dim, kv_fp8=self.fp8, device=self.device)
            k.plan(bs, window, extra_topk)
        return k

    def _compressors(self) -> list[tuple[str, int, int, str]]:
        s, out = self.schema, "fp8" if self.fp8 else "bf16"
        found = []
        if s.layers_of(AttnKind.CSA):
            found += [("c4", 4, s.head_dim, out), ("c4_index", 4, s.index_head_dim, "index_fp8")]
        if s.layers_of(AttnKind.HCA):
            found.append(("c128", 128, s.head_dim, out))
        return found

    def _entry_layout(self, name: str, ratio: int):
        s = self.schema
        per_page = s.block_size // ratio
        if name == "c4_index":
            return IndexKeyLayout("fp8", per_page, s.index_head_dim)
        return FP8RowLayout.paged(per_page, s.head_dim) if self.fp8 else None

    def after_warmup(self, plan: DecodePlan) -> None:
        """Between SGLang's warm-up run of a graph and its capture: FlashMLA's schedules were
        computed eagerly by the warm-up; those that depend on the step's counts are computed
        inside the graph instead (per replay), static ones are kept (``FlashMLADecode``)."""
        for k in plan.attn.values():
            if isinstance(k, FlashMLADecode):
                k.after_warmup()

    # ------------------------------------------------------------------ run (launches)

    def build_meta(
        self,
        req_slots,
        positions,
        out_loc,
        req_to_token,
        full_to_swa,
        spare_tail_row: int,
        tail_pos,
        *,
        window: int,
        block: int,
        n_pages: int,
    ) -> DecodeMeta:
        """``DecodeTorch.build_meta`` in one launch (``kernels.decode_meta``)."""
        fields = decode_meta_fields(
            req_slots, positions, out_loc, req_to_token, full_to_swa, spare_tail_row, tail_pos,
            window=window, block=block, n_pages=n_pages,
            hca_width=hca_list_width(n_pages, block),
        )  # fmt: skip
        return DecodeMeta(**fields)

    def run(
        self,
        plan: DecodePlan,
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
        """``q`` [B, H, D], ``kv`` [B, D] (raw with ``kv_norm``: the store kernel norms and
        ropes it; else normed and roped) -> ``o`` [B, H, D] bf16 (the plan's buffer for our
        kernel: consume it before the next layer of the kind runs)."""
        store_kv(kv, lk.raw, meta.out_swa, layout=self._raw_layout, **_norm_args(kv_norm, meta))
        return self._runs[kind](plan, lk, meta, q.to(torch.bfloat16), sink, scale, comp)

    def _swa(self, plan: DecodePlan, lk: LayerKV, meta: DecodeMeta, q, sink, scale, comp):
        return plan.attn[AttnKind.SWA].run(q, lk.raw_pages(), meta.window_i32, sink, scale)

    def _hca(self, plan: DecodePlan, lk: LayerKV, meta: DecodeMeta, q, sink, scale, comp):
        self._flush(plan, "c128", lk.entries, lk.tail, None, meta, comp, comp.compressor)
        return plan.attn[AttnKind.HCA].run(
            q, lk.raw_pages(), meta.window_i32, sink, scale,
            extra_kv=lk.entry_pages(), extra_indices=meta.hca_rows, extra_lengths=meta.hca_lengths,
        )  # fmt: skip

    def _csa(self, plan: DecodePlan, lk: LayerKV, meta: DecodeMeta, q, sink, scale, comp):
        ix = comp.indexer
        self._flush(plan, "c4", lk.entries, lk.tail, lk.boundary, meta, comp, comp.compressor)
        self._flush(
            plan, "c4_index", lk.index_keys, lk.index_tail, lk.index_boundary, meta, comp,
            ix.compressor,
        )  # fmt: skip
        # FP8 keys hold hadamard(k): the indexer's score kernel rotates q (``rotate``; bf16 in a
        # bf16 model, fp32 queries of tests are rotated before their bf16 rounding on CPU)
        _, rows, picked = plan.indexer.run(
            ix.q,
            ix.weights,
            lk.index_keys,
            meta.pages_i32,
            plan.query_req,
            meta.positions,
        )  # rows [B, topk] int32 entry rows of the picks, -1 past their count ``picked`` [B]
        return plan.attn[AttnKind.CSA].run(
            q, lk.raw_pages(), meta.window_i32, sink, scale,
            extra_kv=lk.entry_pages(), extra_indices=rows, extra_lengths=picked,
        )  # fmt: skip

    def _flush(self, plan: DecodePlan, name: str, out, tail, boundary, meta, comp, w) -> None:
        """One compressor step of every request over its projections (the model's fused input
        GEMM made them)."""
        kv, score = comp.projections(index=name == "c4_index")  # [B, coff*D] each
        plan.flush[name].run(
            kv, score, w.ape, w.norm, comp.inv_freq, tail.kv, tail.score, meta.tail_rows_i32,
            meta.positions_i32, plan.cu_seqlens, meta.pages_i32, out,
            boundary=None if boundary is None else (boundary.kv, boundary.score),
            boundary_table=meta.boundary_table,
        )  # fmt: skip
