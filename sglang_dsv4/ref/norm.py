"""RMS normalization, weighted and unweighted (fp32 math, output in the input dtype)."""

import torch

__all__ = ["rms_norm"]


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor | None = None, eps: float = 1e-6
) -> torch.Tensor:
    """Normalize the last dim of ``x`` [..., n] by its RMS; scale by ``weight`` [n] if given.

    The weighted form multiplies after casting back to ``x.dtype`` (as HF and the official code
    do in fp32; they differ only in bf16 rounding).
    """
    xf = x.float()
    y = (xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)).to(x.dtype)
    return y if weight is None else weight * y
