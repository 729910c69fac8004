import torch

from sglang_dsv4.ref.quant import (
    E2M1_GRID,
    fp4_e2m1_fake_quant,
    fp8_e4m3_fake_quant,
    hadamard,
    kv_fake_quant,
    ue8m0_scale,
)


def test_ue8m0_scale_is_smallest_power_of_two():
    amax = torch.tensor([448.0, 449.0, 1.0, 0.0, 896.0, 3e-3])
    s = ue8m0_scale(amax, 448.0)
    assert torch.equal(torch.log2(s), torch.log2(s).round())
    assert torch.all(amax / s <= 448.0) and torch.all((amax / (s / 2) > 448.0) | (amax == 0))


def test_fp8_exact_on_representable_values():
    # e4m3 values times a power-of-2 block scale survive quantization exactly
    codes = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    codes = codes[codes.isfinite()]
    x = codes[torch.randint(0, codes.numel(), (4, 448))] * 2.0**-5
    x[:, ::64] = 448.0 * 2.0**-5  # every block holds its max so the scale is 2^-5
    assert torch.equal(fp8_e4m3_fake_quant(x, 64), x)


def test_fp8_error_bound_and_idempotent():
    x = torch.randn(16, 448) * torch.logspace(-3, 3, 16).unsqueeze(1)
    y = fp8_e4m3_fake_quant(x, 64)
    amax = x.abs().unflatten(-1, (7, 64)).amax(-1, keepdim=True)
    err = (y - x).abs().unflatten(-1, (7, 64))
    assert torch.all(err <= amax * 2.0**-3 + 1e-12)  # 3 mantissa bits, scale rounded up
    assert torch.equal(fp8_e4m3_fake_quant(y, 64), y)


def test_kv_fake_quant_keeps_rope_dims():
    kv = torch.randn(5, 512)
    y = kv_fake_quant(kv, 64)
    assert torch.equal(y[:, 448:], kv[:, 448:])
    assert not torch.equal(y[:, :448], kv[:, :448])


def test_fp4_grid_exact_and_ties_to_even():
    scale = 2.0**-2
    x = (E2M1_GRID[torch.randint(0, 8, (3, 32))] * torch.sign(torch.randn(3, 32))) * scale
    x[:, 0] = 6.0 * scale
    assert torch.equal(fp4_e2m1_fake_quant(x, 32), x)
    mid = torch.tensor(
        [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0] + [6.0] * 25
    )  # block max 6 -> scale 1
    want = torch.tensor([0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0] + [6.0] * 25)
    assert torch.equal(fp4_e2m1_fake_quant(mid, 32), want)


def test_hadamard_is_orthonormal_and_matches_matrix():
    n = 128
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    x = torch.randn(7, n)
    torch.testing.assert_close(hadamard(x), x @ h.T / n**0.5, atol=1e-5, rtol=0)
    torch.testing.assert_close(hadamard(hadamard(x)), x, atol=1e-5, rtol=0)
    y = torch.randn(7, n)
    torch.testing.assert_close(
        (hadamard(x) * hadamard(y)).sum(-1), (x * y).sum(-1), atol=1e-4, rtol=0
    )
