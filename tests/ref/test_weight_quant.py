import pytest
import torch

from sglang_dsv4.ref.quant import E2M1_GRID, fp4_e2m1_fake_quant
from sglang_dsv4.ref.weight_quant import (
    e2m1_decode,
    e2m1_encode,
    fp8_block_dequant,
    fp8_block_quant,
    mxfp4_dequant,
    mxfp4_quant,
    nvfp4_dequant,
    nvfp4_from_mxfp4,
    nvfp4_quant,
    pack_nibbles,
    unpack_nibbles,
)

E4M3 = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
E4M3 = E4M3[E4M3.isfinite()]  # every finite e4m3 value (incl. subnormals)


def random_codes(shape, g):
    return torch.randint(0, 16, shape, generator=g, dtype=torch.uint8)


def test_e2m1_codes_roundtrip_and_nibble_order():
    codes = torch.arange(16, dtype=torch.uint8)
    values = e2m1_decode(codes)
    assert torch.equal(values[:8], E2M1_GRID) and torch.equal(values[8:], -E2M1_GRID)
    # every value encodes back to its code (-0 becomes +0: code 8 is never produced)
    want = codes.clone()
    want[8] = 0
    assert torch.equal(e2m1_encode(values), want)
    packed = pack_nibbles(torch.tensor([[1, 2, 15, 0]], dtype=torch.uint8))
    assert packed.tolist() == [[0x21, 0x0F]]  # element 2j in the low nibble
    g = torch.Generator().manual_seed(0)
    c = random_codes((7, 64), g)
    assert torch.equal(unpack_nibbles(pack_nibbles(c).view(torch.int8)), c)


def test_e2m1_rounding_matches_the_kv_simulation():
    # the weight encoder and the indexer fake-quant agree on ties-to-even and saturation
    x = torch.cat([torch.linspace(-7, 7, 2801), (E2M1_GRID[1:] + E2M1_GRID[:-1]) / 2])
    x = x[: x.numel() // 32 * 32].view(-1, 32)
    x[:, 0] = 6.0  # scale 1 in every block
    assert torch.equal(e2m1_decode(e2m1_encode(x)), fp4_e2m1_fake_quant(x, 32))


@pytest.mark.parametrize("shape", [(256, 384), (64, 256), (300, 200), (1, 1)])
def test_fp8_block_exact_on_representable_values(shape):
    g = torch.Generator().manual_seed(1)
    n, k = shape
    rows, cols = -(-n // 128), -(-k // 128)
    exps = torch.randint(-20, 10, (rows, cols), generator=g).float()
    scale = torch.exp2(exps)
    values = E4M3[torch.randint(0, E4M3.numel(), shape, generator=g)]
    values[::128, ::128] = 448.0  # each tile's max sets its scale
    w = values * scale.repeat_interleave(128, 0).repeat_interleave(128, 1)[:n, :k]
    q, s = fp8_block_quant(w)
    assert q.dtype == torch.float8_e4m3fn and s.dtype == torch.float8_e8m0fnu
    assert q.shape == shape and s.shape == (rows, cols)
    assert torch.equal(s.float(), scale)
    assert torch.equal(fp8_block_dequant(q, s), w)


def test_fp8_block_error_bound_and_idempotent():
    w = torch.randn(300, 200) * torch.logspace(-4, 2, 300).unsqueeze(1)
    q, s = fp8_block_quant(w)
    d = fp8_block_dequant(q, s)
    amax = w.abs().amax()  # a loose bound per tile: relative 2^-4 of the tile's amax
    assert (d - w).abs().max() <= amax * 2.0**-4
    assert torch.equal(fp8_block_dequant(*fp8_block_quant(d)), d)
    with pytest.raises(ValueError, match="does not tile"):
        fp8_block_dequant(q, s[:1])


def test_mxfp4_exact_on_representable_values_and_layout():
    g = torch.Generator().manual_seed(2)
    n, k = 48, 128
    codes = random_codes((n, k), g)
    codes[:, ::32] = 7  # magnitude 6 in every group sets its scale
    scale = torch.exp2(torch.randint(-30, 5, (n, k // 32), generator=g).float())
    w = e2m1_decode(codes) * scale.repeat_interleave(32, 1)
    packed, s = mxfp4_quant(w)
    assert packed.dtype == torch.int8 and packed.shape == (n, k // 2)
    assert s.dtype == torch.float8_e8m0fnu and s.shape == (n, k // 32)
    assert torch.equal(s.float(), scale)
    want = codes.clone()
    want[want == 8] = 0  # -0 is stored as +0
    assert torch.equal(unpack_nibbles(packed), want)
    assert torch.equal(mxfp4_dequant(packed, s), w)


def test_mxfp4_error_bound_and_idempotent():
    w = torch.randn(16, 256)
    packed, s = mxfp4_quant(w)
    d = mxfp4_dequant(packed, s)
    group_amax = w.abs().unflatten(-1, (-1, 32)).amax(-1, keepdim=True)
    # grid spacing is at most 2 (between 4 and 6) in units of scale <= amax / 3
    assert torch.all((d - w).abs().unflatten(-1, (-1, 32)) <= group_amax / 3 + 1e-7)
    # dequantized values are representable: they survive a second round trip exactly
    # (the codes may differ: a group whose max rounded down to 3 gets half the scale)
    assert torch.equal(mxfp4_dequant(*mxfp4_quant(d)), d)
    with pytest.raises(ValueError, match="multiple of the group size 32"):
        mxfp4_quant(torch.zeros(2, 48))


def test_nvfp4_exact_on_representable_values():
    g = torch.Generator().manual_seed(3)
    n, k = 32, 96
    codes = random_codes((n, k), g)
    codes[:, ::16] = 7
    block = E4M3[E4M3 > 2.0**-6][torch.randint(0, 100, (n, k // 16), generator=g)]
    block[0, 0] = 448.0  # the largest block scale pins the default global scale
    gs = torch.tensor(2.0**-12)
    w = e2m1_decode(codes) * (block * gs).repeat_interleave(16, 1)
    packed, s, gs_found = nvfp4_quant(w)
    assert packed.dtype == torch.uint8 and packed.shape == (n, k // 2)
    assert s.dtype == torch.float8_e4m3fn and s.shape == (n, k // 16)
    assert gs_found.dtype == torch.float32 and gs_found.item() == gs.item()
    assert torch.equal(s.float(), block)
    assert torch.equal(nvfp4_dequant(packed, s, gs_found), w)


def test_nvfp4_error_is_bounded_and_zero_blocks_stay_zero():
    w = torch.randn(8, 64) * 3
    w[2, 16:32] = 0.0
    packed, s, gs = nvfp4_quant(w)
    d = nvfp4_dequant(packed, s, gs)
    assert torch.equal(d[2, 16:32], torch.zeros(16))
    block_amax = w.abs().unflatten(-1, (-1, 16)).amax(-1, keepdim=True)
    # e2m1 step (<= amax/3) plus the e4m3 rounding of the block scale (2^-4 relative)
    err = (d - w).abs().unflatten(-1, (-1, 16))
    assert torch.all(err <= block_amax * (1 / 3 + 2.0**-3))
    assert (d - w).abs().mean() < 0.1 * w.abs().mean()
    assert torch.equal(nvfp4_dequant(*nvfp4_quant(d, gs)), d)


def test_nvfp4_from_mxfp4_is_exact_and_keeps_the_codes():
    w = torch.randn(16, 128) * torch.logspace(-2, 2, 16).unsqueeze(1)  # 2^13 of dynamic range
    packed, s = mxfp4_quant(w)
    nv, block, gs = nvfp4_from_mxfp4(packed, s)
    assert torch.equal(nv, packed.view(torch.uint8)) and block.shape == (16, 8)
    assert torch.equal(nvfp4_dequant(nv, block, gs), mxfp4_dequant(packed, s))
    # a group 2^40 below the largest falls under e4m3's range: its values flush to zero
    w[0, :32] *= 2.0**-40
    packed, s = mxfp4_quant(w)
    nv, block, gs = nvfp4_from_mxfp4(packed, s)
    d = nvfp4_dequant(nv, block, gs)
    assert torch.equal(d[1:], mxfp4_dequant(packed, s)[1:])
    assert torch.equal(d[0, :32], torch.zeros(32))
