"""A target-verify batch as GPU kernels (twin: ``attention.speculative.VerifyTorch``).

A verify of ``B`` requests x ``n`` tokens is a decode step of ``B * n`` rows
(``attention.decode_kernels.DecodeKernels``: KV store, indexer top-k and attention per row at
its own position, FlashMLA's sparse decode or ours per the batch shape) except the compressors,
which take each request's ``n`` tokens in order: ``kernels.compressor.CompressorFlush`` with a
grid for the most entries ``n`` tokens can complete and the request-level tables of
:class:`~sglang_dsv4.attention.speculative.VerifyMeta` (``cu_seqlens`` = ``0, n, 2n, ..``). Every
launch reads device tensors only: the verify's CUDA graph replays it. Each compressor's slot
values go to the :class:`~sglang_dsv4.attention.speculative.VerifyJournal`.
"""

import torch

from sglang_dsv4.attention.decode_kernels import DecodeKernels, DecodePlan
from sglang_dsv4.kernels.compressor import CompressorFlush

__all__ = ["VerifyKernels"]


class VerifyKernels(DecodeKernels):
    """The verify ops of a pool whose decode ops are ``DecodeKernels`` (module docstring)."""

    journal = None  # the backend's VerifyJournal

    @classmethod
    def of(cls, decode: DecodeKernels, journal) -> "VerifyKernels":
        """Same schema, shapes and attention choices as the backend's decode ops."""
        ops = cls(
            decode.schema,
            decode.num_heads,
            decode.index_topk,
            decode.index_heads,
            decode.device,
            flashmla=decode.flashmla,
        )
        ops.journal = journal
        return ops

    def plan_verify(self, bs: int, n: int, pages: int) -> DecodePlan:
        """Host, once per batch shape: the decode plan of ``bs * n`` rows with multi-token
        compressor flushes."""
        plan = self.plan(bs * n, pages)
        for name, ratio, d, out in self._compressors():
            flush = CompressorFlush(ratio, d, out, layout=self._entry_layout(name, ratio))
            flush.plan([ratio - 1] * bs, [n] * bs)  # the most entries n tokens complete
            plan.flush[name] = flush
        plan.cu_seqlens = torch.arange(0, (bs + 1) * n, n, dtype=torch.int32, device=self.device)
        return plan

    def _flush(self, plan: DecodePlan, name: str, out, tail, boundary, meta, comp, w) -> None:
        """Each request's compressor fed its ``n`` tokens: the decode flush over the request
        tables (``meta``: a ``VerifyMeta``), then the tokens' slot values into the journal."""
        super()._flush(plan, name, out, tail, boundary, meta.requests, comp, w)
        kv, score = comp.projections(index=name == "c4_index")  # [B*n, coff*D] each
        self.journal.record(tail, meta.requests.tail_rows, meta.positions, kv, score, w.ape)
