"""Pool sizing from the memory SGLang measured (``--mem-fraction-static`` already applied).

Two slot kinds share the budget (see ``pools``): a full slot costs its share of its block's
entries (``CacheSchema.full_bytes_per_token``), an swa slot its raw rows and boundary share
(``swa_bytes_per_token``, 6-7x more on Flash). As in SGLang's hybrid-SWA sizing, there are
``swa_ratio`` swa slots per full slot (``--swa-full-tokens-ratio``). Each request slot costs one
compressor tail; the tails of ``max_running_requests`` are reserved first.

On CPU (no ``--max-total-tokens``) the pool is not sized from free RAM, which SGLang measures
for the whole machine (tens of GB, seconds to zero, other processes' memory): it holds
``context_len x max_running_requests`` full slots at most (:func:`cpu_token_cap`), the budget
still capping it.
"""

import logging

import torch
from sglang.srt.model_executor.pool_configurator import MemoryPoolConfig, MemoryPoolConfigurator

from sglang_dsv4.config import DSV4Config
from sglang_dsv4.mem.schema import CacheSchema, EntryFormat

logger = logging.getLogger(__name__)

__all__ = ["CPU_MAX_RUNNING_REQUESTS", "DSV4PoolConfigurator", "cpu_token_cap", "row_format"]

# Requests served at once on CPU unless --max-running-requests says otherwise (set by the
# plugin's server-args hook): enough for a few users; each costs a whole context of slots.
CPU_MAX_RUNNING_REQUESTS = 16


def row_format(model_dtype: torch.dtype) -> tuple[EntryFormat, torch.dtype]:
    """Rows are stored in the model dtype: fp32 models keep fp32 rows (exact CPU serving)."""
    if model_dtype == torch.float32:
        return EntryFormat.FP32, torch.float32
    return EntryFormat.BF16, torch.bfloat16


def cpu_token_cap(kvc) -> tuple[int, str] | None:
    """(full token slots, why) for a CPU server without ``--max-total-tokens``: every running
    request can hold a whole context. ``None`` elsewhere (GPU: the measured budget decides)."""
    args = kvc.server_args
    if str(kvc.device) != "cpu" or args.max_total_tokens is not None:
        return None
    context = kvc.model_config.context_len
    requests = args.max_running_requests or CPU_MAX_RUNNING_REQUESTS
    why = (
        f"context length {context}{_context_source(kvc)} x {requests} requests (CPU: sized "
        "from the model's context, not from free RAM; --context-length / "
        "--max-running-requests / --max-total-tokens change it)"
    )
    return context * requests, why


def _context_source(kvc) -> str:
    from pathlib import Path

    from sglang_dsv4.embedded import EMBEDDED_CONTEXT, embedded_checkpoint

    path = Path(kvc.model_config.model_path).resolve()
    if path == embedded_checkpoint() and kvc.model_config.context_len == EMBEDDED_CONTEXT:
        return " (the embedded model's training length)"
    return ""


class DSV4PoolConfigurator(MemoryPoolConfigurator):
    def __init__(
        self,
        schema: CacheSchema,
        max_running_requests: int,
        swa_ratio: float,
        token_cap: tuple[int, str] | None = None,
    ):
        self.schema = schema
        self.max_running_requests = max_running_requests
        self.swa_ratio = swa_ratio
        self.token_cap = token_cap

    @classmethod
    def from_kv_cache_configurator(cls, kvc) -> "DSV4PoolConfigurator":
        cfg = DSV4Config.from_dict(kvc.model_config.hf_config.to_dict())
        fmt, _ = row_format(kvc.model_config.dtype)
        args = kvc.server_args
        return cls(
            CacheSchema.from_config(cfg, fmt),
            args.max_running_requests or 256,
            args.swa_full_tokens_ratio,
            cpu_token_cap(kvc),
        )

    def calculate_pool_sizes(self, available_bytes: int, page_size: int) -> MemoryPoolConfig:
        s = self.schema
        tails = s.tail_bytes * (self.max_running_requests + 1)
        per_full_slot = s.full_bytes_per_token + self.swa_ratio * s.swa_bytes_per_token
        full = int((available_bytes - tails) // per_full_slot)
        if self.token_cap is not None and self.token_cap[0] < full:
            cap, why = self.token_cap
            pool_mib = (tails + cap * per_full_slot) / (1 << 20)
            logger.info("DSV4 pool: %d full token slots = %s; %.1f MiB", cap, why, pool_mib)
            full = cap
        return self.calculate_pool_sizes_from_max_tokens(max(full, 0), page_size)

    def calculate_pool_sizes_from_max_tokens(
        self, max_total_num_tokens: int, page_size: int
    ) -> MemoryPoolConfig:
        block, window = self.schema.block_size, self.schema.sliding_window
        if page_size != block:
            raise ValueError(f"DSV4 pools need --page-size {block}, got {page_size}")
        full = max_total_num_tokens // block * block
        swa = int(full * self.swa_ratio) // block * block
        # A request needs its window plus the page being written; less can never admit one.
        if full and swa < window + block:
            raise ValueError(
                f"the swa pool ({swa} token slots = {self.swa_ratio} x {full} full slots) cannot "
                f"hold one request's window ({window}) plus a page ({block}); raise "
                "--swa-full-tokens-ratio or the memory budget"
            )
        return MemoryPoolConfig(
            max_total_num_tokens=full, full_max_total_num_tokens=full, swa_max_total_num_tokens=swa
        )
