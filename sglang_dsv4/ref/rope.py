"""Interleaved partial RoPE on the last ``rope_dim`` channels, with optional YaRN.

Pairs ``(x[2i], x[2i+1])`` of the trailing slice rotate as complex numbers by ``t * inv_freq[i]``.
SWA-only layers use ``rope_theta`` without YaRN; c4/c128 layers use ``compress_rope_theta`` with
YaRN frequencies and no attention mscale (their q, kv, entries and indexer q/k alike).
The inverse rotation (``inverse=True``) at the query position turns the RoPE part of an
attention output back into a relative quantity.
"""

import math

import torch

from sglang_dsv4.config import RopeSpec

__all__ = ["apply_rope", "rope_cos_sin", "rope_inv_freq"]


def rope_inv_freq(spec: RopeSpec, rope_dim: int) -> torch.Tensor:
    """Inverse frequencies [rope_dim // 2], fp32."""
    pos_freqs = spec.theta ** (torch.arange(0, rope_dim, 2, dtype=torch.float32) / rope_dim)
    inv_freq = 1.0 / pos_freqs
    yarn = spec.yarn
    if yarn is None:
        return inv_freq

    def correction_dim(rotations: float) -> float:
        return (
            rope_dim * math.log(yarn.original_max_position_embeddings / (rotations * 2 * math.pi))
        ) / (2 * math.log(spec.theta))

    low = max(math.floor(correction_dim(yarn.beta_fast)), 0)
    high = min(math.ceil(correction_dim(yarn.beta_slow)), rope_dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(rope_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1: high-frequency dims keep their frequency, 0: fully interpolated
    return 1.0 / (yarn.factor * pos_freqs) * (1 - keep) + inv_freq * keep


def rope_cos_sin(
    positions: torch.Tensor, inv_freq: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [T, rope_dim // 2] (fp32) for integer ``positions`` [T]."""
    freqs = positions.float()[:, None] * inv_freq.to(positions.device)[None, :]
    return freqs.cos(), freqs.sin()


def apply_rope(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False
) -> torch.Tensor:
    """Rotate the trailing ``2 * cos.shape[-1]`` channels of ``x`` [T, ..., D].

    ``cos``/``sin`` [T, rope_dim // 2] broadcast over the middle dims of ``x`` (heads).
    """
    half = cos.shape[-1]
    shape = (cos.shape[0],) + (1,) * (x.dim() - 2) + (half,)
    cos, sin = cos.reshape(shape), sin.reshape(shape)
    if inverse:
        sin = -sin
    nope, rope = x[..., : -2 * half], x[..., -2 * half :].float()
    re, im = rope[..., 0::2], rope[..., 1::2]
    rotated = torch.stack((re * cos - im * sin, re * sin + im * cos), dim=-1).flatten(-2)
    return torch.cat([nope, rotated.to(x.dtype)], dim=-1)
