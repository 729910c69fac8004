"""One layer's expert bank as the grouped MoE kernels (:mod:`~sglang_dsv4.kernels.moe_experts`)
read it.

A bank holds every expert of a layer stacked at load (:mod:`sglang_dsv4.model.experts`), one
:class:`Proj` per projection over ``R`` rows: w1 / w3 [R, I, d], w2 [R, d, I] in the format
``dense`` (the model dtype), ``fp8`` (e4m3, e8m0 128x128 block scales) or ``mxfp4`` / ``nvfp4``
(packed e2m1 codes, scale bytes, NVFP4's fp32 global scale per row). The kernels read codes and
scales as bytes: :meth:`ExpertWeights.kernel_operand` makes those byte views once, so that a bank
the model holds costs no torch op per call (``model.experts`` keeps it per bank storage).
"""

from typing import NamedTuple

import torch

__all__ = ["FORMATS", "ExpertWeights", "Proj"]

FORMATS = {"dense": 0, "fp8": 1, "mxfp4": 2, "nvfp4": 3}
_GROUP = {"mxfp4": 32, "nvfp4": 16}
_PROJS = ("w1", "w3", "w2")


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.uint8 else t.view(torch.uint8)


class Proj(NamedTuple):
    """One projection of every bank row: ``w`` (codes), ``scale`` (bytes or e8m0; None when
    dense), ``global_scale`` fp32 [R] (NVFP4 only)."""

    w: torch.Tensor
    scale: torch.Tensor | None = None
    global_scale: torch.Tensor | None = None


class ExpertWeights(NamedTuple):
    """One layer's bank (module docstring): projections ``w1``, ``w3``, ``w2`` in ``fmt``."""

    w1: Proj
    w3: Proj
    w2: Proj
    fmt: str = "dense"

    @classmethod
    def stacked(cls, w13, w2, s13=None, s2=None) -> "ExpertWeights":
        """A dense (``s13`` None) or FP8 bank stored as ``w13`` [R, 2I, d] (w1 rows then w3
        rows; FP8 scale rows likewise, w3's from ``ceil(I/128)``) and ``w2`` [R, d, I]."""
        inter = w13.shape[1] // 2
        if s13 is None:
            return cls(Proj(w13[:, :inter]), Proj(w13[:, inter:]), Proj(w2))
        t = s13.shape[1] // 2
        w1, w3 = Proj(w13[:, :inter], s13[:, :t]), Proj(w13[:, inter:], s13[:, t:])
        return cls(w1, w3, Proj(w2, s2), "fp8")

    @property
    def packing(self) -> int:
        return 2 if self.fmt in _GROUP else 1

    def check(self, d: int) -> tuple[int, int]:
        """(rows, inter) after checking shapes against hidden size ``d``."""
        if self.fmt not in FORMATS:
            raise ValueError(f"expert bank format {self.fmt!r}: expected one of {list(FORMATS)}")
        r, inter, d_in = self.w1.w.shape
        pk = self.packing
        ok = d_in * pk == d and tuple(self.w2.w.shape) == (r, d, inter // pk)
        ok = ok and self.w3.w.shape == self.w1.w.shape and self.w3.w.stride() == self.w1.w.stride()
        if not ok:
            raise ValueError(
                f"bank w1 {tuple(self.w1.w.shape)}, w3 {tuple(self.w3.w.shape)}, "
                f"w2 {tuple(self.w2.w.shape)} ({self.fmt}) for d = {d}"
            )
        if self.fmt != "dense" and any(p.scale is None for p in self[:3]):
            raise ValueError(f"a {self.fmt} bank needs the scales of w1, w3 and w2")
        if self.fmt == "nvfp4" and any(p.global_scale is None for p in self[:3]):
            raise ValueError("an nvfp4 bank needs the global scales of w1, w3 and w2")
        return r, inter

    def operands(self, proj: Proj) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(weight, scale, global scale) pointers of ``proj`` for the kernels; operands a
        format does not read are stood in for by the weights (never dereferenced)."""
        w = _bytes(proj.w) if self.fmt in _GROUP else proj.w
        scale = w if proj.scale is None else _bytes(proj.scale)
        gs = w if proj.global_scale is None else proj.global_scale
        return w, scale, gs

    def kernel_operand(self) -> "ExpertWeights":
        """This bank with codes and scales as the bytes the kernels read: :meth:`operands` of
        it views nothing (a bank held by the model makes it once, not per call)."""

        def as_read(p: Proj) -> Proj:
            w = _bytes(p.w) if self.fmt in _GROUP else p.w
            return Proj(w, None if p.scale is None else _bytes(p.scale), p.global_scale)

        return self._replace(**{k: as_read(getattr(self, k)) for k in _PROJS})

    def constexprs(self) -> dict:
        return dict(FMT=FORMATS[self.fmt], G=_GROUP.get(self.fmt, 32), NV=self.fmt == "nvfp4")
