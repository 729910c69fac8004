"""Long context on paper: the pool memory one request of ``L`` tokens holds, and how many such
requests fit beside the weights on one GPU, computed from the cache schema (``mem.schema``: the
page bytes the pools allocate) and the checkpoint layout (``weights.layout``: the bytes the GPU
keeps, FP8 linears and MXFP4 experts stay quantized there). ``scripts/long_context.py paper``
prints it and writes ``docs/long_context.md``.

Per request (FP8 rows, the GPU default):

* full slots: every block of the context keeps its compressed entries and indexer keys
  (``ceil(L / 128)`` blocks x ``full_bytes_per_token`` x 128);
* swa slots: the raw rows of the ``swa_window`` plus, while a chunk is prefilled, the whole
  chunk's rows (``ceil((window + chunk) / 128) + 1`` pages at the peak, 2 pages in decode);
* one compressor tail per request slot (``tail_bytes``).

The pool is split into full and swa slots by ``--swa-full-tokens-ratio`` (default 0.1): a pool
sized for long requests holds ``ratio x full`` swa slots whether they are needed or not, so the
table gives both the fit at the default ratio and at the ratio the request needs.
Not counted: activations of the prefill chunk, CUDA graphs and the sampler's buffers (what
``1 - mem_fraction_static`` is left for).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from sglang_dsv4.config import DSV4Config
from sglang_dsv4.mem.schema import CacheSchema, EntryFormat
from sglang_dsv4.weights.layout import Fmt, logical_shapes, released_fmt, stored_bytes

__all__ = ["GPUS", "RequestMemory", "fits", "request_memory", "weight_bytes"]

MiB = 1 << 20
# total memory nvidia-smi reports
GPUS = {"H100 80GB (HBM3)": 81559 * MiB, "H200 141GB (HBM3e)": 143771 * MiB}


@dataclass(frozen=True)
class RequestMemory:
    context: int
    full: int  # bytes of full-slot pages (entries + indexer keys)
    swa_prefill: int  # raw window + chunk rows at the prefill peak
    swa_decode: int
    tail: int

    @property
    def total(self) -> int:
        return self.full + self.swa_prefill + self.tail


def request_memory(schema: CacheSchema, context: int, chunk: int) -> RequestMemory:
    block = schema.block_size
    blocks = schema.blocks_for(context)
    swa_page = block * schema.swa_bytes_per_token
    return RequestMemory(
        context=context,
        full=round(blocks * block * schema.full_bytes_per_token),
        swa_prefill=round((math.ceil((schema.sliding_window + chunk) / block) + 1) * swa_page),
        swa_decode=round(2 * swa_page),
        tail=schema.tail_bytes,
    )


def weight_bytes(cfg: DSV4Config, dense_bf16: bool = False) -> int:
    """Bytes of the served weights (MTP layers not loaded): the released formats (FP8 linears,
    ``expert_dtype`` experts), or every matrix bf16 (the side-by-side bf16 checkpoint)."""
    total, experts = 0, cfg.quant.expert_dtype if cfg.quant else "fp8"
    for name, shape in logical_shapes(cfg, mtp=False).items():
        fmt = released_fmt(name, experts)
        if (dense_bf16 or cfg.quant is None) and fmt in (Fmt.FP8, Fmt.MXFP4):
            fmt = Fmt.BF16
        total += stored_bytes(shape, fmt)
    return total


def fits(
    schema: CacheSchema,
    mem: RequestMemory,
    gpu_bytes: int,
    weights: int,
    mem_fraction: float,
    swa_ratio: float | None,
) -> float:
    """Requests of ``mem.context`` tokens the KV budget ``gpu x fraction - weights`` holds, with
    the pool split at ``swa_ratio`` (None: the swa slots the requests need, no more)."""
    budget = gpu_bytes * mem_fraction - weights
    if budget <= 0:
        return 0.0
    if swa_ratio is None:
        per_request = mem.total
    else:  # every full slot brings swa_ratio swa slots; enough of them for the prefill peak
        full_tokens = mem.full / schema.full_bytes_per_token
        swa_tokens = max(swa_ratio * full_tokens, mem.swa_prefill / schema.swa_bytes_per_token)
        per_request = mem.full + swa_tokens * schema.swa_bytes_per_token + mem.tail
    return budget / per_request


def schema_of(cfg: DSV4Config) -> CacheSchema:
    """The GPU default: FP8 rows and FP8 indexer keys."""
    return CacheSchema.from_config(cfg, EntryFormat.FP8, EntryFormat.FP8)
