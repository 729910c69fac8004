import pytest
import torch

from sglang_dsv4.mem.allocator import IdAllocator


def test_alloc_until_full_returns_none_then_frees_restore():
    a = IdAllocator(10)
    first = a.alloc(4)
    second = a.alloc(6)
    assert a.available == 0 and a.alloc(1) is None
    ids = torch.cat([first, second])
    assert sorted(ids.tolist()) == list(range(1, 11))  # id 0 is reserved, never handed out
    a.free(first)
    assert a.available == 4
    again = a.alloc(4)
    assert sorted(again.tolist()) == sorted(first.tolist())
    a.free(again)
    a.free(second)
    assert a.available == 10


def test_double_free_and_foreign_ids_raise():
    a = IdAllocator(4)
    ids = a.alloc(2)
    a.free(ids)
    with pytest.raises(ValueError, match="double free"):
        a.free(ids)
    with pytest.raises(ValueError, match="out of range"):
        a.free(torch.tensor([0]))
    with pytest.raises(ValueError, match="double free"):
        a.free(torch.tensor([3, 3]))


def test_zero_size_and_empty_free():
    a = IdAllocator(0)
    assert a.alloc(0).numel() == 0 and a.alloc(1) is None
    a.free(torch.empty(0, dtype=torch.int64))
