"""Projections that read one input, as one GEMM (``Ops.proj``): horizontal fusion.

Per attention block several linears read the same activation: the normed input ``x`` feeds
``wq_a``, ``wkv``, the compressors' ``wkv`` / ``wgate`` and the indexer's ``weights_proj``; the
normed ``q_lora`` row feeds ``wq_b`` and the indexer's ``wq_b``. At decode each is a GEMV of a few
microseconds plus, often, a cuBLAS split-K reduce: launches, not bytes, dominate them.

* ``fuse(weights)`` (once, at load): the linears of one input, in output order -> what ``run``
  takes. The checkpoint keeps its names and tensors: the fused weight is a derived buffer.
* ``run(fused, x)`` -> one output per linear, ``[..., N_i]`` each, in ``fuse``'s order.
* ``fuse_grouped(wo_a, wo_b, n_groups)`` (once, at load) and ``grouped(o, g)``: the grouped
  output projection (:func:`~sglang_dsv4.ref.attention.grouped_output_proj`); on the GPU one
  bmm over ``wo_a`` viewed per group once at load (a view: loads write through it), writing the
  ``[T, G, R]`` rows ``wo_b`` reads in place (the reference's einsum copies its permuted output
  once more when ``T > 1``).

:class:`ProjTorch` (the twin, CPU): one :func:`~sglang_dsv4.ref.linear.linear` per weight, the
reference's numbers exactly. :class:`ProjCat` (GPU): consecutive weights of one storage form are
concatenated along N -- dense tensors of one dtype, or FP8 block-scaled linears whose N are
multiples of the 128-row scale tile -- and run as one GEMM whose output is split by views
(strided rows, no copies; every consumer kernel takes a row stride). The parts are re-pointed at
row ranges of the concatenation, so the weights are held once and a later ``load_weights`` writes
through them. A concatenated GEMM is the same math (each output element is the same dot
product); only the GEMM's tiling, hence the fp32 accumulation order, may differ.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from sglang_dsv4.model.linears import FP8Linear
from sglang_dsv4.ref.attention import grouped_output_proj
from sglang_dsv4.ref.linear import Weight, linear
from sglang_dsv4.ref.weight_quant import FP8_BLOCK

__all__ = ["Fused", "Grouped", "ProjCat", "ProjTorch", "proj_ops"]


@dataclass(frozen=True)
class Fused:
    """Runs of one GEMM each: ``(weight, output widths)``; ``run`` splits each output."""

    runs: tuple[tuple[Weight, tuple[int, ...]], ...]


@dataclass(frozen=True)
class Grouped:
    """The grouped output projection's weights as ``grouped`` reads them (``fuse_grouped``):
    ``wo_a`` (the twin: [G*R, H/G*D] as stored; ProjCat: its [G, H/G*D, R] view) and ``wo_b``."""

    wo_a: torch.Tensor
    wo_b: Weight


class ProjTorch:
    """The twin: the linears one by one (module docstring)."""

    def fuse(self, weights: Sequence[Weight]) -> Fused:
        return Fused(tuple((w, (_width(w),)) for w in weights))

    def run(self, fused: Fused, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``x`` [..., K] -> one [..., N_i] per fused linear."""
        out: list[torch.Tensor] = []
        for w, widths in fused.runs:
            y = linear(x, w)  # [..., sum(widths)]
            out += y.split(widths, dim=-1) if len(widths) > 1 else [y]
        return tuple(out)

    def fuse_grouped(self, wo_a: torch.Tensor, wo_b: Weight, n_groups: int) -> Grouped:
        return Grouped(wo_a, wo_b)

    def grouped(self, o: torch.Tensor, g: Grouped) -> torch.Tensor:
        """``o`` [T, H, D] -> [T, hidden] (the reference)."""
        return grouped_output_proj(o, g.wo_a, g.wo_b)


class ProjCat(ProjTorch):
    """One GEMM per run of concatenable weights (module docstring)."""

    def fuse_grouped(self, wo_a: torch.Tensor, wo_b: Weight, n_groups: int) -> Grouped:
        """``wo_a`` [G*R, H/G*D] as the bmm's [G, H/G*D, R] operand: a view made once (two view
        ops a layer and step otherwise)."""
        return Grouped(wo_a.view(n_groups, -1, wo_a.shape[1]).transpose(1, 2), wo_b)

    def grouped(self, o: torch.Tensor, g: Grouped) -> torch.Tensor:
        n_tok, n_groups = o.shape[0], g.wo_a.shape[0]
        x = o.reshape(n_tok, n_groups, -1)  # [T, G, H/G*D]
        y = torch.empty(n_tok, n_groups, g.wo_a.shape[2], dtype=o.dtype, device=o.device)
        with torch.no_grad():  # inference only (``out=`` has no autograd)
            # [G, T, R] views of x and y: cuBLAS reads and writes the strided rows, no copies
            torch.bmm(x.transpose(0, 1), g.wo_a, out=y.transpose(0, 1))
        return linear(y.view(n_tok, -1), g.wo_b)

    def fuse(self, weights: Sequence[Weight]) -> Fused:
        runs, group = [], []
        for w in weights:
            if group and not _joins(group[-1], w):
                runs.append(_concat(group))
                group = []
            group.append(w)
        if group:
            runs.append(_concat(group))
        return Fused(tuple(runs))


def _width(w: Weight) -> int:
    return w.shape[0] if isinstance(w, torch.Tensor) else w.out_features


def _joins(a: Weight, b: Weight) -> bool:
    """Whether ``b`` can share ``a``'s GEMM: dense of one dtype / device / K, or both FP8 with
    N on the scale tile."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.dtype == b.dtype and a.device == b.device and a.shape[1] == b.shape[1]
    if type(a) is FP8Linear and type(b) is FP8Linear:
        same_k = a.in_features == b.in_features
        return same_k and a.out_features % FP8_BLOCK == 0 and b.out_features % FP8_BLOCK == 0
    return False


def _concat(group: list[Weight]) -> tuple[Weight, tuple[int, ...]]:
    """One weight for the run ``group``; its parts become row views of it."""
    widths = tuple(_width(w) for w in group)
    if len(group) == 1:
        return group[0], widths
    if isinstance(group[0], torch.Tensor):
        cat = torch.cat([w.detach() for w in group])  # [sum N, K]
        for w, part in zip(group, cat.split(widths), strict=True):
            w.data = part  # the Parameter now reads the concatenation's rows
        return cat, widths
    fused = FP8Linear.__new__(FP8Linear)  # buffers from the parts, not freshly allocated
    torch.nn.Module.__init__(fused)
    fused.in_features, fused.out_features = group[0].in_features, sum(widths)
    for key, rows in (("weight", widths), ("scale", tuple(n // FP8_BLOCK for n in widths))):
        parts = [getattr(m, key) for m in group]
        # as bytes: cat kernels need not exist for the float8 dtypes
        cat = torch.cat([t.view(torch.uint8) for t in parts]).view(parts[0].dtype)
        fused.register_buffer(key, cat)
        for m, part in zip(group, cat.split(rows), strict=True):
            setattr(m, key, part)
    return fused, widths


def proj_ops(kernels: bool) -> ProjTorch:
    return ProjCat() if kernels else ProjTorch()
