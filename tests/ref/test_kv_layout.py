import pytest
import torch

from sglang_dsv4.ref.kv_layout import fp8_row_bytes, pack_fp8_rows, unpack_fp8_rows
from sglang_dsv4.ref.quant import kv_fake_quant


@pytest.mark.parametrize("n", [1, 3, 129])
def test_round_trip_equals_reference_fp8_simulation(n):
    kv = torch.randn(n, 512) * torch.logspace(-4, 4, n).unsqueeze(1)
    rows = pack_fp8_rows(kv)
    assert rows.dtype == torch.uint8 and rows.shape == (n, 584) == (n, fp8_row_bytes())
    got = unpack_fp8_rows(rows)
    want = kv_fake_quant(kv)
    assert torch.equal(got[:, :448], want[:, :448])
    assert torch.equal(got[:, 448:], kv[:, 448:].bfloat16().float())
    assert (rows[:, 583] == 0).all()


def test_byte_positions():
    kv = torch.zeros(1, 512)
    kv[0, 0] = 448.0 * 4  # block 0 scale 2^2 -> code 448 (0x7E), exponent byte 129
    kv[0, 448] = 1.0  # first RoPE channel, bf16 0x3F80 little-endian
    rows = pack_fp8_rows(kv)
    assert rows[0, 0] == 0x7E and rows[0, 576] == 129
    assert rows[0, 448] == 0x80 and rows[0, 449] == 0x3F


def test_wrong_row_size_is_rejected():
    with pytest.raises(ValueError, match="expected 584"):
        unpack_fp8_rows(torch.zeros(2, 583, dtype=torch.uint8))
