"""``kernels.moe_bank``: the kernel operand of a bank (codes and scales as bytes) views the same
storage, and the kernels' ``operands`` of it dispatch no torch op (a bank held by the model makes
it once); dense banks keep their dtype and no scales."""

import torch

from sglang_dsv4.kernels.moe_bank import ExpertWeights, Proj
from sglang_dsv4.perf.op_count import count_ops


def test_kernel_operand_views_bytes_once():
    w13 = torch.zeros(3, 256, 128, dtype=torch.float8_e4m3fn)
    s13 = torch.zeros(3, 2, 1, dtype=torch.float8_e8m0fnu)
    fp8 = ExpertWeights.stacked(w13, torch.zeros(3, 128, 128).to(w13.dtype), s13,
                                torch.zeros(3, 1, 1, dtype=s13.dtype))  # fmt: skip
    op = fp8.kernel_operand()
    assert op.fmt == "fp8" and op.w1.scale.dtype == torch.uint8 and op.w1.w.dtype == w13.dtype
    assert op.w3.scale.data_ptr() == s13[:, 1:].data_ptr() and op.check(128) == (3, 128)
    counts, got = count_ops(lambda: [op.operands(p) for p in op[:3]])
    assert counts.torch_ops == 0
    assert [tuple(t.data_ptr() for t in g) for g in got] == [
        tuple(t.data_ptr() for t in fp8.operands(p)) for p in fp8[:3]
    ]
    dense = ExpertWeights.stacked(torch.zeros(2, 64, 32), torch.zeros(2, 32, 32))
    assert dense.kernel_operand().w2 == Proj(dense.w2.w)
    codes = torch.zeros(2, 32, 16, dtype=torch.uint8)
    fp4 = ExpertWeights(*(Proj(codes, codes[..., :1], torch.ones(2)) for _ in range(3)), "nvfp4")
    assert count_ops(lambda: fp4.operands(fp4.w1))[0].torch_ops == 0
