"""Norm and RoPE ops of the attention block (``Ops.norm``).

* ``rms(x, w)``: weighted RMSNorm of rows (``q_norm`` after ``wq_a``);
* ``rms_rope(x, w, positions, inv_freq)``: RMSNorm over each head (``w`` None: unweighted) then
  RoPE of the last ``rope_dim`` channels -- the query after ``wq_b``, the raw KV (``kv_norm``);
* ``rope(x, positions, inv_freq, inverse, hadamard)``: RoPE alone -- the indexer query (with
  ``hadamard``: then the Walsh-Hadamard rotation of each head, for keys stored rotated), and the
  inverse rotation of the attention output before ``wo_a``.

``x`` of ``rms_rope`` / ``rope`` is consumed: :class:`NormTriton` rotates it in place (only the
RoPE channels are touched by ``rope``), :class:`NormTorch` (the twin: ``ref.norm`` /
``ref.rope``, the CPU path) returns a new tensor. Use the returned tensor.
"""

import torch

from sglang_dsv4.config import DSV4Config
from sglang_dsv4.kernels import norm_rope as norm_kernels
from sglang_dsv4.ref.norm import rms_norm
from sglang_dsv4.ref.quant import hadamard as ref_hadamard
from sglang_dsv4.ref.rope import apply_rope, rope_cos_sin

__all__ = ["NormTorch", "NormTriton", "norm_ops"]


class NormTorch:
    def __init__(self, cfg: DSV4Config):
        self.eps = cfg.norm_eps

    def rms(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """``x`` [..., n], ``w`` [n] -> [..., n]."""
        return rms_norm(x, w, self.eps)

    def rms_rope(
        self,
        x: torch.Tensor,
        w: torch.Tensor | None,
        positions: torch.Tensor,
        inv_freq: torch.Tensor,
    ) -> torch.Tensor:
        """``x`` [T, H, D] or [T, D], ``positions`` [T] -> normed and rotated, same shape."""
        cos, sin = rope_cos_sin(positions, inv_freq)
        return apply_rope(rms_norm(x, w, self.eps), cos, sin)

    def rope(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        inv_freq: torch.Tensor,
        inverse: bool = False,
        hadamard: bool = False,
    ) -> torch.Tensor:
        cos, sin = rope_cos_sin(positions, inv_freq)
        x = apply_rope(x, cos, sin, inverse=inverse)
        return ref_hadamard(x) if hadamard else x


class NormTriton(NormTorch):
    """One launch per op (:mod:`sglang_dsv4.kernels.norm_rope`)."""

    def rms(self, x, w):
        if x.dim() == 2:  # the model's rows (q_norm): no reshape / view ops around the launch
            return norm_kernels.rms_norm(x, w, self.eps)
        return norm_kernels.rms_norm(x.reshape(-1, x.shape[-1]), w, self.eps).view(x.shape)

    def rms_rope(self, x, w, positions, inv_freq):
        return norm_kernels.rms_rope_(x, positions, inv_freq, norm=True, weight=w, eps=self.eps)

    def rope(self, x, positions, inv_freq, inverse=False, hadamard=False):
        if hadamard:
            return norm_kernels.rope_hadamard_(x, positions, inv_freq, inverse=inverse)
        return norm_kernels.rms_rope_(x, positions, inv_freq, inverse=inverse)


def norm_ops(cfg: DSV4Config, device: torch.device, kernels: bool) -> NormTorch:
    if kernels and cfg.rope_dim != 64:
        raise ValueError(f"the RoPE kernels rotate 64 channels, the config has {cfg.rope_dim}")
    return NormTriton(cfg) if kernels else NormTorch(cfg)
