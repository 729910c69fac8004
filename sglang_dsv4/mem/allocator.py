"""Token-slot allocators of DSV4: SGLang's hybrid-SWA allocator over two paged allocators with
page = ``block`` (128 tokens), one for full slots and one for swa slots (see ``pools``).

SGLang's paged ``alloc_extend`` / ``alloc_decode`` launch Triton kernels; on a device without
Triton (CPU) the same allocation runs in torch. Like SGLang, allocation returns ``None`` when
there is no room (the scheduler queues or retracts) and page 0 is reserved for padded tokens.
Free counts: ``full_available_size()`` / ``swa_available_size()`` (tokens), or
``free_page_count`` of each side.
"""

import numpy as np
import torch
from sglang.kernels.ops.memory.allocator import alloc_decode_kernel
from sglang.srt.mem_cache.allocator.paged import PagedTokenToKVPoolAllocator, alloc_extend_naive
from sglang.srt.mem_cache.allocator.swa import SWATokenToKVPoolAllocator
from sglang.srt.utils import get_num_new_pages, next_power_of_2

from sglang_dsv4.kernels.alloc_decode import alloc_decode_pair

__all__ = ["DSV4PagedAllocator", "DSV4SWAAllocator", "opening_pages"]


def opening_pages(seq_lens_cpu: torch.Tensor, page_size: int) -> int:
    """How many of a decode step's requests open a new page (their new token, at length ``n``,
    is a page's first: ``(n - 1) % page_size == 0``), read on the host: a Python loop over the
    list for a small batch (~0.5 us at 1 request), numpy on the tensor's memory for a large one
    (~6 us), instead of SGLang's ``get_num_new_pages`` (four torch CPU ops, ~10 us)."""
    if seq_lens_cpu.numel() <= 32:
        return sum((n - 1) % page_size == 0 for n in seq_lens_cpu.tolist())
    return int(np.count_nonzero((seq_lens_cpu.numpy() - 1) % page_size == 0))


class DSV4PagedAllocator(PagedTokenToKVPoolAllocator):
    @property
    def _torch_path(self) -> bool:
        return torch.device(self.device).type == "cpu"

    @property
    def free_page_count(self) -> int:
        return len(self.free_pages) + len(self.release_pages)

    def alloc_extend(
        self,
        prefix_lens: torch.Tensor,
        prefix_lens_cpu: torch.Tensor,
        seq_lens: torch.Tensor,
        seq_lens_cpu: torch.Tensor,
        last_loc: torch.Tensor,
        extend_num_tokens: int,
        num_new_pages: int | None = None,
    ):
        if not self._torch_path:
            return super().alloc_extend(
                prefix_lens,
                prefix_lens_cpu,
                seq_lens,
                seq_lens_cpu,
                last_loc,
                extend_num_tokens,
                num_new_pages,
            )
        if num_new_pages is None:
            num_new_pages = get_num_new_pages(
                seq_lens=seq_lens_cpu, page_size=self.page_size, prefix_lens=prefix_lens_cpu
            )
        if self.need_sort and num_new_pages > len(self.free_pages):
            self.merge_and_sort_free()
        if num_new_pages > len(self.free_pages):
            return None
        out = torch.empty((extend_num_tokens,), dtype=torch.int64, device=self.device)
        alloc_extend_naive(
            prefix_lens.long(),
            seq_lens.long(),
            last_loc.long(),
            self.free_pages,
            out,
            self.page_size,
            self.device,
        )
        self.free_pages = self.free_pages[num_new_pages:]
        return out

    def alloc_decode(
        self,
        seq_lens: torch.Tensor,
        seq_lens_cpu: torch.Tensor,
        last_loc: torch.Tensor,
        num_new_pages: int | None = None,
    ):
        """SGLang's paged decode allocation (the same kernel and free-list update), with the
        step's new-page count given by the caller (:func:`opening_pages`, counted once for
        both sides of the hybrid allocator) instead of recounted with torch ops per side."""
        if self._torch_path:
            return self._alloc_decode_torch(seq_lens, last_loc)
        if num_new_pages is None:
            num_new_pages = opening_pages(seq_lens_cpu, self.page_size)
        if self.debug_mode:
            assert torch.all((last_loc + 2) % self.page_size == seq_lens % self.page_size)
        bs = len(seq_lens)
        room = self.decode_room(bs, num_new_pages)
        out = torch.empty((bs,), dtype=torch.int64, device=self.device)
        alloc_decode_kernel[(bs,)](
            seq_lens, last_loc, self.free_pages, out, next_power_of_2(bs), self.page_size
        )
        if self.debug_mode:
            assert len(torch.unique(out)) == len(out)
        if not room:
            return None
        self.free_pages = self.free_pages[num_new_pages:]
        return out

    def decode_room(self, bs: int, num_new_pages: int) -> bool:
        """SGLang's decode-step free-list check: the free pages merged and sorted first where
        ``bs`` requests could outnumber them, then whether ``num_new_pages`` are free."""
        if self.need_sort and bs > len(self.free_pages):
            self.merge_and_sort_free()
        return num_new_pages <= len(self.free_pages)

    def _alloc_decode_torch(self, seq_lens: torch.Tensor, last_loc: torch.Tensor):
        new_page = (seq_lens.long() - 1) % self.page_size == 0  # the new token opens a page
        num_new_pages = int(new_page.sum())
        if self.need_sort and num_new_pages > len(self.free_pages):
            self.merge_and_sort_free()
        if num_new_pages > len(self.free_pages):
            return None
        pages = self.free_pages[: max(num_new_pages, 1)]
        pick = (torch.cumsum(new_page.long(), 0) - 1).clamp(min=0)
        out = torch.where(
            new_page, pages[pick] * self.page_size if num_new_pages else 0, last_loc.long() + 1
        )
        self.free_pages = self.free_pages[num_new_pages:]
        return out


class DSV4SWAAllocator(SWATokenToKVPoolAllocator):
    """Full + swa slots, each side a :class:`DSV4PagedAllocator`."""

    def __init__(self, size: int, size_swa: int, page_size: int, dtype, device, kvcache, need_sort):
        super().__init__(size, size_swa, page_size, dtype, device, kvcache, need_sort)
        self.full_attn_allocator = DSV4PagedAllocator(
            size, page_size, dtype, device, kvcache, need_sort
        )
        self.swa_attn_allocator = DSV4PagedAllocator(
            size_swa, page_size, dtype, device, kvcache, need_sort
        )
        self.clear()
        # a decode step: one launch on the GPU (kernels.alloc_decode), else side by side (the
        # CPU torch path, and SGLang's debug mode, whose checks are per side)
        fused = torch.device(device).type == "cuda" and not self.full_attn_allocator.debug_mode
        self._decode = self._decode_fused if fused else self._decode_per_side

    def alloc_decode(self, seq_lens, seq_lens_cpu, last_loc):
        """SGLang's hybrid-SWA decode allocation (full slots, swa slots, the full -> swa map).
        Upstream allocates full then swa and returns None if either fails, leaking the other
        side's pages: both sides are checked first (one new page per request opening a page).
        Every decode step runs this on the host: the new-page count is read once
        (:func:`opening_pages`) and handed to both sides."""
        opening = opening_pages(seq_lens_cpu, self.page_size)
        if not self.new_pages_available(opening, opening):
            return None
        return self._decode(seq_lens, seq_lens_cpu, last_loc, opening)

    def _decode_fused(self, seq_lens, seq_lens_cpu, last_loc, opening: int):
        """Both sides and the map in one launch (:mod:`~sglang_dsv4.kernels.alloc_decode`),
        each side's free list handled as its ``alloc_decode`` does."""
        sides = (self.full_attn_allocator, self.swa_attn_allocator)
        if not all(side.decode_room(len(seq_lens), opening) for side in sides):
            return None
        full, swa = sides
        out = alloc_decode_pair(seq_lens, last_loc, self.full_to_swa_index_mapping,
                                full.free_pages, swa.free_pages, page=self.page_size)  # fmt: skip
        for side in sides:
            side.free_pages = side.free_pages[opening:]
        return out

    def _decode_per_side(self, seq_lens, seq_lens_cpu, last_loc, opening: int):
        swa_last_loc = self.translate_loc_from_full_to_swa(last_loc)
        full = self.full_attn_allocator.alloc_decode(seq_lens, seq_lens_cpu, last_loc, opening)
        swa = self.swa_attn_allocator.alloc_decode(seq_lens, seq_lens_cpu, swa_last_loc, opening)
        if full is None or swa is None:
            return None
        self.full_to_swa_index_mapping[full] = swa
        return full
