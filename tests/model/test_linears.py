"""``model.linears``: FP8 / NVFP4 linears kept quantized and the per-name policy. On CPU the
kernels run under ``TRITON_INTERPRET=1`` (tests/conftest.py) in fp32 at small odd shapes,
against the dequantize-then-matmul twins; outputs are checked for NaN (fresh ``empty``)."""

import pytest
import torch
from torch import nn

from sglang_dsv4.config import DSV4Config
from sglang_dsv4.model.linears import FP8Linear, KeptFormats, NVFP4Linear
from sglang_dsv4.ref.weight_quant import (
    fp8_block_dequant,
    fp8_block_quant,
    nvfp4_dequant,
    nvfp4_quant,
)
from sglang_dsv4.weights.layout import Fmt, StoredWeight
from sglang_dsv4.weights.nvfp4 import nvfp4_scope

QUANT = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize(("n", "k"), [(200, 300), (64, 256)])
def test_fp8_linear_runs_the_released_bytes(n, k):
    w = torch.randn(n, k) * torch.logspace(-2, 1, n)[:, None]
    q, s = fp8_block_quant(w)
    lin = FP8Linear(k, n)
    lin.load(StoredWeight(Fmt.FP8, q, s))
    assert lin.weight.dtype == torch.float8_e4m3fn and lin.scale.dtype == torch.float8_e8m0fnu
    assert torch.equal(lin.weight.view(torch.uint8), q.view(torch.uint8))
    assert torch.equal(lin.scale.view(torch.uint8), s.view(torch.uint8))
    x = torch.randn(2, 3, k)  # leading dims kept
    y = lin(x)
    assert y.shape == (2, 3, n) and not y.isnan().any()
    assert rel(y, x @ fp8_block_dequant(q, s).T) <= 1e-5


def test_fp8_linear_scale_bytes_are_viewed_once():
    """FP8Linear hands the kernel a byte view of its e8m0 scale made once (not two torch ops
    per call), the same launch as on the e8m0 tensor bit for bit; a re-pointed scale (as
    ``ops.proj`` fuses parts) gets its own view."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from sglang_dsv4.kernels.fp8_linear import fp8_block_linear

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func.__name__)
            return func(*args, **(kwargs or {}))

    n, k = 128, 256
    lin = FP8Linear(k, n)
    lin.load(StoredWeight(Fmt.FP8, *fp8_block_quant(torch.randn(n, k))))
    x = torch.randn(3, k)
    want = fp8_block_linear(x, lin.weight, lin.scale)
    assert torch.equal(lin(x), want)
    with Ops() as ops:
        assert torch.equal(lin(x), want)
    assert "view.dtype" not in ops.names, ops.names  # (the interpreted launch adds its own ops)
    q2, s2 = fp8_block_quant(torch.randn(n, k))
    lin.weight, lin.scale = q2, s2  # re-pointed buffers
    assert torch.equal(lin(x), fp8_block_linear(x, q2, s2))


def test_nvfp4_linear_matches_dequantized():
    n, k = 96, 192
    packed, scale, gs = nvfp4_quant(torch.randn(n, k))
    lin = NVFP4Linear(k, n)
    lin.load(StoredWeight(Fmt.NVFP4, packed, scale, gs))
    x = torch.randn(5, k)
    y = lin(x)
    assert not y.isnan().any()
    assert rel(y, x @ nvfp4_dequant(packed, scale, gs).T) <= 1e-5


def test_load_rejects_other_formats_and_shapes():
    q, s = fp8_block_quant(torch.randn(64, 256))
    with pytest.raises(ValueError, match="stored as fp8, the module holds nvfp4"):
        NVFP4Linear(256, 64).load(StoredWeight(Fmt.FP8, q, s))
    with pytest.raises(ValueError, match=r"weight: expected \(64, 128\)"):
        FP8Linear(128, 64).load(StoredWeight(Fmt.FP8, q, s))
    with pytest.raises(ValueError, match="K % 64"):
        NVFP4Linear(96, 64)


def _cfg(tiny_dict, expert_dtype: str | None) -> DSV4Config:
    extra = {"quantization_config": QUANT, "expert_dtype": expert_dtype} if expert_dtype else {}
    return DSV4Config.from_dict(tiny_dict | extra)


P = "layers.2."  # a c4 layer: it has an indexer
FP8_NAMES = [
    P + "attn.wq_a.weight",
    P + "attn.wq_b.weight",
    P + "attn.wkv.weight",
    P + "attn.wo_b.weight",
    P + "attn.indexer.wq_b.weight",
    P + "ffn.shared_experts.w2.weight",
]
DENSE_NAMES = [
    P + "attn.wo_a.weight",
    P + "attn.compressor.wkv.weight",
    P + "attn.indexer.weights_proj.weight",
    P + "ffn.gate.weight",
    "head.weight",
]
ROUTED = P + "ffn.experts.3.w2.weight"


def test_released_fp4_checkpoint_on_gpu(tiny_dict):
    kept = KeptFormats(_cfg(tiny_dict, "fp4"), None, on_gpu=True)
    assert all(kept.kept(n) is Fmt.FP8 for n in FP8_NAMES)
    assert all(kept.kept(n) is None for n in DENSE_NAMES)
    assert kept.kept(ROUTED) is Fmt.MXFP4
    assert isinstance(kept.linear(P + "attn.wq_a", 256, 64), FP8Linear)
    assert isinstance(kept.linear(P + "attn.wo_a", 256, 64), nn.Linear)
    with pytest.raises(ValueError, match="routed-expert banks"):
        kept.linear(ROUTED.removesuffix(".weight"), 128, 256)


def test_fp8_experts_and_nvfp4_scopes(tiny_dict):
    kept = KeptFormats(_cfg(tiny_dict, "fp8"), None, on_gpu=True)
    assert kept.kept(ROUTED) is Fmt.FP8
    experts = KeptFormats(_cfg(tiny_dict, "fp4"), nvfp4_scope("experts"), on_gpu=True)
    assert experts.kept(ROUTED) is Fmt.NVFP4 and experts.kept(FP8_NAMES[0]) is Fmt.FP8
    linears = KeptFormats(_cfg(tiny_dict, "fp4"), nvfp4_scope("linears"), on_gpu=True)
    assert all(linears.kept(n) is Fmt.NVFP4 for n in [*FP8_NAMES, ROUTED])
    assert all(linears.kept(n) is None for n in DENSE_NAMES)
    # a dense checkpoint: nothing is FP8, the NVFP4 re-storing still holds
    dense = KeptFormats(_cfg(tiny_dict, None), nvfp4_scope("linears"), on_gpu=True)
    assert dense.kept(FP8_NAMES[0]) is Fmt.NVFP4
    assert KeptFormats(_cfg(tiny_dict, None), None, on_gpu=True).kept(FP8_NAMES[0]) is None


def test_nothing_is_kept_off_the_gpu(tiny_dict):
    kept = KeptFormats(_cfg(tiny_dict, "fp4"), nvfp4_scope("linears"), on_gpu=False)
    assert all(kept.kept(n) is None for n in [*FP8_NAMES, *DENSE_NAMES, ROUTED])
    assert type(kept.linear(P + "attn.wq_a", 256, 64)) is nn.Linear
