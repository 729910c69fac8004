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
from sglang.srt.mem_cache.allocator.paged import PagedTokenToKVPoolAllocator, alloc_extend_naive
from sglang.srt.mem_cache.allocator.swa import SWATokenToKVPoolAllocator
from sglang.srt.utils import get_num_new_pages

__all__ = ["DSV4PagedAllocator", "DSV4SWAAllocator"]


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
        self, seq_lens: torch.Tensor, seq_lens_cpu: torch.Tensor, last_loc: torch.Tensor
    ):
        if not self._torch_path:
            return super().alloc_decode(seq_lens, seq_lens_cpu, last_loc)
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

    def alloc_decode(self, seq_lens, seq_lens_cpu, last_loc):
        # Upstream allocates full then swa and returns None if either fails, leaking the other
        # side's pages; check both sides first (one new page per request opening a page). Every
        # decode step runs this on the host: numpy on the tensor's memory (~2 us) instead of
        # four torch CPU ops (~10 us each of dispatch).
        opening = int(np.count_nonzero((seq_lens_cpu.numpy() - 1) % self.page_size == 0))
        if not self.new_pages_available(opening, opening):
            return None
        return super().alloc_decode(seq_lens, seq_lens_cpu, last_loc)
