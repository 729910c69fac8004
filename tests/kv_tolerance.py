"""Tolerance units shared by the KV kernel tests."""

import torch

__all__ = ["fp8_error"]


def fp8_error(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a - b| [N, n] in units of one e4m3 step at ``b``: 2^-3 |b|, at least the subnormal step
    of the value's 64-channel block (taken as 2^-12 of the block's largest |b|)."""
    amax = b.unflatten(-1, (-1, 64)).abs().amax(-1, keepdim=True).expand(-1, -1, 64).flatten(1)
    return (a - b).abs() / (2.0**-3 * b.abs() + 2.0**-12 * amax + 1e-30)
