"""``kernels.slot_sum`` against torch's sum of the [T, S, d] view (the op it replaces): the same
bits, compared as int16 patterns (signed zeros too), outputs NaN-poisoned.

CPU: interpreted, bf16 / fp16 / fp32, odd shapes. For S <= 4 the oracle is torch's CPU sum (in
order, as torch's CUDA reduce for S <= 4); for S > 4 the order of torch's CUDA reduce
(:func:`cuda_order`, four accumulators), which then differs from in-order sums on wide-exponent
data (asserted, so the S = 7 case can fail). GPU: the served shapes (d 4096, S 3 and 7, T up to
8192) against ``torch.sum`` on CUDA, on wide-exponent data.
"""

import pytest
import torch

from sglang_dsv4.kernels import slot_sum as K

GPU = torch.cuda.is_available()


def wide(t: int, s: int, d: int, dtype, device="cpu", seed=0) -> torch.Tensor:
    """y [T * S, d]: normal values scaled by 2^-30 ... 2^30 (fp32 sums of them round, so the add
    order shows) and a few signed zeros."""
    g = torch.Generator(device=device).manual_seed(seed)
    y = torch.randn(t * s, d, generator=g, device=device)
    span = 12 if dtype == torch.float16 else 30
    y = y * torch.exp2(torch.randint(-span, span, (t * s, d), generator=g, device=device).float())
    y[::5, ::7] = -0.0
    return y.to(dtype)


def cuda_order(y: torch.Tensor, t: int) -> torch.Tensor:
    """torch's CUDA reduce of [T, S, d] over S, in fp32: input j into accumulator j % 4 (each
    from 0), then ((a0 + a1) + a2) + a3 (module docstring of ``kernels.slot_sum``)."""
    f = y.float().view(t, -1, y.shape[1])
    acc = [torch.zeros_like(f[:, 0]) for _ in range(4)]
    for j in range(f.shape[1]):
        acc[j % 4] = acc[j % 4] + f[:, j]
    return ((acc[0] + acc[1]) + acc[2]) + acc[3]


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def run(y: torch.Tensor, t: int) -> torch.Tensor:
    out = torch.full((t, y.shape[1]), float("nan"), dtype=y.dtype, device=y.device)
    return K.slot_sum(y, out)


DTYPES = [torch.bfloat16, torch.float16, torch.float32]


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize(("t", "s", "d"), [(1, 3, 64), (7, 3, 1100), (5, 1, 33), (3, 4, 2049)])
def test_slot_sum_equals_torch_interpreted(t, s, d, dtype):
    y = wide(t, s, d, dtype, seed=t * s)
    want = K.slot_sum_torch(y, torch.empty(t, d, dtype=dtype))
    assert same_bits(run(y, t), want)
    assert same_bits(want, cuda_order(y, t).to(dtype))  # S <= 4: CPU order = CUDA order


@pytest.mark.parametrize(("t", "s", "d"), [(300, 3, 4096), (9, 7, 4096), (64, 9, 130)])
def test_slot_sum_has_torch_cuda_order_interpreted(t, s, d):
    y = wide(t, s, d, torch.bfloat16, seed=s)
    got, want = run(y, t), cuda_order(y, t).bfloat16()
    assert same_bits(got, want)
    if s > 4:  # the order is seen: an in-order sum rounds differently somewhere
        assert not torch.equal(want, y.view(t, s, d).sum(dim=1))


def test_slot_sum_real_shape_one_token_and_bad_shapes():
    y = wide(1, 3, 4096, torch.bfloat16)
    assert same_bits(run(y, 1), y.view(1, 3, 4096).sum(dim=1))
    empty = torch.empty(0, 8, dtype=torch.bfloat16)
    assert K.slot_sum(empty, empty.clone()).shape == (0, 8)
    with pytest.raises(ValueError, match="T \\* S"):
        K.slot_sum(torch.zeros(7, 8), torch.zeros(3, 8))
    with pytest.raises(ValueError, match="contiguous"):
        K.slot_sum(torch.zeros(6, 16)[:, :8], torch.zeros(3, 8))


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize(("t", "s", "d"), [(1, 2, 64), (7, 3, 1100), (5, 1, 33)])
def test_slot_sum_add_is_the_two_sums_added_interpreted(t, s, d, dtype):
    """``add`` rows (a shared expert's output): the bits of the slot sum + add in torch (and
    of the slot sum + add's one-slot sum, the launches it replaces), signed zeros included:
    ``add`` holds -0 where every slot is -0 too."""
    y, add = wide(t, s, d, dtype, seed=t), wide(t, 1, d, dtype, seed=t + 1)
    y.view(t, s, d)[:, :, ::7] = -0.0  # a -0 sum where add is -0 too (add[::5, ::7])
    got = torch.full((t, d), float("nan"), dtype=dtype)
    K.slot_sum(y, got, add)
    before = run(y, t) + run(add, t)
    assert same_bits(got, before) and same_bits(got, run(y, t) + add)
    assert same_bits(K.slot_sum_torch(y, torch.empty(t, d, dtype=dtype), add), before)
    with pytest.raises(ValueError, match="add"):
        K.slot_sum(y, got, add.float() if dtype != torch.float32 else add.double())


@pytest.mark.gpu
@pytest.mark.parametrize("t", [1, 32, 8192])
def test_gpu_slot_sum_add_is_the_two_sums_added(t):
    y, add = wide(t, 2, 4096, torch.bfloat16, "cuda", t), wide(t, 1, 4096, torch.bfloat16, "cuda")
    got = K.slot_sum(y, torch.full_like(add, float("nan")), add)
    want = K.slot_sum_torch(y, torch.empty_like(add)) + K.slot_sum_torch(add, torch.empty_like(add))
    assert same_bits(got, want)


@pytest.mark.gpu
@pytest.mark.parametrize("s", [3, 7])
@pytest.mark.parametrize("t", [1, 7, 300, 8192])
def test_gpu_slot_sum_equals_torch_cuda(t, s):
    y = wide(t, s, 4096, torch.bfloat16, device="cuda", seed=t)
    want = K.slot_sum_torch(y, torch.empty(t, 4096, dtype=y.dtype, device="cuda"))
    assert same_bits(run(y, t), want)
    assert same_bits(want, cuda_order(y, t).bfloat16())  # the order the module docstring names
