import pytest
import torch

from sglang_dsv4.mem.allocator import DSV4PagedAllocator

PAGE = 128


def make(n_pages: int) -> DSV4PagedAllocator:
    return DSV4PagedAllocator(
        n_pages * PAGE, PAGE, torch.float32, "cpu", kvcache=None, need_sort=False
    )


def extend(a, prefix, seq, last):
    p, s = torch.tensor(prefix), torch.tensor(seq)
    return a.alloc_extend(p, p, s, s, torch.tensor(last), int((s - p).sum()))


def test_extend_fills_pages_and_continues_partial_page():
    a = make(8)
    out = extend(a, [0, 0], [130, 5], [-1, -1])
    assert out.shape == (135,) and a.available_size() == 5 * PAGE
    first, second = out[:130], out[130:]
    assert torch.equal(first[:128], first[0] + torch.arange(128)) and first[0] % PAGE == 0
    assert first[128] % PAGE == 0 and first[128] // PAGE != first[0] // PAGE
    assert (second // PAGE == second[0] // PAGE).all() and (out // PAGE != 0).all()
    # continue request 1 inside its partial page, then across a page boundary
    more = extend(a, [5], [200], [int(second[-1])])
    assert torch.equal(more[:123], second[-1] + 1 + torch.arange(123))
    assert more[123] % PAGE == 0


def test_decode_opens_page_at_boundary_only():
    a = make(4)
    out = extend(a, [0, 0], [127, 128], [-1, -1])
    last = torch.stack([out[126], out[-1]])
    dec = a.alloc_decode(torch.tensor([128, 129]), torch.tensor([128, 129]), last)
    assert dec[0] == out[126] + 1  # token 127 stays in the page
    assert dec[1] % PAGE == 0 and dec[1] // PAGE not in (out // PAGE).tolist()


def test_no_room_returns_none_and_free_restores():
    a = make(2)
    out = extend(a, [0], [256], [-1])
    assert a.available_size() == 0
    assert extend(a, [0], [1], [-1]) is None
    assert a.alloc_decode(torch.tensor([257]), torch.tensor([257]), out[-1:]) is None
    a.free(out)
    assert a.available_size() == 2 * PAGE


def test_swa_decode_checks_both_sides_before_allocating(tiny_cfg):
    """A decode step opening a page on a full side with room and an exhausted swa side gets
    None and takes no full page (upstream would leak it); a step opening no page proceeds."""
    from sglang_dsv4.mem.allocator import DSV4SWAAllocator
    from tests.pool_world import World

    pool = World(tiny_cfg).pool
    a = DSV4SWAAllocator(8 * PAGE, 2 * PAGE, PAGE, torch.int64, "cpu", pool, need_sort=False)
    prefix, seq = torch.tensor([0, 0]), torch.tensor([PAGE, 100])
    out = a.alloc_extend(prefix, prefix, seq, seq, torch.tensor([-1, -1]), PAGE + 100)
    assert out is not None and a.swa_available_size() == 0
    full_free = a.full_available_size()
    last = torch.stack([out[PAGE - 1], out[-1]])
    assert a.alloc_decode(seq + 1, seq + 1, last) is None  # request 0 opens a page
    assert a.full_available_size() == full_free
    step = a.alloc_decode(seq[1:] + 1, seq[1:] + 1, last[1:])  # inside request 1's page
    assert step is not None and int(step[0]) == int(out[-1]) + 1


@pytest.mark.parametrize("bs", [1, 5, 32, 33, 200])
def test_opening_pages_matches_sglang_count(bs):
    from sglang.srt.utils import get_num_new_pages

    from sglang_dsv4.mem.allocator import opening_pages

    gen = torch.Generator().manual_seed(bs)
    seq = torch.randint(1, 4 * PAGE, (bs,), generator=gen)
    seq[0] = PAGE + 1  # at least one request opens a page
    want = get_num_new_pages(seq_lens=seq, page_size=PAGE, decode=True)
    assert opening_pages(seq, PAGE) == want >= 1


@pytest.fixture
def kernel_path(monkeypatch):
    """The allocators' GPU path on CPU: SGLang's decode kernel interpreted, bound where both
    upstream's paged allocator and ours call it, and our CPU torch path switched off."""
    import sglang.kernels.ops.memory.allocator as kernels
    import sglang.srt.mem_cache.allocator.paged as paged
    from triton_cpu import interpreted

    import sglang_dsv4.mem.allocator as ours

    with interpreted(kernels) as (k,):
        monkeypatch.setattr(paged, "alloc_decode_kernel", k.alloc_decode_kernel)
        monkeypatch.setattr(ours, "alloc_decode_kernel", k.alloc_decode_kernel)
        monkeypatch.setattr(ours.DSV4PagedAllocator, "_torch_path", property(lambda s: False))
        yield


def _decode_case(a):
    """Three requests: one at a page boundary, two inside their pages."""
    out = extend(a, [0, 0, 0], [PAGE, 100, 2 * PAGE + 7], [-1, -1, -1])
    ends = torch.tensor([PAGE, 100, 2 * PAGE + 7]).cumsum(0) - 1
    return torch.tensor([PAGE + 1, 101, 2 * PAGE + 8]), out[ends]


def test_kernel_path_decode_equals_upstream(kernel_path):
    from sglang.srt.mem_cache.allocator.paged import PagedTokenToKVPoolAllocator

    mine, ref = make(8), make(8)
    seq, last = _decode_case(mine)
    assert torch.equal(_decode_case(ref)[1], last)
    got = mine.alloc_decode(seq, seq, last)
    want = PagedTokenToKVPoolAllocator.alloc_decode(ref, seq, seq, last)
    assert torch.equal(got, want) and int(got[0]) % PAGE == 0
    assert torch.equal(got[1:], last[1:] + 1)
    assert torch.equal(mine.free_pages, ref.free_pages)


def test_kernel_path_swa_decode_equals_upstream(kernel_path, tiny_cfg):
    """Our hybrid decode step (one new-page count for both sides) leaves the same slots, swa
    slots, full -> swa map and free lists as SGLang's."""
    from sglang.srt.mem_cache.allocator.swa import SWATokenToKVPoolAllocator

    from sglang_dsv4.mem.allocator import DSV4SWAAllocator
    from tests.pool_world import World

    pool = World(tiny_cfg).pool
    sides = [
        DSV4SWAAllocator(8 * PAGE, 6 * PAGE, PAGE, torch.int64, "cpu", pool, need_sort=False)
        for _ in range(2)
    ]
    lens = torch.tensor([PAGE, 100, 2 * PAGE + 7])
    zero = torch.zeros(3, dtype=torch.int64)
    outs = [a.alloc_extend(zero, zero, lens, lens, zero - 1, int(lens.sum())) for a in sides]
    assert torch.equal(outs[0], outs[1])
    seq, last = lens + 1, outs[0][lens.cumsum(0) - 1]
    got = sides[0].alloc_decode(seq, seq, last)
    want = SWATokenToKVPoolAllocator.alloc_decode(sides[1], seq, seq, last)
    assert torch.equal(got, want)
    mine, ref = sides
    assert torch.equal(mine.full_to_swa_index_mapping, ref.full_to_swa_index_mapping)
    for side in ("full_attn_allocator", "swa_attn_allocator"):
        assert torch.equal(getattr(mine, side).free_pages, getattr(ref, side).free_pages)
    assert int(mine.full_to_swa_index_mapping[got[0]]) % PAGE == 0


def test_fused_decode_equals_per_side(kernel_path, monkeypatch, tiny_cfg):
    """The GPU's one-launch decode step (``kernels.alloc_decode``, interpreted) against the
    two sides' kernels + translation + map write, over 140 steps of four requests (each opens
    pages at its own steps): the same slots, full -> swa map and free lists every step; then a
    step that needs more pages than one side has gets None and changes nothing."""
    from triton_cpu import interpreted

    import sglang_dsv4.kernels.alloc_decode as fused
    import sglang_dsv4.mem.allocator as ours
    from tests.pool_world import World

    with interpreted(fused) as (k,):
        monkeypatch.setattr(ours, "alloc_decode_pair", k.alloc_decode_pair)
        pools = [World(tiny_cfg).pool for _ in range(2)]
        a, b = (
            ours.DSV4SWAAllocator(16 * PAGE, 12 * PAGE, PAGE, torch.int64, "cpu", p, False)
            for p in pools
        )
        a._decode = a._decode_fused
        lens = torch.tensor([1, 60, PAGE - 1, PAGE + 5])
        zero = torch.zeros(4, dtype=torch.int64)
        outs = [x.alloc_extend(zero, zero, lens, lens, zero - 1, int(lens.sum())) for x in (a, b)]
        assert torch.equal(outs[0], outs[1])
        last = outs[0][lens.cumsum(0) - 1]
        opened = 0
        for _ in range(140):
            lens = lens + 1
            got, want = a.alloc_decode(lens, lens, last), b.alloc_decode(lens, lens, last)
            assert torch.equal(got, want)
            assert torch.equal(a.full_to_swa_index_mapping, b.full_to_swa_index_mapping)
            for side in ("full_attn_allocator", "swa_attn_allocator"):
                assert torch.equal(getattr(a, side).free_pages, getattr(b, side).free_pages)
            opened += int(((lens - 1) % PAGE == 0).sum())
            last = got
        assert opened >= 4
        free = a.swa_attn_allocator.free_pages.clone()
        a.swa_attn_allocator.free_pages = free[:0]  # no swa page left
        lens = torch.tensor([PAGE + 1])  # opens a page
        assert a._decode_fused(lens, lens, last[:1], 1) is None
        assert a.full_attn_allocator.free_pages.numel() == b.full_attn_allocator.free_pages.numel()


@pytest.mark.gpu
@pytest.mark.parametrize("bs", [1, 33, 128])
def test_gpu_fused_decode_equals_per_side(tiny_cfg, bs):
    """On the GPU (the fused path is the default there) against the per-side kernels, 300
    steps of ``bs`` requests at random starting lengths."""
    import sglang_dsv4.mem.allocator as ours
    from tests.pool_world import World

    n = bs * 8 * PAGE
    a, b = (ours.DSV4SWAAllocator(n, n, PAGE, torch.int64, "cuda", World(tiny_cfg, "cuda").pool,
                                  False) for _ in range(2))  # fmt: skip
    assert a._decode == a._decode_fused
    b._decode = b._decode_per_side
    gen = torch.Generator().manual_seed(bs)
    lens = torch.randint(1, 3 * PAGE, (bs,), generator=gen).cuda()
    zero = torch.zeros(bs, dtype=torch.int64, device="cuda")
    total = int(lens.sum())
    outs = [x.alloc_extend(zero, zero.cpu(), lens, lens.cpu(), zero - 1, total) for x in (a, b)]
    assert torch.equal(outs[0], outs[1])
    last = outs[0][lens.cumsum(0) - 1]
    for _ in range(300):
        lens = lens + 1
        got = a.alloc_decode(lens, lens.cpu(), last)
        want = b.alloc_decode(lens, lens.cpu(), last)
        assert torch.equal(got, want)
        last = got
    assert torch.equal(a.full_to_swa_index_mapping, b.full_to_swa_index_mapping)
    for side in ("full_attn_allocator", "swa_attn_allocator"):
        assert torch.equal(getattr(a, side).free_pages, getattr(b, side).free_pages)
