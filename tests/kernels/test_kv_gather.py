"""``kernels.kv_gather``: FlashMLA's extend workspace (entry rows, then raw rows) in one launch.

* bit-equal to SGLang's ``dequantize_k_cache_paged`` (the call it replaces, once per pool) on
  random page bytes (every e4m3 code incl. NaN, every scale byte), int32 / int64 row ids,
  repeats, pages of 1 to 256 rows, no entries (SWA), one row;
* bit-equal to the twin (``gather_rows_torch``: the pools' reader) on rows the pools' writer
  stored (``FP8RowLayout.write`` of ``pack_fp8_rows``), at odd head dims (1, 3, 7 scale tiles);
* plain bf16 pools copied exactly.

Outputs are NaN-poisoned first (a row not written fails). CPU: the Triton interpreter (SGLang's
kernel interpreted too); GPU: the compiled kernels at Flash dims (512 = 448 e4m3 + 64 RoPE,
584-byte rows, raw pages of 256 rows, c4 entry pages of 64, c128 of 2), plus the timing of
``scripts/gpu_xgather.sh``.
"""

import pytest
import torch

from sglang_dsv4.kernels.kv_gather import gather_fp8_rows, gather_plain_rows, gather_rows_torch
from sglang_dsv4.kernels.kv_store import FP8RowLayout
from sglang_dsv4.ref.kv_layout import pack_fp8_rows

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # sglang's CPU-import warnings


def _sglang(ent, ent_rows, ent_page, raw, raw_rows, raw_page, out):
    """The replaced path: SGLang's dequant into the workspace, entries then raw rows."""
    from sglang.kernels.ops.attention.dsv4.dequant_k_cache import dequantize_k_cache_paged

    n = ent_rows.numel()
    if n:
        dequantize_k_cache_paged(ent, ent_rows, page_size=ent_page, out=out[:n])
    if raw_rows.numel():
        dequantize_k_cache_paged(raw, raw_rows, page_size=raw_page, out=out[n:])
    return out


def _random_pools(n_ent, n_raw, ent_page, raw_page, device, gen, dtype=torch.long, pages=3):
    """Random page bytes and row ids (repeats included) of both pools, ``pages`` pages each."""
    caches, rows = [], []
    for n, page in ((n_ent, ent_page), (n_raw, raw_page)):
        layout = FP8RowLayout.paged(page)
        caches.append(torch.randint(0, 256, (pages, layout.page_bytes), dtype=torch.uint8,
                                    generator=gen).to(device))  # fmt: skip
        rows.append(torch.randint(0, pages * page, (n,), generator=gen).to(device, dtype))
    return caches[0], rows[0], caches[1], rows[1]


def _poisoned(n, d, device):
    return torch.full((n, 1, d), float("nan"), dtype=torch.bfloat16, device=device)


def _bits(x):
    return x.view(torch.int16)


CASES = [  # (entries, raw rows, entry page rows, raw page rows)
    (7, 9, 32, 128),  # c4 entries (pages of 128 / 4)
    (5, 11, 1, 128),  # c128 entries (one per page)
    (0, 6, 1, 64),  # SWA: no entries
    (1, 1, 2, 256),  # one row each, Flash pages
    (13, 0, 64, 256),  # entries only
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_equals_sglang_on_random_bytes(case, dtype):
    n_ent, n_raw, ent_page, raw_page = case
    gen = torch.Generator().manual_seed(n_ent * 31 + n_raw)
    ent, er, raw, rr = _random_pools(n_ent, n_raw, ent_page, raw_page, "cpu", gen, dtype)
    out = _poisoned(n_ent + n_raw, 512, "cpu")
    got = gather_fp8_rows(ent_cache=ent, ent_rows=er, ent_page=ent_page, raw_cache=raw,
                          raw_rows=rr, raw_page=raw_page, out=out)  # fmt: skip
    want = _sglang(ent, er, ent_page, raw, rr, raw_page, torch.empty_like(got))
    assert torch.equal(_bits(got), _bits(want))


def _stored_pools(n_ent, n_raw, ent_page, raw_page, d, device, gen):
    """Pools whose rows were written by the pools' writer (a scale per 64-channel block over
    a wide range); the pages' unwritten rows hold poison bytes (0xFF: e4m3 NaN)."""
    caches, rows = [], []
    for n, page in ((n_ent, ent_page), (n_raw, raw_page)):
        layout = FP8RowLayout.paged(page, d)
        n_rows = 3 * page
        cache = layout.empty(n_rows, device).fill_(0xFF)
        written = torch.randperm(n_rows, generator=gen)[: max(n, 1)].to(device)
        x = torch.randn(written.numel(), d, generator=gen)
        x *= torch.exp2(torch.randint(-20, 20, (written.numel(), d // 64), generator=gen).float()
                        ).repeat_interleave(64, 1)  # fmt: skip
        layout.write(cache, written, pack_fp8_rows(x).to(device))
        caches.append(cache)
        rows.append(written[torch.randint(0, written.numel(), (n,), generator=gen).to(device)])
    return caches[0], rows[0], caches[1], rows[1]


@pytest.mark.parametrize("d", [128, 256, 512])  # 1, 3, 7 nope tiles (padded to 1, 4, 8)
def test_equals_twin_on_stored_rows(d):
    gen = torch.Generator().manual_seed(d)
    ent, er, raw, rr = _stored_pools(6, 10, 32, 128, d, "cpu", gen)
    got = gather_fp8_rows(ent_cache=ent, ent_rows=er, ent_page=32, raw_cache=raw, raw_rows=rr,
                          raw_page=128, out=_poisoned(16, d, "cpu"))  # fmt: skip
    want = gather_rows_torch(ent_cache=ent, ent_rows=er, raw_cache=raw, raw_rows=rr,
                             out=_poisoned(16, d, "cpu"), pages=(32, 128))  # fmt: skip
    assert not got.isnan().any()
    assert torch.equal(_bits(got), _bits(want))


@pytest.mark.parametrize("n_ent", [0, 5])
def test_plain_rows_copied(n_ent):
    gen = torch.Generator().manual_seed(n_ent)
    ent = torch.randn(4, 8, 128, generator=gen).bfloat16()  # [pages, B/r, D]
    raw = torch.randn(40, 128, generator=gen).bfloat16()  # [N, D]
    er = torch.randint(0, 32, (n_ent,), generator=gen)
    rr = torch.randint(0, 40, (7,), generator=gen).int()
    got = gather_plain_rows(ent_cache=ent, ent_rows=er, raw_cache=raw, raw_rows=rr,
                            out=_poisoned(n_ent + 7, 128, "cpu"))  # fmt: skip
    want = torch.cat([ent.view(-1, 128)[er], raw[rr.long()]])
    assert torch.equal(_bits(got[:, 0]), _bits(want))
    twin = gather_rows_torch(ent_cache=ent, ent_rows=er, raw_cache=raw, raw_rows=rr,
                             out=_poisoned(n_ent + 7, 128, "cpu"))  # fmt: skip
    assert torch.equal(_bits(twin), _bits(got))


def test_checks():
    gen = torch.Generator().manual_seed(0)
    ent, er, raw, rr = _random_pools(2, 3, 32, 128, "cpu", gen)
    args = dict(ent_cache=ent, ent_rows=er, ent_page=32, raw_cache=raw, raw_rows=rr)
    with pytest.raises(ValueError, match="pages of"):  # the raw pool is not of 64-row pages
        gather_fp8_rows(**args, raw_page=64, out=_poisoned(5, 512, "cpu"))
    with pytest.raises(ValueError, match="rows for"):
        gather_fp8_rows(**args, raw_page=128, out=_poisoned(4, 512, "cpu"))
    with pytest.raises(ValueError, match="no entry pool"):
        gather_fp8_rows(**dict(args, ent_cache=None), raw_page=128, out=_poisoned(5, 512, "cpu"))


# ------------------------------------------------------------------ GPU, Flash dims


@pytest.mark.gpu
@pytest.mark.parametrize("ent_page", [64, 2])  # c4 / c128 entry pages of a 256-row block
def test_gpu_flash_dims_equal_sglang(ent_page):
    """An 8192-token step: 8192 / 4 (c4) or / 128 entries and 8192 raw rows of 584-byte FP8
    rows in 256-row pages, random bytes, bit-equal to SGLang's kernel (compiled, both)."""
    gen = torch.Generator().manual_seed(ent_page)
    n_ent = 8192 // (256 // ent_page)
    ent, er, raw, rr = _random_pools(n_ent, 8192, ent_page, 256, "cuda", gen, torch.int32, 48)
    out = _poisoned(n_ent + 8192, 512, "cuda")
    got = gather_fp8_rows(ent_cache=ent, ent_rows=er, ent_page=ent_page, raw_cache=raw,
                          raw_rows=rr, raw_page=256, out=out)  # fmt: skip
    want = _sglang(ent, er, ent_page, raw, rr, 256, _poisoned(n_ent + 8192, 512, "cuda"))
    assert torch.equal(_bits(got), _bits(want))


@pytest.mark.gpu
def test_gpu_flash_dims_equal_twin():
    gen = torch.Generator().manual_seed(1)
    ent, er, raw, rr = _stored_pools(2048, 8192, 64, 256, 512, "cuda", gen)
    got = gather_fp8_rows(ent_cache=ent, ent_rows=er, ent_page=64, raw_cache=raw, raw_rows=rr,
                          raw_page=256, out=_poisoned(10240, 512, "cuda"))  # fmt: skip
    want = gather_rows_torch(ent_cache=ent, ent_rows=er, raw_cache=raw, raw_rows=rr,
                             out=_poisoned(10240, 512, "cuda"), pages=(64, 256))  # fmt: skip
    assert not got.isnan().any()
    assert torch.equal(_bits(got), _bits(want))


@pytest.mark.gpu
def test_gpu_plain_rows():
    gen = torch.Generator().manual_seed(2)
    ent = torch.randn(64, 64, 512, generator=gen).bfloat16().cuda()
    raw = torch.randn(16384, 512, generator=gen).bfloat16().cuda()
    er = torch.randint(0, 4096, (2048,), generator=gen).cuda()
    rr = torch.randint(0, 16384, (8192,), generator=gen).cuda()
    got = gather_plain_rows(ent_cache=ent, ent_rows=er, raw_cache=raw, raw_rows=rr,
                            out=_poisoned(10240, 512, "cuda"))  # fmt: skip
    assert torch.equal(_bits(got[:, 0]), _bits(torch.cat([ent.view(-1, 512)[er], raw[rr]])))
