"""DSV4 KV pools behind SGLang's ``token_to_kv_pool`` (a hybrid-SWA pool).

Addressing. SGLang hands out two kinds of token slots, both in pages of ``block_size`` (128):
``full`` slots (a token's place in its block; a full page id is our ``block`` id) and ``swa``
slots (where its raw KV row lives), linked by the allocator's ``full_to_swa`` mapping. The radix
cache keeps full slots per cached token and drops swa slots of old tokens first; everything else
a block owns hangs off one of the two page ids:

* ``entries[layer]``    [n_full_pages, B/r, D]  c4 / c128 entries; entry ``i`` of a request
  lives at full page ``slot(i*r) // B``, row ``(slot(i*r) % B) // r`` (a window never crosses a
  block)
* ``index_keys[layer]`` [n_full_pages, B/4, Di] c4 indexer keys, same addressing
* ``raw[layer]``        [n_swa_slots, D]        raw KV per swa slot (the ``swa_window`` rows)
* ``boundary[layer]``   [n_swa_pages, 4, D]     c4 only: the a-halves of the last window of the
  block whose last token sits in that swa page, main and indexer, kv + score; the compressor
  state a request resumes from after a prefix hit at that block end. It lives and dies with the
  block's last swa page, which is exactly when that block end is a valid match point.
* ``tails[layer]``      per request slot (``req_pool_idx``) + 1 spare: the running compressor
  state

Slot 0 (page 0) of both kinds is SGLang's dummy target for padded tokens; no request owns it.
"""

from dataclasses import dataclass

import torch
from sglang.srt.mem_cache.base_swa_memory_pool import BaseSWAKVPool

from sglang_dsv4.config import AttnKind
from sglang_dsv4.mem.schema import CacheSchema

__all__ = ["DSV4KVPool", "LayerKV", "TailBuffers"]


@dataclass
class TailBuffers:
    """Compressor state rows per request slot: kv / score [n_req_slots, slots, channels] fp32."""

    kv: torch.Tensor
    score: torch.Tensor

    @classmethod
    def empty(cls, n: int, shape: tuple[int, int], device) -> "TailBuffers":
        kv = torch.zeros((n, *shape), dtype=torch.float32, device=device)
        return cls(kv, torch.full_like(kv, float("-inf")))


@dataclass
class LayerKV:
    """What one layer may touch: its views of the pools (``None`` where the kind has none)."""

    layer: int
    kind: AttnKind
    raw: torch.Tensor  # [n_swa_slots, D]
    entries: torch.Tensor | None  # [n_full_pages, B/r, D]
    index_keys: torch.Tensor | None  # [n_full_pages, B/4, Di]
    tail: TailBuffers | None
    index_tail: TailBuffers | None
    boundary: TailBuffers | None  # [n_swa_pages, 4, D] a-halves at block ends
    index_boundary: TailBuffers | None  # [n_swa_pages, 4, Di]


class DSV4KVPool(BaseSWAKVPool):
    """All DSV4 cache tensors of one model replica, sized by the allocator's slot counts."""

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
        n_layers = len(schema.layers)
        super().__init__(n_full_slots, block, row_dtype, n_layers, device, enable_memory_saver)
        self.schema = schema
        self.n_swa_slots = n_swa_slots
        # SGLang's allocator reads these: both sides are this one pool.
        self.full_kv_pool = self.swa_kv_pool = self
        self.full_to_swa_index_mapping: torch.Tensor | None = None
        n_full_pages = n_full_slots // block + 1  # + the dummy page 0
        n_swa_pages = n_swa_slots // block + 1
        d, di = schema.head_dim, schema.index_head_dim
        self.layers: list[LayerKV] = []
        for lc in schema.layers:
            csa = lc.kind is AttnKind.CSA
            entries = index_keys = tail = index_tail = boundary = index_boundary = None
            if lc.kind.compressed:
                entries = torch.zeros(
                    n_full_pages, lc.entries_per_block, d, dtype=row_dtype, device=device
                )
                tail = TailBuffers.empty(n_req_slots + 1, lc.tail_shape, device)
            if csa:
                index_keys = torch.zeros(
                    n_full_pages, lc.index_keys_per_block, di, dtype=row_dtype, device=device
                )
                index_tail = TailBuffers.empty(n_req_slots + 1, lc.index_tail_shape, device)
                half = lc.tail_shape[0] // 2
                boundary = TailBuffers.empty(n_swa_pages, (half, d), device)
                index_boundary = TailBuffers.empty(n_swa_pages, (half, di), device)
            raw = torch.zeros(n_swa_pages * block, d, dtype=row_dtype, device=device)
            self.layers.append(
                LayerKV(
                    lc.layer,
                    lc.kind,
                    raw,
                    entries,
                    index_keys,
                    tail,
                    index_tail,
                    boundary,
                    index_boundary,
                )
            )
        # One spare tail row takes the writes of padded rows in captured decode graphs.
        self.spare_tail_row = n_req_slots
        # Which request owns each tail row and how far its state has advanced (host side).
        self.tail_pos = [0] * n_req_slots
        self.tail_owner = [-1] * n_req_slots
        self._finalize_allocation_log(n_full_slots)

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
        self.layers[layer_id].raw[self.translate_loc_from_full_to_swa(loc)] = cache_k.to(self.dtype)
