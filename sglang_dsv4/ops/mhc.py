"""mHC ops (``Ops.hc``): the hyper-connection mixes around every block.

The served model walks its blocks as ``pre`` (before the first block), ``post_pre`` at every
later boundary (the previous block's ``hc_post`` and the next block's ``hc_pre``) and
``post_head`` after the last block; each also applies the RMSNorm that follows the collapse
(``attn_norm`` / ``ffn_norm`` / the final ``norm``), so a block receives its normed input ``h``.

* :class:`HcTorch` -- the twin: ``ref.mhc`` then ``ref.norm.rms_norm`` (the CPU path, exactly
  the reference's numbers; the test oracle).
* :class:`HcTriton` -- :mod:`sglang_dsv4.kernels.mhc`: one launch per boundary up to
  ``FMA_MAX_TOKENS`` tokens (mix split over the SMs, maps + collapse + norm in the last program
  of each token); above, the post with a split-K tensor-core GEMM for the mix in one pass
  (:mod:`sglang_dsv4.kernels.mhc_gemm`), then one program per token for the maps, collapse and
  norm; ``post`` alone is one.
"""

from dataclasses import dataclass

import torch

from sglang_dsv4.config import DSV4Config
from sglang_dsv4.kernels import mhc as mhc_kernels
from sglang_dsv4.kernels import mhc_gemm
from sglang_dsv4.ref.mhc import hc_head, hc_post, hc_pre
from sglang_dsv4.ref.norm import rms_norm

__all__ = ["HcTorch", "HcTriton", "HcWeights", "hc_ops"]

Maps = tuple[torch.Tensor, torch.Tensor]  # post [T, hc], comb [T, hc, hc] (fp32)


@dataclass(frozen=True)
class HcWeights:
    """One mHC site: ``fn`` [(2+hc)*hc, hc*d] fp32 (the head's: [hc, hc*d]), ``base``
    [(2+hc)*hc] (head: [hc]), ``scale`` [3] (head: [1]), and ``norm`` [d], the weight of the
    RMSNorm applied to the collapsed block input."""

    fn: torch.Tensor
    base: torch.Tensor
    scale: torch.Tensor
    norm: torch.Tensor


class HcTorch:
    """Streams ``x`` [T, hc, d] in the model dtype; block input / output ``h``, ``y`` [T, d]."""

    def __init__(self, cfg: DSV4Config):
        self.iters, self.hc_eps, self.eps = cfg.hc_sinkhorn_iters, cfg.hc_eps, cfg.norm_eps

    def pre(self, x: torch.Tensor, w: HcWeights) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (h [T, d], post, comb) of the block after streams ``x``."""
        u, post, comb = hc_pre(x, w.fn, w.base, w.scale, self.iters, self.hc_eps, self.eps)
        return rms_norm(u, w.norm, self.eps), post, comb

    def post(self, y: torch.Tensor, x: torch.Tensor, post: torch.Tensor, comb: torch.Tensor):
        """Block output ``y`` into the streams -> new streams [T, hc, d]."""
        return hc_post(y, x, post, comb)

    def post_pre(self, y, x, post, comb, w: HcWeights):
        """``post`` then the next block's ``pre`` -> (new streams, h, post, comb)."""
        x = self.post(y, x, post, comb)
        return (x, *self.pre(x, w))

    def head(self, x: torch.Tensor, w: HcWeights) -> torch.Tensor:
        """Final collapse + norm -> the hidden state the head reads [T, d]."""
        u = hc_head(x, w.fn, w.base, w.scale, self.hc_eps, self.eps)
        return rms_norm(u, w.norm, self.eps)

    def post_head(self, y, x, post, comb, w: HcWeights) -> torch.Tensor:
        return self.head(self.post(y, x, post, comb), w)


class HcTriton(HcTorch):
    """The same ops as Triton launches (``kernels.mhc``); ``x`` must be contiguous and
    ``d`` a multiple of 128. Holds the kernels' tickets (zeros, left zero by every launch)."""

    def __init__(self, cfg: DSV4Config, device: torch.device):
        super().__init__(cfg)
        device = torch.device(device)
        self.tickets = torch.zeros(mhc_kernels.MAX_TILES, dtype=torch.int32, device=device)
        # ~2 programs per SM (at decode one token's mix spreads over the GPU); CPU: a few splits
        cuda = device.type == "cuda"
        self.programs = (
            2 * torch.cuda.get_device_properties(device).multi_processor_count if cuda else 4
        )

    def _run(self, x, w: HcWeights, y=None, post=None, comb=None):
        post_of = None if y is None else (y.contiguous(), post, comb)  # previous block's hc_post
        return mhc_kernels.hc_fused(
            x, w.fn, w.base, w.scale, w.norm, self.tickets,
            eps=self.eps, hc_eps=self.hc_eps, iters=self.iters, programs=self.programs,
            post_of=post_of,
        )  # fmt: skip

    def pre(self, x, w):
        return self._run(x, w)[1:]

    def post(self, y, x, post, comb):
        return mhc_gemm.hc_post(y, x, post, comb)

    def post_pre(self, y, x, post, comb, w):
        return self._run(x, w, y, post, comb)

    def head(self, x, w):
        return self._run(x, w)[1]

    def post_head(self, y, x, post, comb, w):
        return self._run(x, w, y, post, comb)[1]


def hc_ops(cfg: DSV4Config, device: torch.device, kernels: bool) -> HcTorch:
    return HcTriton(cfg, device) if kernels else HcTorch(cfg)
