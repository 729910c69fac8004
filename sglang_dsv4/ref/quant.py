"""Quantization simulation of the official DSV4 forward (what the model was trained to see).

Off by default in every reference path. Matches the current official code:

* main KV (raw window and compressed entries): the ``nope`` channels (all but the last 64) are
  FP8 e4m3 quantized and dequantized per 64-channel block with a power-of-2 (UE8M0) scale
  ``2^ceil(log2(amax / 448))``; the RoPE channels stay as they are;
* indexer q and keys: a Walsh-Hadamard rotation (scaled by n^-1/2), then FP4 e2m1 per 32-element
  block with scale ``2^ceil(log2(amax / 6))`` (round to nearest, ties to even).
"""

import torch

__all__ = [
    "E2M1_GRID",
    "fp4_e2m1_fake_quant",
    "fp8_e4m3_fake_quant",
    "hadamard",
    "kv_fake_quant",
    "ue8m0_scale",
]

FP8_E4M3_MAX = 448.0
E2M1_MAX = 6.0
# Magnitudes of FP4 e2m1, indexed by the 3-bit code (mantissa = lowest bit).
E2M1_GRID = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def ue8m0_scale(amax: torch.Tensor, qmax: float) -> torch.Tensor:
    """Smallest power of 2 ``s`` with ``amax / s <= qmax`` (all-zero blocks get 2^-126)."""
    return torch.exp2(torch.ceil(torch.log2(amax.float().clamp(min=2.0**-126) / qmax)))


def _blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    if x.shape[-1] % block:
        raise ValueError(f"last dim {x.shape[-1]} is not a multiple of the block {block}")
    return x.float().unflatten(-1, (-1, block))


def fp8_e4m3_fake_quant(x: torch.Tensor, block: int = 64) -> torch.Tensor:
    """Quantize-dequantize ``x`` [..., n] to FP8 e4m3 per ``block`` channels (UE8M0 scales)."""
    xb = _blocks(x, block)
    scale = ue8m0_scale(xb.abs().amax(-1, keepdim=True), FP8_E4M3_MAX)
    q = (xb / scale).to(torch.float8_e4m3fn).float()
    return (q * scale).flatten(-2).to(x.dtype)


def kv_fake_quant(kv: torch.Tensor, rope_dim: int = 64, block: int = 64) -> torch.Tensor:
    """FP8-simulate the nope channels of ``kv`` [..., D]; the last ``rope_dim`` stay exact."""
    nope, rope = kv[..., :-rope_dim], kv[..., -rope_dim:]
    return torch.cat([fp8_e4m3_fake_quant(nope, block), rope], dim=-1)


def _round_e2m1(v: torch.Tensor) -> torch.Tensor:
    """Round magnitudes ``v`` >= 0 (already scaled into [0, 6]) to the e2m1 grid, ties to even."""
    grid = E2M1_GRID.to(v.device)
    dist = (v.unsqueeze(-1) - grid).abs()  # [..., 8]
    nearest = dist == dist.min(dim=-1, keepdim=True).values
    even = nearest & (torch.arange(8, device=v.device) % 2 == 0)
    code = torch.where(even.any(-1), even.int().argmax(-1), nearest.int().argmax(-1))
    return grid[code]


def fp4_e2m1_fake_quant(x: torch.Tensor, block: int = 32) -> torch.Tensor:
    """Quantize-dequantize ``x`` [..., n] to FP4 e2m1 per ``block`` elements (UE8M0 scales)."""
    xb = _blocks(x, block)
    scale = ue8m0_scale(xb.abs().amax(-1, keepdim=True), E2M1_MAX)
    mag = _round_e2m1((xb.abs() / scale).clamp(max=E2M1_MAX))
    return (torch.sign(xb) * mag * scale).flatten(-2).to(x.dtype)


def hadamard(x: torch.Tensor) -> torch.Tensor:
    """Sylvester Walsh-Hadamard transform of the last dim (a power of 2), scaled by n^-1/2."""
    n = x.shape[-1]
    if n & (n - 1):
        raise ValueError(f"Hadamard size {n} is not a power of 2")
    y = x.float().reshape(-1, n)
    h = 1
    while h < n:
        y = y.view(-1, n // (2 * h), 2, h)
        y = torch.stack((y[:, :, 0] + y[:, :, 1], y[:, :, 0] - y[:, :, 1]), dim=2).view(-1, n)
        h *= 2
    return (y * n**-0.5).view(x.shape).to(x.dtype)
