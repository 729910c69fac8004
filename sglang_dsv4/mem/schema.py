"""Per-layer cache schema of DSV4, derived from the frozen layer schedule.

The unit is the ``block``: 128 original tokens = lcm(4, 128). Per block and per layer:

=========  ==============================  =========================================
layer      entries + indexer keys / block  tail (compressor state, per request)
=========  ==============================  =========================================
SWA        0                               none
c4 (CSA)   32 entries + 32 indexer keys    main 8 slots x 2D, indexer 8 slots x 2Di
c128 (HCA) 1 entry                         128 slots x D
=========  ==============================  =========================================

Every layer also attends to the raw KV of the last ``sliding_window`` tokens (``swa_window``).
Those raw rows live in a separate, smaller pool of ``swa`` token slots, so that cached prefixes
can drop them long before their entries (SGLang's hybrid-SWA split: a "full" slot is a token's
place in a block, an ``swa`` slot holds its raw row). The c4 compressor state at each block end
(``boundary``) is kept with the ``swa`` page of the block's last token: a block end is only a
valid prefix-hit point while that page is resident anyway. Tails are kv + score in fp32.

Formats (``fmt`` for raw rows and entries, ``index_fmt`` for indexer keys): ``fp8`` is the layout
FlashMLA's DSV4 kernels read, one 584-byte record per KV row (``[0, 448)`` e4m3 nope channels,
``[448, 576)`` bf16 RoPE channels, ``[576, 583)`` one UE8M0 scale per 64 nope channels, 1 pad
byte), stored in FlashMLA pages (``kernels.kv_store.FP8RowLayout.paged``: a page's rows' 576 data
bytes, then their 8 scale bytes, padded to a multiple of 576), and 132-byte indexer keys (128 e4m3
+ one fp32 scale, ``IndexKeyLayout``); ``bf16`` / ``fp32`` store plain rows (``bf16`` rows keep
FP8 indexer keys on the GPU: the indexer kernel reads FP8 keys only). Pool sizing counts the page
bytes actually allocated (``*_page_bytes``); ``block_bytes`` counts logical row bytes.
"""

import enum
import math
from dataclasses import dataclass

from sglang_dsv4.config import AttnKind, DSV4Config
from sglang_dsv4.kernels.kv_store import FP8RowLayout, IndexKeyLayout
from sglang_dsv4.ref.kv_layout import fp8_row_bytes

__all__ = ["CacheSchema", "EntryFormat", "LayerCacheSpec"]


class EntryFormat(enum.Enum):
    FP8 = "fp8"
    BF16 = "bf16"
    FP32 = "fp32"

    def kv_row_bytes(self, head_dim: int, rope_dim: int) -> int:
        if self is EntryFormat.FP8:
            return fp8_row_bytes(head_dim, rope_dim)
        return head_dim * (2 if self is EntryFormat.BF16 else 4)

    def index_key_bytes(self, index_head_dim: int) -> int:
        if self is EntryFormat.FP8:
            return index_head_dim + 4
        return index_head_dim * (2 if self is EntryFormat.BF16 else 4)

    def kv_page_bytes(self, rows: int, head_dim: int, rope_dim: int) -> int:
        """Bytes of a page of ``rows`` KV rows (FP8: FlashMLA's padded page)."""
        if self is EntryFormat.FP8:
            return FP8RowLayout.paged(rows, head_dim, rope_dim).page_bytes
        return rows * self.kv_row_bytes(head_dim, rope_dim)

    def index_page_bytes(self, rows: int, index_head_dim: int) -> int:
        if self is EntryFormat.FP8:
            return IndexKeyLayout("fp8", rows, index_head_dim).page_bytes
        return rows * self.index_key_bytes(index_head_dim)


@dataclass(frozen=True)
class LayerCacheSpec:
    layer: int
    kind: AttnKind
    entries_per_block: int  # compressed KV rows per block
    index_keys_per_block: int  # c4 only
    tail_shape: tuple[int, int] | None  # (slots, channels) of the main compressor tail
    index_tail_shape: tuple[int, int] | None  # c4 indexer compressor tail


@dataclass(frozen=True)
class CacheSchema:
    block_size: int
    sliding_window: int
    head_dim: int
    rope_dim: int
    index_head_dim: int
    fmt: EntryFormat
    layers: tuple[LayerCacheSpec, ...]
    index_fmt: EntryFormat | None = None  # None: same as ``fmt``

    def __post_init__(self):
        if self.index_fmt is None:
            object.__setattr__(self, "index_fmt", self.fmt)

    @classmethod
    def from_config(
        cls,
        cfg: DSV4Config,
        fmt: EntryFormat = EntryFormat.FP8,
        index_fmt: EntryFormat | None = None,
    ) -> "CacheSchema":
        block = cfg.block_size
        if block % cfg.sliding_window:
            raise ValueError(f"block {block} must hold whole windows of {cfg.sliding_window}")
        layers = []
        for s in cfg.layers:
            ratio = s.ratio
            coff = 2 if s.attn is AttnKind.CSA else 1  # c4 windows overlap: two channel halves
            tail = (coff * ratio, coff * cfg.head_dim) if s.attn.compressed else None
            csa = s.attn is AttnKind.CSA
            layers.append(
                LayerCacheSpec(
                    layer=s.index,
                    kind=s.attn,
                    entries_per_block=block // ratio if s.attn.compressed else 0,
                    index_keys_per_block=block // ratio if csa else 0,
                    tail_shape=tail,
                    index_tail_shape=(2 * ratio, 2 * cfg.index_head_dim) if csa else None,
                )
            )
        return cls(
            block_size=block,
            sliding_window=cfg.sliding_window,
            head_dim=cfg.head_dim,
            rope_dim=cfg.rope_dim,
            index_head_dim=cfg.index_head_dim,
            fmt=fmt,
            layers=tuple(layers),
            index_fmt=index_fmt,
        )

    @property
    def kv_row_bytes(self) -> int:
        return self.fmt.kv_row_bytes(self.head_dim, self.rope_dim)

    @property
    def index_key_bytes(self) -> int:
        return self.index_fmt.index_key_bytes(self.index_head_dim)

    @property
    def raw_page_bytes(self) -> int:
        """One swa page (``block_size`` raw rows) of one layer."""
        return self.fmt.kv_page_bytes(self.block_size, self.head_dim, self.rope_dim)

    def entry_page_bytes(self, lc: LayerCacheSpec) -> int:
        """One full page's entries (``B/r`` rows) of a compressed layer."""
        return self.fmt.kv_page_bytes(lc.entries_per_block, self.head_dim, self.rope_dim)

    def index_page_bytes(self, lc: LayerCacheSpec) -> int:
        """One full page's indexer keys (``B/4`` rows) of a c4 layer."""
        return self.index_fmt.index_page_bytes(lc.index_keys_per_block, self.index_head_dim)

    @property
    def block_bytes(self) -> int:
        """Compressed entries + indexer keys of one block over all layers."""
        return sum(
            lc.entries_per_block * self.kv_row_bytes
            + lc.index_keys_per_block * self.index_key_bytes
            for lc in self.layers
        )

    @property
    def boundary_bytes(self) -> int:
        """Per block: the c4 compressors' state at the block's end (the a-halves of its last
        window, main and indexer, kv + score fp32), so a prefix hit there can resume."""
        return sum(
            2 * 4 * (lc.tail_shape[0] // 2) * (lc.tail_shape[1] // 2 + lc.index_tail_shape[1] // 2)
            for lc in self.layers
            if lc.index_tail_shape
        )

    @property
    def full_bytes_per_token(self) -> float:
        """A full slot's share of its block's entry and indexer-key pages (as allocated)."""
        page = sum(
            (self.entry_page_bytes(lc) if lc.entries_per_block else 0)
            + (self.index_page_bytes(lc) if lc.index_keys_per_block else 0)
            for lc in self.layers
        )
        return page / self.block_size

    @property
    def swa_bytes_per_token(self) -> float:
        """An ``swa`` slot: its share of every layer's raw page and of its page's boundary."""
        return (self.raw_page_bytes * len(self.layers) + self.boundary_bytes) / self.block_size

    @property
    def tail_bytes(self) -> int:
        """Compressor state of one request over all layers (kv + score, fp32)."""
        return self._tail_rows_bytes(0)

    @staticmethod
    def journal_shapes(lc: LayerCacheSpec, n: int) -> tuple[tuple[int, int] | None, ...]:
        """(main, indexer) shapes of one request slot's rows of ``lc``'s compressor tails
        followed by ``n`` more slots (``n = 0``: the tails): the speculative verify journal
        (``attention.speculative.VerifyJournal``) keeps the tails before a verify, then its
        ``n`` tokens' slot values. ``None`` where the layer has no such tail."""
        return tuple(
            (shape[0] + n, shape[1]) if shape else None
            for shape in (lc.tail_shape, lc.index_tail_shape)
        )

    def journal_bytes(self, n: int) -> int:
        """The verify journal of one request slot, ``n`` verify tokens per request (0: not
        speculating, no journal): :meth:`journal_shapes` (kv + score, fp32) and its int64
        prefix (``VerifyJournal.prefix``)."""
        return self._tail_rows_bytes(n) + 8 if n else 0

    def _tail_rows_bytes(self, n: int) -> int:
        shapes = [s for lc in self.layers for s in self.journal_shapes(lc, n) if s]
        return sum(2 * 4 * a * b for a, b in shapes)

    def blocks_for(self, num_tokens: int) -> int:
        return math.ceil(num_tokens / self.block_size)

    def layers_of(self, kind: AttnKind) -> tuple[LayerCacheSpec, ...]:
        return tuple(lc for lc in self.layers if lc.kind is kind)
