"""DSV4 KV pools behind SGLang's ``token_to_kv_pool`` (a hybrid-SWA pool).

Addressing. SGLang hands out two kinds of token slots, both in pages of ``block_size`` (128):
``full`` slots (a token's place in its block; a full page id is our ``block`` id) and ``swa``
slots (where its raw KV row lives), linked by the allocator's ``full_to_swa`` mapping. The radix
cache keeps full slots per cached token and drops swa slots of old tokens first; everything else
a block owns hangs off one of the two page ids. Row ids are flat: raw row = swa slot; entry row
``i`` of a request = ``page * (B/r) + (slot(i*r) % B) // r`` with ``page = slot(i*r) // B`` (a
window never crosses a block); indexer key rows likewise with ``B/4`` rows per page.

Tensors per layer (``LayerKV``), by ``schema.fmt`` (rows) / ``schema.index_fmt`` (indexer keys):

=============== ====================================== ==========================================
tensor          fp8 (GPU default)                      bf16 / fp32 (plain rows)
=============== ====================================== ==========================================
``raw``         uint8 [n_swa_pages, raw page bytes]    [n_swa_pages * B, D]
                FlashMLA pages of B rows (74880 B)
``entries``     uint8 [n_full_pages, entry page bytes] [n_full_pages, B/r, D]
                FlashMLA pages of B/r rows
``index_keys``  uint8 [n_full_pages, B/4 * 132]        [n_full_pages, B/4, Di]
                (IndexKeyLayout fp8 of the Hadamard-
                rotated key, pages of B/4 rows)
=============== ====================================== ==========================================

FP8 pages (``kernels.kv_store.FP8RowLayout.paged(P)``): a page stores its ``P`` rows' 576 data
bytes (448 e4m3 nope + 64 bf16 RoPE) first, then their 8 scale bytes (7 UE8M0 + 1 pad), padded
to a multiple of 576; FlashMLA and ``kernels.attention.SparseMQA`` read them through
``LayerKV.raw_pages()`` / ``entry_pages()`` ([pages, P, 1, 584] uint8 views). FP8 indexer keys
store ``hadamard(k)`` (the indexer kernel scores rotated queries against them);
``read_index_keys`` rotates back, so the torch path sees ``k`` up to the FP8 rounding.

Readers and writers that are not kernels go through ``LayerKV.read_* / write_*`` (row ids as
above; values fp32 / bf16), which hide the format. Also per layer:

* ``boundary[layer]``   [n_swa_pages, 4, D] fp32 TailBuffers, c4 only: the a-halves of the last
  window of the block whose last token sits in that swa page, main and indexer, kv + score; the
  compressor state a request resumes from after a prefix hit at that block end. It lives and
  dies with the block's last swa page, which is exactly when that block end is a valid match
  point.
* ``tails[layer]``      per request slot (``req_pool_idx``) + 1 spare: the running compressor
  state (fp32).

Slot 0 (page 0) of both kinds is SGLang's dummy target for padded tokens; no request owns it.
Tail progress: ``tail_pos`` [n_req_slots + 1] int64 on the pool's device (decode advances it
inside the captured graph; the extend plan reads it once per batch) and ``tail_owner`` (host list,
changed only by extend plans).
"""

from dataclasses import dataclass, field

import torch
from sglang.srt.mem_cache.base_swa_memory_pool import BaseSWAKVPool

from sglang_dsv4.config import AttnKind
from sglang_dsv4.kernels.kv_store import FP8RowLayout, IndexKeyLayout
from sglang_dsv4.mem.schema import CacheSchema, EntryFormat
from sglang_dsv4.ref.kv_layout import pack_fp8_rows, unpack_fp8_rows
from sglang_dsv4.ref.quant import hadamard

__all__ = ["DSV4KVPool", "LayerKV", "RowStore", "TailBuffers"]

_PLAIN = {EntryFormat.BF16: torch.bfloat16, EntryFormat.FP32: torch.float32}


@dataclass
class TailBuffers:
    """Compressor state rows per request slot: kv / score [n_req_slots, slots, channels] fp32."""

    kv: torch.Tensor
    score: torch.Tensor

    @classmethod
    def empty(cls, n: int, shape: tuple[int, int], device) -> "TailBuffers":
        kv = torch.zeros((n, *shape), dtype=torch.float32, device=device)
        return cls(kv, torch.full_like(kv, float("-inf")))


@dataclass(frozen=True)
class RowStore:
    """How rows of one pool tensor are stored: ``layout`` (FP8 rows / FP8 indexer keys, uint8
    pages) or plain rows (``layout`` None) of ``dim`` channels. ``read`` / ``write`` take flat
    row ids [N] (>= 0) and values [N, dim]; reads return ``read_dtype``."""

    dim: int
    rows_per_page: int
    layout: FP8RowLayout | IndexKeyLayout | None
    read_dtype: torch.dtype

    @classmethod
    def make(cls, fmt: EntryFormat, rows_per_page: int, dim: int, keys: bool) -> "RowStore":
        if fmt is not EntryFormat.FP8:
            return cls(dim, rows_per_page, None, _PLAIN[fmt])
        if keys:  # fp32 reads: the rotation back is not exact in bf16
            return cls(dim, rows_per_page, IndexKeyLayout("fp8", rows_per_page, dim), torch.float32)
        return cls(dim, rows_per_page, FP8RowLayout.paged(rows_per_page, dim), torch.bfloat16)

    def empty(self, n_pages: int, device) -> torch.Tensor:
        if self.layout is None:
            return torch.zeros(
                n_pages, self.rows_per_page, self.dim, dtype=self.read_dtype, device=device
            )
        return self.layout.empty(n_pages * self.rows_per_page, device)

    def read(self, t: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Rows ``rows`` (any shape, ids >= 0) -> [*rows.shape, dim]."""
        if self.layout is None:
            return t.view(-1, self.dim)[rows]
        flat = rows.reshape(-1)
        if isinstance(self.layout, IndexKeyLayout):  # stored rotated: rotate back
            x = hadamard(self.layout.read(t, flat))
        else:
            x = unpack_fp8_rows(self.layout.read(t, flat), self.dim)
        return x.to(self.read_dtype).view(*rows.shape, self.dim)

    def write(self, t: torch.Tensor, rows: torch.Tensor, x: torch.Tensor) -> None:
        """Values ``x`` [N, dim] to rows ``rows`` [N] (ids >= 0)."""
        if self.layout is None:
            t.view(-1, self.dim)[rows] = x.to(t.dtype)
        elif isinstance(self.layout, IndexKeyLayout):
            self.layout.write(t, rows, hadamard(x.float()))
        else:
            self.layout.write(t, rows, pack_fp8_rows(x))

    def pages(self, t: torch.Tensor) -> torch.Tensor:
        """The kernels' view: FP8 rows as FlashMLA's uint8 [pages, P, 1, 584] (data then scales
        inside each page, page stride = the padded page), plain rows as [pages, P, D]."""
        if self.layout is None:
            return t.view(-1, self.rows_per_page, self.dim)
        row = self.layout.data_bytes + self.layout.scale_bytes
        return t[:, : self.rows_per_page * row].view(t.shape[0], self.rows_per_page, 1, row)


@dataclass
class LayerKV:
    """What one layer may touch: its views of the pools (``None`` where the kind has none) and
    the row formats to read / write them (module docstring)."""

    layer: int
    kind: AttnKind
    raw: torch.Tensor  # FP8: uint8 [n_swa_pages, page bytes]; plain: [n_swa_pages * B, D]
    entries: torch.Tensor | None  # FP8: uint8 [n_full_pages, page bytes]; plain [.., B/r, D]
    index_keys: torch.Tensor | None  # FP8: uint8 [n_full_pages, B/4 * 132]; plain [.., B/4, Di]
    tail: TailBuffers | None
    index_tail: TailBuffers | None
    boundary: TailBuffers | None  # [n_swa_pages, 4, D] a-halves at block ends
    index_boundary: TailBuffers | None  # [n_swa_pages, 4, Di]
    raw_rows: RowStore | None = None
    entry_rows: RowStore | None = None
    key_rows: RowStore | None = None
    # the kernels' page views of ``raw`` / ``entries``, made once (pools are never reallocated):
    # every attention launch of every step reads them, a slice + view each time otherwise
    _raw_pages: torch.Tensor = field(init=False, repr=False, compare=False)
    _entry_pages: torch.Tensor | None = field(init=False, repr=False, compare=False)

    def __post_init__(self):  # plain rows unless told (tests build LayerKVs by hand)
        if self.raw_rows is None:
            self.raw_rows = RowStore(self.raw.shape[-1], 1, None, self.raw.dtype)
        if self.entry_rows is None and self.entries is not None:
            self.entry_rows = RowStore(
                self.entries.shape[-1], self.entries.shape[1], None, self.entries.dtype
            )
        if self.key_rows is None and self.index_keys is not None:
            k = self.index_keys
            self.key_rows = RowStore(k.shape[-1], k.shape[1], None, k.dtype)
        self._raw_pages = self.raw_rows.pages(self.raw)
        self._entry_pages = None
        if self.entries is not None:
            self._entry_pages = self.entry_rows.pages(self.entries)

    @property
    def fp8(self) -> bool:
        return self.raw_rows.layout is not None

    def read_raw(self, slots: torch.Tensor) -> torch.Tensor:
        """[N, D] raw rows of swa ``slots`` [N] (>= 0)."""
        return self.raw_rows.read(self.raw, slots)

    def write_raw(self, slots: torch.Tensor, kv: torch.Tensor) -> None:
        self.raw_rows.write(self.raw, slots, kv)

    def read_entries(self, rows: torch.Tensor) -> torch.Tensor:
        return self.entry_rows.read(self.entries, rows)

    def write_entries(self, rows: torch.Tensor, x: torch.Tensor) -> None:
        self.entry_rows.write(self.entries, rows, x)

    def read_index_keys(self, rows: torch.Tensor) -> torch.Tensor:
        return self.key_rows.read(self.index_keys, rows)

    def write_index_keys(self, rows: torch.Tensor, k: torch.Tensor) -> None:
        self.key_rows.write(self.index_keys, rows, k)

    def raw_pages(self) -> torch.Tensor:
        """``raw`` as the kernels read it (``RowStore.pages``), a view made at construction."""
        return self._raw_pages

    def entry_pages(self) -> torch.Tensor | None:
        """``entries`` as the kernels read it (``RowStore.pages``; None on SWA layers)."""
        return self._entry_pages


class DSV4KVPool(BaseSWAKVPool):
    """All DSV4 cache tensors of one model replica, sized by the allocator's slot counts.
    ``row_dtype`` is the compute dtype of the rows (what reads return; bf16 for FP8 rows)."""

    def __init__(
        self,
        schema: CacheSchema,
        n_full_slots: int,
        n_swa_slots: int,
        n_req_slots: int,
        row_dtype: torch.dtype,
        device: str,
        enable_memory_saver: bool = False,
    ):
        block = schema.block_size
        for what, n in (("full", n_full_slots), ("swa", n_swa_slots)):
            if n % block:
                raise ValueError(f"{what} slot count {n} is not a multiple of the block {block}")
        if schema.fmt in _PLAIN and _PLAIN[schema.fmt] != row_dtype:
            raise ValueError(f"{schema.fmt.value} rows with row dtype {row_dtype}")
        n_layers = len(schema.layers)
        super().__init__(n_full_slots, block, row_dtype, n_layers, device, enable_memory_saver)
        self.schema = schema
        self.n_swa_slots = n_swa_slots
        # SGLang's allocator reads these: both sides are this one pool.
        self.full_kv_pool = self.swa_kv_pool = self
        self.full_to_swa_index_mapping: torch.Tensor | None = None
        n_full_pages = n_full_slots // block + 1  # + the dummy page 0
        n_swa_pages = n_swa_slots // block + 1
        self.layers = [
            self._layer(lc, n_full_pages, n_swa_pages, n_req_slots + 1) for lc in schema.layers
        ]
        # One spare tail row takes the writes of padded rows in captured decode graphs.
        self.spare_tail_row = n_req_slots
        # Which request owns each tail row (host, set by extend plans) and how far its state has
        # advanced (device: decode graphs advance it without a host round trip).
        self.tail_pos = torch.zeros(n_req_slots + 1, dtype=torch.int64, device=device)
        self.tail_owner = [-1] * n_req_slots
        # The last host-planned extend's device checks, raised at the next plan
        # (attention.plan_facts.PendingChecks)
        self.plan_checks = None
        self._finalize_allocation_log(n_full_slots)

    def _layer(self, lc, n_full_pages: int, n_swa_pages: int, n_tails: int) -> LayerKV:
        s, device = self.schema, self.device
        d, di, block = s.head_dim, s.index_head_dim, s.block_size
        raw_rows = RowStore.make(s.fmt, block, d, keys=False)
        raw = raw_rows.empty(n_swa_pages, device)
        if raw_rows.layout is None:
            raw = raw.view(-1, d)
        entries = index_keys = tail = index_tail = boundary = index_boundary = None
        entry_rows = key_rows = None
        if lc.kind.compressed:
            entry_rows = RowStore.make(s.fmt, lc.entries_per_block, d, keys=False)
            entries = entry_rows.empty(n_full_pages, device)
            tail = TailBuffers.empty(n_tails, lc.tail_shape, device)
        if lc.kind is AttnKind.CSA:
            key_rows = RowStore.make(s.index_fmt, lc.index_keys_per_block, di, keys=True)
            index_keys = key_rows.empty(n_full_pages, device)
            index_tail = TailBuffers.empty(n_tails, lc.index_tail_shape, device)
            half = lc.tail_shape[0] // 2
            boundary = TailBuffers.empty(n_swa_pages, (half, d), device)
            index_boundary = TailBuffers.empty(n_swa_pages, (half, di), device)
        return LayerKV(
            lc.layer, lc.kind, raw, entries, index_keys, tail, index_tail, boundary,
            index_boundary, raw_rows, entry_rows, key_rows,
        )  # fmt: skip

    # BaseSWAKVPool: the allocator owns the full -> swa slot map and registers it here.
    def register_mapping(self, full_to_swa_index_mapping: torch.Tensor) -> None:
        self.full_to_swa_index_mapping = full_to_swa_index_mapping

    def translate_loc_from_full_to_swa(self, kv_indices: torch.Tensor) -> torch.Tensor:
        return self.full_to_swa_index_mapping[kv_indices.long()]

    def get_state_buf_infos(self) -> tuple[list[int], list[int], list[int]]:
        return [], [], []  # no disaggregated transfer of DSV4 state yet

    def layer(self, layer_id: int) -> LayerKV:
        return self.layers[layer_id]

    def get_kv_size_bytes(self) -> int:
        total = 0
        for lk in self.layers:
            for t in (lk.raw, lk.entries, lk.index_keys):
                if t is not None:
                    total += t.numel() * t.element_size()
            for tb in (lk.tail, lk.index_tail, lk.boundary, lk.index_boundary):
                if tb is not None:
                    total += 2 * tb.kv.numel() * 4
        return total

    # KVCache interface: SGLang code outside our backend only sees the raw rows (swa slots).
    def get_key_buffer(self, layer_id: int) -> torch.Tensor:
        return self.layers[layer_id].raw

    def get_value_buffer(self, layer_id: int) -> torch.Tensor:
        return self.layers[layer_id].raw

    def get_kv_buffer(self, layer_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        raw = self.layers[layer_id].raw
        return raw, raw

    def set_kv_buffer(self, layer, loc, cache_k, cache_v, *args, **kwargs) -> None:
        layer_id = layer if isinstance(layer, int) else layer.layer_id
        self.layers[layer_id].write_raw(self.translate_loc_from_full_to_swa(loc), cache_k)
