"""Decode step of every layer kind as GPU kernels (twin: ``attention.decode.DecodeTorch``).

Per layer, all launches, no host sync, no host branch on values (CUDA-graph captured):

* ``kernels.kv_store.store_kv``: the new tokens' raw rows into their swa pages (FP8 584-byte
  rows in FlashMLA pages, or bf16 rows);
* compressed layers: one GEMM per compressor for ``wkv(x)`` / ``wgate(x)``, then
  ``kernels.compressor.CompressorFlush`` (``plan_decode``: one program per request, entry and
  block-end stores gated on the device; boundary rows at the token's swa page): c4 main + c4
  indexer (FP8 keys of the Hadamard-rotated key), c128 main;
* c4: ``kernels.indexer.IndexerTopK`` over the FP8 keys (queries rotated by one GEMM with the
  Hadamard matrix), whose key rows are the entry rows of the picks;
* attention: ``kernels.attention.SparseMQA`` or FlashMLA's sparse FP8 decode
  (:class:`FlashMLADecode`), picked per kind and batch shape in ``plan()`` by
  ``attention.choice.pick`` from the measured table.

``plan(bs, pages)`` (host, once per batch) returns a :class:`DecodePlan` holding the planned
kernel objects and their buffers; captured graphs keep theirs alive.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sglang_dsv4.attention.choice import FLASHMLA, flashmla_eligible, pick
from sglang_dsv4.attention.decode import DecodeMeta, DecodeTorch
from sglang_dsv4.config import AttnKind
from sglang_dsv4.kernels.attention import SparseMQA
from sglang_dsv4.kernels.compressor import CompressorFlush
from sglang_dsv4.kernels.indexer import IndexerTopK
from sglang_dsv4.kernels.kv_store import FP8RowLayout, IndexKeyLayout, store_kv
from sglang_dsv4.mem.pools import LayerKV
from sglang_dsv4.mem.schema import CacheSchema, EntryFormat
from sglang_dsv4.ref.quant import hadamard

__all__ = ["DecodeKernels", "DecodePlan", "FlashMLADecode", "hca_rows"]

_FLASHMLA_ALIGN = 64  # FlashMLA reads index lists in multiples of 64


class FlashMLADecode:
    """FlashMLA's sparse FP8 decode, called as SGLang 0.5.17's ``DeepseekV4AttnBackend`` calls
    it (``flash_mla_with_kvcache`` with ``indices`` / ``extra_indices_in_kvcache``, ``attn_sink``,
    a ``FlashMLASchedMeta`` per plan shared by the layers of a kind). Same ``run`` signature as
    ``SparseMQA`` (lists may hold -1: FlashMLA skips invalid indices)."""

    def __init__(self, head_dim: int = 512):
        from sgl_kernel import flash_mla  # sm90 only: imported where it is chosen

        self._mla = flash_mla
        self.head_dim = head_dim

    def plan(self) -> None:
        # The first run of a plan computes the tile schedule; later layers reuse it.
        self.sched = self._mla.get_mla_metadata()[0]

    def run(self, q, kv, indices, sink, scale, *, extra_kv=None, extra_indices=None):
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
            attn_sink=sink,
            extra_k_cache=None if extra_kv is None else extra_kv.view(fp8),
            extra_indices_in_kvcache=None if extra_indices is None else extra_indices.unsqueeze(1),
        )
        return o.squeeze(1)


@dataclass
class DecodePlan:
    """Planned kernels of one decode batch shape (kept alive by the graph captured with it)."""

    attn: dict  # AttnKind -> SparseMQA | FlashMLADecode, planned
    flush: dict  # "c4" / "c4_index" / "c128" -> CompressorFlush planned for the batch
    indexer: IndexerTopK | None
    cu_seqlens: torch.Tensor  # [B + 1] int32: one token per request
    query_req: torch.Tensor  # [B] int32
    choice: dict  # AttnKind -> "ours" / "flashmla" (logged)


def hca_rows(meta: DecodeMeta, ratio: int, width: int) -> torch.Tensor:
    """[B, width] int32 c128 entry rows each query sees (entry ``i`` = row ``pages[i]`` with one
    entry per page), -1 past the visible count and in the alignment padding."""
    n = min(width, meta.pages.shape[1])
    ids = torch.arange(width, device=meta.pages.device)
    rows = F.pad(meta.pages[:, :n], (0, width - n), value=-1)
    visible = (meta.positions + 1) // ratio
    return torch.where(ids < visible.unsqueeze(1), rows, -1).int()


class DecodeKernels(DecodeTorch):
    """GPU decode ops of one pool schema (module docstring). ``flashmla`` False keeps ours
    everywhere (tests, or hosts without FlashMLA)."""

    def __init__(
        self,
        schema: CacheSchema,
        num_heads: int,
        index_topk: int,
        index_heads: int,
        device,
        *,
        flashmla: bool | None = None,
    ):
        if schema.fmt is EntryFormat.FP32 or schema.index_fmt is not EntryFormat.FP8:
            raise ValueError("decode kernels need FP8 or bf16 rows and FP8 indexer keys")
        self.schema, self.device = schema, torch.device(device)
        self.num_heads, self.index_topk, self.index_heads = num_heads, index_topk, index_heads
        self.fp8 = schema.fmt is EntryFormat.FP8
        d = schema.head_dim
        if flashmla is None:
            flashmla = flashmla_eligible(self.fp8, num_heads, d, self.device)
        self.flashmla = flashmla
        self._raw_layout = FP8RowLayout.paged(schema.block_size, d) if self.fp8 else None
        di = schema.index_head_dim
        self._hadamard = hadamard(torch.eye(di, device=self.device))  # x @ H = hadamard(x)
        self._runs = {AttnKind.SWA: self._swa, AttnKind.HCA: self._hca, AttnKind.CSA: self._csa}
        self._ratio = {AttnKind.CSA: 4, AttnKind.HCA: 128}

    # ------------------------------------------------------------------ plan (host)

    def plan(self, bs: int, pages: int) -> DecodePlan:
        s = self.schema
        window = s.sliding_window
        dev = self.device
        extra = {AttnKind.SWA: 0, AttnKind.HCA: self.hca_width(pages), AttnKind.CSA: 0}
        csa = s.layers_of(AttnKind.CSA)
        indexer = None
        if csa:
            extra[AttnKind.CSA] = self.index_topk
            indexer = IndexerTopK(
                self.index_topk,
                self.index_heads,
                s.index_head_dim,
                key_layout=IndexKeyLayout("fp8", csa[0].index_keys_per_block, s.index_head_dim),
            )
            indexer.plan(bs, pages * csa[0].index_keys_per_block, dev)
        attn, choice = {}, {}
        for kind, extra_topk in extra.items():
            choice[kind] = pick(kind.value, self.num_heads, bs, window + extra_topk, self.flashmla)
            attn[kind] = self._attention(choice[kind], bs, window, extra_topk)
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

    def hca_width(self, pages: int) -> int:
        """c128 list width: every entry of ``pages`` blocks, padded for FlashMLA."""
        n = pages * self.schema.block_size // 128
        return -(-max(n, 1) // _FLASHMLA_ALIGN) * _FLASHMLA_ALIGN

    def _attention(self, choice: str, bs: int, window: int, extra_topk: int):
        if choice == FLASHMLA:
            k = FlashMLADecode(self.schema.head_dim)
            k.plan()
        else:
            k = SparseMQA(self.num_heads, self.schema.head_dim, kv_fp8=self.fp8, device=self.device)
            k.plan(bs, window, extra_topk)
        k.extra_topk_width = extra_topk  # the width of the extra lists run() builds
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

    # ------------------------------------------------------------------ run (launches)

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
    ) -> torch.Tensor:
        """``q`` [B, H, D], ``kv`` [B, D] (normed, roped) -> ``o`` [B, H, D] bf16 (the plan's
        buffer for our kernel: consume it before the next layer of the kind runs)."""
        store_kv(kv, lk.raw, meta.out_swa, layout=self._raw_layout)
        return self._runs[kind](plan, lk, meta, q.to(torch.bfloat16), sink, scale, comp)

    def _swa(self, plan: DecodePlan, lk: LayerKV, meta: DecodeMeta, q, sink, scale, comp):
        return plan.attn[AttnKind.SWA].run(q, lk.raw_pages(), meta.window_i32, sink, scale)

    def _hca(self, plan: DecodePlan, lk: LayerKV, meta: DecodeMeta, q, sink, scale, comp):
        self._flush(plan, "c128", lk.entries, lk.tail, None, meta, comp, comp.compressor)
        rows = hca_rows(meta, 128, plan.attn[AttnKind.HCA].extra_topk_width)  # [B, E]
        return plan.attn[AttnKind.HCA].run(
            q, lk.raw_pages(), meta.window_i32, sink, scale,
            extra_kv=lk.entry_pages(), extra_indices=rows,
        )  # fmt: skip

    def _csa(self, plan: DecodePlan, lk: LayerKV, meta: DecodeMeta, q, sink, scale, comp):
        ix = comp.indexer
        self._flush(plan, "c4", lk.entries, lk.tail, lk.boundary, meta, comp, comp.compressor)
        self._flush(
            plan, "c4_index", lk.index_keys, lk.index_tail, lk.index_boundary, meta, comp,
            ix.compressor,
        )  # fmt: skip
        # FP8 keys hold hadamard(k): score hadamard(q) against them (the same dot product)
        iq = torch.matmul(ix.q.float(), self._hadamard).to(torch.bfloat16)  # [B, Hi, Di]
        _, rows, _ = plan.indexer.run(
            iq, ix.weights, lk.index_keys, meta.pages_i32, plan.query_req, meta.positions
        )  # rows [B, topk] int32 entry rows of the picks, -1 past them
        return plan.attn[AttnKind.CSA].run(
            q, lk.raw_pages(), meta.window_i32, sink, scale,
            extra_kv=lk.entry_pages(), extra_indices=rows,
        )  # fmt: skip

    def _flush(self, plan: DecodePlan, name: str, out, tail, boundary, meta, comp, w) -> None:
        """One compressor step of every request: the two projections, then the kernel."""
        kv = F.linear(comp.x, w.wkv)  # [B, coff*D]
        score = F.linear(comp.x, w.wgate)
        plan.flush[name].run(
            kv, score, w.ape, w.norm, comp.inv_freq, tail.kv, tail.score, meta.tail_rows_i32,
            meta.positions_i32, plan.cu_seqlens, meta.pages_i32, out,
            boundary=None if boundary is None else (boundary.kv, boundary.score),
            boundary_pages=meta.swa_page_i32,
        )  # fmt: skip
