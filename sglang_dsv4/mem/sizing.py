"""Pool sizing from the memory SGLang measured (``--mem-fraction-static`` already applied).

Two slot kinds share the budget (see ``pools``): a full slot costs its share of its block's
entry and indexer-key pages (``CacheSchema.full_bytes_per_token``), an swa slot its share of
every layer's raw page and of its page's boundary rows (``swa_bytes_per_token``, 6-7x more on
Flash). As in SGLang's hybrid-SWA sizing, there are ``swa_ratio`` swa slots per full slot
(``--swa-full-tokens-ratio``, default 0.1 for DSV4, see ``plugin``). Each request slot costs one
compressor tail; the tails of ``max_running_requests`` are reserved first (:func:`tail_rows`:
SGLang's request slots, its padding row and our spare row).

Speculative decoding (``--speculative-algorithm``) adds the target's verify journal
(``attention.speculative.VerifyJournal``): per tail row, the tails before a verify and the slot
values of its ``--speculative-num-draft-tokens`` tokens (``CacheSchema.journal_bytes``, the
shapes it allocates), reserved with the tails only when speculating (:func:`verify_width`). On
real DeepSeek-V4-Flash (``configs/dsv4-flash.json``: 21 c4 + 20 c128 layers) that is 13.4 MB per
request at 4 draft tokens against 12.2 MB of tails: 3.46 GB for SGLang's default 256 requests
(258 tail rows; the tails: 3.15 GB), most of it the c128 tails (128 slots x 512 channels, kv +
score fp32). Not speculating, nothing is reserved for it (and the backend allocates none).

Row formats (``row_format``): fp32 models keep fp32 rows (the exact CPU path); other models keep
bf16 rows on CPU and, on the GPU, FlashMLA's FP8 rows unless ``--kv-cache-dtype bfloat16``
(then bf16 rows; indexer keys stay FP8 on the GPU, the format the indexer kernel reads).

Capacity on the 4-layer Flash-dims model (SWA, c4, c128, c4), FP8: a full token costs 372 B
(c4 entry pages 2 x 148.5 + c4 key pages 2 x 33 + c128 pages 9), an swa token 2660 B (4 raw
rows of 585 B with page padding + 2 x 160 B of c4 boundary); at swa ratio 0.1 that is 638 B per
full token against native SGLang's 724 B, i.e. ~13 % more full tokens per GB. An swa ratio of
0.1 still leaves ``0.1 * full`` swa slots, tens of thousands of 256-slot request windows on an
H100, far above any running batch; what it costs is how many cached prefixes keep their last
window (a prefix hit needs it).

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

__all__ = [
    "CPU_MAX_RUNNING_REQUESTS",
    "DSV4PoolConfigurator",
    "cpu_token_cap",
    "row_format",
    "schema_for",
    "tail_rows",
    "verify_width",
]

logger = logging.getLogger(__name__)

# Requests served at once on CPU unless --max-running-requests says otherwise (set by the
# plugin's server-args hook): enough for a few users; each costs a whole context of slots.
CPU_MAX_RUNNING_REQUESTS = 16


def row_format(
    model_dtype: torch.dtype, device: str = "cpu", kv_cache_dtype: str = "auto"
) -> tuple[EntryFormat, EntryFormat, torch.dtype]:
    """-> (row format, indexer key format, row compute dtype); see the module docstring."""
    if model_dtype == torch.float32:
        return EntryFormat.FP32, EntryFormat.FP32, torch.float32
    if torch.device(device).type == "cpu":
        return EntryFormat.BF16, EntryFormat.BF16, torch.bfloat16
    if kv_cache_dtype in ("bf16", "bfloat16"):
        return EntryFormat.BF16, EntryFormat.FP8, torch.bfloat16
    if kv_cache_dtype not in ("auto", "fp8_e4m3"):
        raise ValueError(f"--kv-cache-dtype {kv_cache_dtype}: DSV4 pools take fp8_e4m3 or bfloat16")
    return EntryFormat.FP8, EntryFormat.FP8, torch.bfloat16


def schema_for(model_config, server_args, device: str) -> tuple[CacheSchema, torch.dtype]:
    """The cache schema and row dtype of a served model (one place for sizing and pools); a
    speculative draft model (SGLang's ``is_draft_model``) caches its MTP layer only."""
    cfg = DSV4Config.from_dict(model_config.hf_config.to_dict())
    if getattr(model_config, "is_draft_model", False):
        from sglang_dsv4.ref.mtp import mtp_config

        cfg = mtp_config(cfg)
    fmt, index_fmt, row_dtype = row_format(
        model_config.dtype, device, getattr(server_args, "kv_cache_dtype", "auto")
    )
    return CacheSchema.from_config(cfg, fmt, index_fmt), row_dtype


def verify_width(server_args, is_draft: bool) -> int:
    """Tokens per request of the target's verify batches: the verify journal's extra slots (0
    when not speculating, or for the draft model, whose own batches need no journal)."""
    if getattr(server_args, "speculative_algorithm", None) is None or is_draft:
        return 0
    return int(server_args.speculative_num_draft_tokens)


def tail_rows(max_running_requests: int) -> int:
    """Tail (and journal) rows of the pool: SGLang's ``ReqToTokenPool`` has one row per
    request + padding row 0 (``DSV4KVPool``'s ``n_req_slots``), and the pool one spare row."""
    return max_running_requests + 2


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
    """``verify_tokens``: tokens per request of a speculative verify (:func:`verify_width`),
    0 when not speculating."""

    def __init__(
        self,
        schema: CacheSchema,
        max_running_requests: int,
        swa_ratio: float,
        token_cap: tuple[int, str] | None = None,
        verify_tokens: int = 0,
    ):
        self.schema = schema
        self.max_running_requests = max_running_requests
        self.swa_ratio = swa_ratio
        self.token_cap = token_cap
        self.verify_tokens = verify_tokens

    @classmethod
    def from_kv_cache_configurator(cls, kvc) -> "DSV4PoolConfigurator":
        args = kvc.server_args
        device = getattr(kvc, "device", None) or args.device or "cuda"
        schema, _ = schema_for(kvc.model_config, args, device)
        return cls(
            schema,
            args.max_running_requests or 256,
            args.swa_full_tokens_ratio,
            cpu_token_cap(kvc),
            verify_width(args, getattr(kvc, "is_draft_worker", False)),
        )

    @property
    def tails_bytes(self) -> int:
        """The compressor tails of every tail row."""
        return self.schema.tail_bytes * tail_rows(self.max_running_requests)

    @property
    def journal_bytes(self) -> int:
        """The verify journal of every tail row (0 when not speculating)."""
        return self.schema.journal_bytes(self.verify_tokens) * tail_rows(self.max_running_requests)

    def calculate_pool_sizes(self, available_bytes: int, page_size: int) -> MemoryPoolConfig:
        s = self.schema
        reserved = self.tails_bytes + self.journal_bytes
        per_full_slot = s.full_bytes_per_token + self.swa_ratio * s.swa_bytes_per_token
        full = int((available_bytes - reserved) // per_full_slot)
        if self.token_cap is not None and self.token_cap[0] < full:
            cap, why = self.token_cap
            pool_mib = (reserved + cap * per_full_slot) / (1 << 20)
            logger.info("DSV4 pool: %d full token slots = %s; %.1f MiB", cap, why, pool_mib)
            full = cap
        logger.info(
            "sglang-dsv4 pool budget %.2f GB: tails of %d requests %.2f GB, verify journal "
            "%.2f GB (%d tokens per verify; 0: not speculating), the rest holds %d full tokens "
            "at %.1f B each (swa slots included)",
            available_bytes / 1e9,
            self.max_running_requests,
            self.tails_bytes / 1e9,
            self.journal_bytes / 1e9,
            self.verify_tokens,
            full,
            per_full_slot,
        )
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
        s = self.schema
        logger.info(
            "sglang-dsv4 pools: %s rows, %s indexer keys; %d full tokens (%.1f B each) + %d swa "
            "tokens (%.1f B each, swa ratio %.3g) = %.1f B per full token, %.2f GB",
            s.fmt.value,
            s.index_fmt.value,
            full,
            s.full_bytes_per_token,
            swa,
            s.swa_bytes_per_token,
            self.swa_ratio,
            s.full_bytes_per_token + self.swa_ratio * s.swa_bytes_per_token,
            (full * s.full_bytes_per_token + swa * s.swa_bytes_per_token) / 1e9,
        )
        return MemoryPoolConfig(
            max_total_num_tokens=full, full_max_total_num_tokens=full, swa_max_total_num_tokens=swa
        )
