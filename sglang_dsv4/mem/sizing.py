"""Pool sizing from the memory SGLang measured (``--mem-fraction-static`` already applied).

Per token slot a block costs its raw KV rows plus its share of entries and block-end state
(``CacheSchema.bytes_per_token_slot``); each request slot costs one compressor tail. The tails
of ``max_running_requests`` are reserved first, the rest becomes whole blocks of slots.
"""

import torch
from sglang.srt.model_executor.pool_configurator import MemoryPoolConfig, MemoryPoolConfigurator

from sglang_dsv4.config import DSV4Config
from sglang_dsv4.mem.schema import CacheSchema, EntryFormat

__all__ = ["DSV4PoolConfigurator", "row_format"]


def row_format(model_dtype: torch.dtype) -> tuple[EntryFormat, torch.dtype]:
    """Rows are stored in the model dtype: fp32 models keep fp32 rows (exact CPU serving)."""
    if model_dtype == torch.float32:
        return EntryFormat.FP32, torch.float32
    return EntryFormat.BF16, torch.bfloat16


class DSV4PoolConfigurator(MemoryPoolConfigurator):
    def __init__(self, schema: CacheSchema, max_running_requests: int):
        self.schema = schema
        self.max_running_requests = max_running_requests

    @classmethod
    def from_kv_cache_configurator(cls, kvc) -> "DSV4PoolConfigurator":
        cfg = DSV4Config.from_dict(kvc.model_config.hf_config.to_dict())
        fmt, _ = row_format(kvc.model_config.dtype)
        return cls(CacheSchema.from_config(cfg, fmt), kvc.server_args.max_running_requests or 256)

    def calculate_pool_sizes(self, available_bytes: int, page_size: int) -> MemoryPoolConfig:
        tails = self.schema.tail_bytes * (self.max_running_requests + 1)
        slots = int((available_bytes - tails) // self.schema.bytes_per_token_slot)
        return self.calculate_pool_sizes_from_max_tokens(max(slots, 0), page_size)

    def calculate_pool_sizes_from_max_tokens(
        self, max_total_num_tokens: int, page_size: int
    ) -> MemoryPoolConfig:
        if page_size != self.schema.block_size:
            raise ValueError(
                f"DSV4 pools need --page-size {self.schema.block_size}, got {page_size}"
            )
        return MemoryPoolConfig(max_total_num_tokens=max_total_num_tokens // page_size * page_size)
