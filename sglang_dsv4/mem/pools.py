"""DSV4 KV pools behind SGLang's ``token_to_kv_pool``.

Addressing. SGLang hands out token slots in pages of ``block_size`` (128) tokens; a page id is
our ``block`` id. Everything a block owns lives at that id, so the radix cache, which only keeps
token -> slot maps, gets compressed entries and compressor state for free on a prefix hit:

* ``raw[layer]``       [n_slots, D]        raw KV per token slot (the ``swa_window`` rows)
* ``entries[layer]``   [n_blocks, B/r, D]  c4 / c128 entries; entry ``i`` of a request lives at
  block ``slot(i*r) // B``, row ``(slot(i*r) % B) // r`` (a window never crosses a block)
* ``index_keys[layer]`` [n_blocks, B/4, Di] c4 indexer keys, same addressing
* ``boundary[layer]``  c4 only: the a-halves of each block's last window (main and indexer,
  kv + score), the compressor state a request resumes from after a prefix hit at that block end
* ``tails[layer]``     per request slot (``req_pool_idx``): the running compressor state

Row 0 / slot 0 is SGLang's dummy target for padded tokens; no request owns it.
Raw rows are kept for every token for now: evicting ``swa_window`` rows separately from the
entries of the same blocks (they are 32x / 128x larger per token) is prefix-cache work.
"""

from dataclasses import dataclass

import torch
from sglang.srt.mem_cache.memory_pool import KVCache

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
    raw: torch.Tensor  # [n_slots, D]
    entries: torch.Tensor | None  # [n_blocks, B/r, D]
    index_keys: torch.Tensor | None  # [n_blocks, B/4, Di]
    tail: TailBuffers | None
    index_tail: TailBuffers | None
    boundary: TailBuffers | None  # [n_blocks, 4, D] a-halves at block ends
    index_boundary: TailBuffers | None  # [n_blocks, 4, Di]


class DSV4KVPool(KVCache):
    """All DSV4 cache tensors of one model replica, sized by the allocator's slot count."""

    def __init__(
        self,
        schema: CacheSchema,
        n_slots: int,
        n_req_slots: int,
        row_dtype: torch.dtype,
        device: str,
        enable_memory_saver: bool = False,
    ):
        block = schema.block_size
        if n_slots % block:
            raise ValueError(f"slot count {n_slots} is not a multiple of the block {block}")
        super().__init__(n_slots, block, row_dtype, len(schema.layers), device, enable_memory_saver)
        self.schema = schema
        n_blocks = n_slots // block + 1  # + the dummy block 0
        n_rows = n_slots + block
        d, di = schema.head_dim, schema.index_head_dim
        self.layers: list[LayerKV] = []
        for lc in schema.layers:
            csa = lc.kind is AttnKind.CSA
            entries = index_keys = tail = index_tail = boundary = index_boundary = None
            if lc.kind.compressed:
                entries = torch.zeros(
                    n_blocks, lc.entries_per_block, d, dtype=row_dtype, device=device
                )
                tail = TailBuffers.empty(n_req_slots, lc.tail_shape, device)
            if csa:
                index_keys = torch.zeros(
                    n_blocks, lc.index_keys_per_block, di, dtype=row_dtype, device=device
                )
                index_tail = TailBuffers.empty(n_req_slots, lc.index_tail_shape, device)
                half = lc.tail_shape[0] // 2
                boundary = TailBuffers.empty(n_blocks, (half, d), device)
                index_boundary = TailBuffers.empty(n_blocks, (half, di), device)
            raw = torch.zeros(n_rows, d, dtype=row_dtype, device=device)
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
        # Which request owns each tail row and how far its state has advanced (host side).
        self.tail_pos = [0] * n_req_slots
        self.tail_owner = [-1] * n_req_slots
        self._finalize_allocation_log(n_slots)

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

    # KVCache interface: SGLang code outside our backend only sees the raw rows.
    def get_key_buffer(self, layer_id: int) -> torch.Tensor:
        return self.layers[layer_id].raw

    def get_value_buffer(self, layer_id: int) -> torch.Tensor:
        return self.layers[layer_id].raw

    def get_kv_buffer(self, layer_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        raw = self.layers[layer_id].raw
        return raw, raw

    def set_kv_buffer(self, layer, loc, cache_k, cache_v, *args, **kwargs) -> None:
        layer_id = layer if isinstance(layer, int) else layer.layer_id
        self.layers[layer_id].raw[loc] = cache_k.to(self.dtype)
