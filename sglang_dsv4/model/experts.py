"""A layer's MoE block as the served model holds it: gate, routed experts as banks, shared expert.

Routed experts are stacked at load into one bank per layer (no per-expert modules, no second
copy), in the format the layer keeps (:class:`~sglang_dsv4.model.linears.KeptFormats`):

* :class:`StackedExperts`, dense (model dtype) or FP8: ``w13`` [R, 2I, d] (rows ``[0, I)`` hold
  w1, ``[I, 2I)`` w3, so one GEMM pass makes both halves of the SwiGLU) and ``w2`` [R, d, I];
  FP8 adds the e8m0 128x128 scales ``w13_scale`` [R, 2 ceil(I/128), ceil(d/128)] and
  ``w2_scale`` [R, ceil(d/128), ceil(I/128)] (e4m3 weights and scales copied as released).
  ``R = E + 1`` when the shared expert has the routed experts' shape and format: it is then
  row ``E`` (:attr:`MoE.shared_row`) and runs as one more slot of every token;
* :class:`FP4Experts` (released ``expert_dtype: fp4`` or ``nvfp4_on_load``) holds one bank per
  projection ``w1 / w2 / w3``:

  - ``{k}_packed`` uint8 [E, N, K/2]: e2m1 codes, two per byte, low nibble first;
  - ``{k}_scale`` uint8 [E, N, K/G]: the scale bytes (e8m0 per 32 for MXFP4, e4m3 per 16 NVFP4);
  - ``{k}_global_scale`` fp32 [E] (1 for MXFP4);

  that is 4.25 (MXFP4) or 4.5 (NVFP4) bits per weight instead of 16 (BF16); its shared expert
  stays a separate :class:`SwiGLUExpert`.

Each bank gives the reference math its experts (``dense()``: per-expert weights, views of the
bank, run by :class:`~sglang_dsv4.ref.moe.DenseExperts`, the CPU path and the oracle) and the GPU
kernels theirs (``grouped()``: :mod:`sglang_dsv4.kernels.moe_experts` for dense / FP8,
:func:`~sglang_dsv4.kernels.mxfp4_moe.fp4_moe` for FP4); :mod:`sglang_dsv4.ops.moe` picks which,
once. Checkpoints keep their per-expert names: :meth:`MoE.store` places each tensor in its row.
"""

import re

import torch
from torch import nn

from sglang_dsv4.config import DSV4Config, LayerSpec
from sglang_dsv4.kernels.fp8_linear import fp8_block_linear
from sglang_dsv4.kernels.moe_experts import ExpertWeights, Proj, moe_experts_slots
from sglang_dsv4.kernels.moe_sorted import moe_experts_sorted
from sglang_dsv4.kernels.mxfp4_moe import FP4Bank, fp4_moe
from sglang_dsv4.model.linears import KeptFormats
from sglang_dsv4.ref.linear import Weight
from sglang_dsv4.ref.moe import DenseExperts
from sglang_dsv4.ref.weight_quant import FP8_BLOCK
from sglang_dsv4.weights.layout import Fmt, StoredWeight

__all__ = [
    "FP4Experts",
    "FP8Rows",
    "Gate",
    "GroupedFP4Experts",
    "MoE",
    "StackedExperts",
    "SwiGLUExpert",
]

PROJECTIONS = ("w1", "w2", "w3")
_NAME = re.compile(r"(?:experts\.(\d+)|shared_experts)\.(w[123])\.weight\Z")
FORMS = ("slots", "sorted")
"""Kernel forms of the dense / FP8 banks (:mod:`sglang_dsv4.kernels.moe_experts`)."""


class FP8Rows:
    """An FP8 weight held as a view into a bank (rows of ``w13`` or ``w2``), callable as a
    linear: ``x [..., K] -> [..., N]`` (the :data:`~sglang_dsv4.ref.linear.Weight` contract)."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor):
        self.weight, self.scale = weight, scale

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_block_linear(x, self.weight, self.scale)


class StackedExperts(nn.Module):
    """Dense or FP8 routed experts (+ the shared one as row E when ``shared``) of one layer as
    ``w13`` / ``w2`` banks (module docstring)."""

    def __init__(self, n_experts: int, hidden: int, inter: int, fmt: Fmt | None, shared: bool):
        super().__init__()
        if fmt not in (None, Fmt.FP8):
            raise ValueError(f"stacked expert banks hold dense or fp8, not {fmt.value}")
        self.fmt, self.n_experts, self.inter = fmt, n_experts, inter
        rows = n_experts + int(shared)
        if fmt is None:
            self.w13 = nn.Parameter(torch.zeros(rows, 2 * inter, hidden))
            self.w2 = nn.Parameter(torch.zeros(rows, hidden, inter))
            return
        tiles_i, tiles_d = -(-inter // FP8_BLOCK), -(-hidden // FP8_BLOCK)
        # empty: the loader fills every row or stops (fill kernels for fp8 dtypes vary by build)
        e4m3, e8m0 = torch.float8_e4m3fn, torch.float8_e8m0fnu
        self.register_buffer("w13", torch.empty(rows, 2 * inter, hidden, dtype=e4m3))
        self.register_buffer("w13_scale", torch.empty(rows, 2 * tiles_i, tiles_d, dtype=e8m0))
        self.register_buffer("w2", torch.empty(rows, hidden, inter, dtype=e4m3))
        self.register_buffer("w2_scale", torch.empty(rows, tiles_d, tiles_i, dtype=e8m0))

    def _rows(self, row: int, proj: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(weight, scale) views of projection ``proj`` of bank row ``row``."""
        inter, tiles_i = self.inter, -(-self.inter // FP8_BLOCK)
        if proj == "w2":
            return self.w2[row], self.w2_scale[row] if self.fmt else None
        half = slice(0, inter) if proj == "w1" else slice(inter, 2 * inter)
        tiles = slice(0, tiles_i) if proj == "w1" else slice(tiles_i, 2 * tiles_i)
        return self.w13[row, half], self.w13_scale[row, tiles] if self.fmt else None

    @torch.no_grad()
    def store(self, row: int, proj: str, stored: StoredWeight) -> None:
        """Copy one expert's checkpoint weight into bank row ``row`` (dequantized when the bank
        is dense); ValueError (the caller adds the tensor name) on a format or shape mismatch."""
        weight, scale = self._rows(row, proj)
        if self.fmt is None:
            src = stored.dequant(weight.dtype) if stored.fmt.quantized else stored.data
            parts = {"weight": (src, weight)}
        elif stored.fmt is not Fmt.FP8:
            raise ValueError(f"expert weight in {stored.fmt.value}, the bank holds fp8")
        else:
            parts = {"weight": (stored.data, weight), "scale": (stored.scale, scale)}
        for key, (src, dst) in parts.items():
            if src.shape != dst.shape:
                raise ValueError(f"{key}: expected {tuple(dst.shape)}, found {tuple(src.shape)}")
            if self.fmt is not None and src.dtype != dst.dtype:  # e4m3 / e8m0 bytes as stored
                if src.element_size() != dst.element_size():
                    raise ValueError(f"{key}: expected {dst.dtype}, found {src.dtype}")
                src = src.view(dst.dtype)
            dst.copy_(src)

    def linears(self, row: int) -> tuple[Weight, Weight, Weight]:
        """Bank row ``row`` as the reference's (w1, w2, w3) weights: dense views or
        :class:`FP8Rows`."""
        views = (self._rows(row, k) for k in PROJECTIONS)
        if self.fmt is None:
            return tuple(w for w, _ in views)
        return tuple(FP8Rows(w, s) for w, s in views)

    def dense(self) -> DenseExperts:
        """The routed experts for the reference math (rows [0, E) of the banks, no copies)."""
        rows = [self.linears(e) for e in range(self.n_experts)]
        return DenseExperts(*(list(k) for k in zip(*rows, strict=True)))

    def weights(self) -> ExpertWeights:
        """The banks as the grouped kernels' operand."""
        if self.fmt is None:
            return ExpertWeights.stacked(self.w13, self.w2)
        return ExpertWeights.stacked(self.w13, self.w2, self.w13_scale, self.w2_scale)

    def grouped(self, x, chosen, weights, limit: float, form: str, shared_row: int | None,
                shared: "StackedExperts | None" = None):  # fmt: skip
        """Routed (+ shared row) experts through the kernel ``form`` (``slots`` / ``sorted``);
        ``chosen`` None: the shared row alone; ``shared``: a shared expert's bank of its own
        (:func:`_run`)."""
        return _run(form, x, chosen, weights, self, limit, shared_row, shared)

    def released(self, prefix: str, shared_row: int | None) -> dict[str, torch.Tensor]:
        """Released name -> view of the bank (``.weight``, and ``.scale`` for FP8), for tests."""
        names = {e: f"{prefix}experts.{e}." for e in range(self.n_experts)}
        if shared_row is not None:
            names[shared_row] = f"{prefix}shared_experts."
        out = {}
        for row, p in names.items():
            for k in PROJECTIONS:
                w, s = self._rows(row, k)
                out[f"{p}{k}.weight"] = w
                if s is not None:
                    out[f"{p}{k}.scale"] = s
        return out


class GroupedFP4Experts:
    """A layer's routed experts through the grouped FP4 kernel: ``(x [T, d], chosen [T, k],
    weights [T, k], limit, dense) -> [T, d]``. ``dense`` (the graph-safe request) changes
    nothing: the grouped path is already free of data-dependent shapes."""

    def __init__(self, w1: FP4Bank, w2: FP4Bank, w3: FP4Bank):
        self.w1, self.w2, self.w3 = w1, w2, w3

    def __call__(
        self,
        x: torch.Tensor,
        experts: torch.Tensor,
        weights: torch.Tensor,
        limit: float,
        dense: bool = False,
    ) -> torch.Tensor:
        return fp4_moe(x, experts, weights, self.w1, self.w2, self.w3, limit)


class FP4Experts(nn.Module):
    """The routed experts of one layer as FP4 banks (see the module docstring)."""

    def __init__(self, n_experts: int, hidden: int, inter: int, fmt: Fmt):
        super().__init__()
        if fmt not in (Fmt.MXFP4, Fmt.NVFP4):
            raise ValueError(f"FP4 expert banks hold mxfp4 or nvfp4, not {fmt.value}")
        self.fmt = fmt
        group = 16 if fmt is Fmt.NVFP4 else 32
        shapes = ((inter, hidden), (hidden, inter), (inter, hidden))  # [N, K] of w1, w2, w3
        for k, (n, kin) in zip(PROJECTIONS, shapes, strict=True):
            self.register_buffer(
                f"{k}_packed", torch.zeros(n_experts, n, kin // 2, dtype=torch.uint8)
            )
            self.register_buffer(
                f"{k}_scale", torch.zeros(n_experts, n, kin // group, dtype=torch.uint8)
            )
            self.register_buffer(f"{k}_global_scale", torch.ones(n_experts, dtype=torch.float32))

    def store(self, expert: int, proj: str, stored: StoredWeight) -> None:
        """Copy one expert's checkpoint weight (already MXFP4 or NVFP4) into the bank."""
        if stored.fmt is not self.fmt:
            got, want = stored.fmt.value, self.fmt.value
            raise ValueError(f"expert weight in {got}, the bank holds {want}")
        getattr(self, f"{proj}_packed")[expert].copy_(stored.data.view(torch.uint8))
        getattr(self, f"{proj}_scale")[expert].copy_(stored.scale.view(torch.uint8))
        if stored.global_scale is not None:
            getattr(self, f"{proj}_global_scale")[expert].copy_(stored.global_scale)

    def bank(self, proj: str) -> FP4Bank:
        """Projection ``proj`` (``w1`` / ``w2`` / ``w3``) of every expert, for the kernels."""
        return FP4Bank(
            getattr(self, f"{proj}_packed"),
            getattr(self, f"{proj}_scale"),
            getattr(self, f"{proj}_global_scale"),
            self.fmt.value,
        )

    def routed(self) -> GroupedFP4Experts:
        """This layer's routed experts as the reference MoE's callable (grouped kernel)."""
        return GroupedFP4Experts(*(self.bank(k) for k in PROJECTIONS))

    def dense(self) -> GroupedFP4Experts:
        """The reference math's routed experts: FP4 banks exist only on the GPU path, where the
        grouped kernel is the one way to run them."""
        return self.routed()

    def weights(self) -> ExpertWeights:
        """The banks as the grouped kernels' operand."""
        return ExpertWeights(*(Proj(*self.bank(k)[:3]) for k in ("w1", "w3", "w2")), self.fmt.value)

    def grouped(self, x, chosen, weights, limit: float, form: str, shared_row: int | None,
                shared: StackedExperts | None = None):  # fmt: skip
        """Routed experts through the kernel ``form`` (an FP4 layer's shared expert is a
        separate module: ``shared_row`` is None; ``shared``: its bank, :func:`_run`)."""
        return _run(form, x, chosen, weights, self, limit, shared_row, shared)


def _operand(bank: nn.Module):
    """``bank``'s kernel operand, made once per bank storage (views of the banks, byte views of
    their codes and scales: no torch op per call once made, after the load)."""
    tensors = tuple(bank.buffers()) + tuple(bank.parameters())
    key = tuple((t.data_ptr(), t.dtype) for t in tensors)
    if getattr(bank, "_operand", (None,))[0] != key:
        bank._operand = key, bank.weights().kernel_operand()
    return bank._operand[1]


def _run(form: str, x, chosen, weights, bank: nn.Module, limit: float, shared_row, shared):
    """The kernel ``form`` over ``bank`` (+ the shared expert's bank of its own ``shared``: in
    the slot form in the same two launches; in the sorted form run alone first, its identity
    grouping launching nothing, its rows added in the routed slot sum). Either way the bits of
    the routed call + the shared bank's call in torch, without the shared bank's grouping,
    slot sum or the add."""
    if form == "slots":
        sh = None if shared is None else _operand(shared)
        return moe_experts_slots(x, chosen, weights, _operand(bank), limit, shared_row,
                                 shared=sh)  # fmt: skip
    add = None if shared is None else moe_experts_sorted(x, None, None, _operand(shared), limit, 0)
    return moe_experts_sorted(x, chosen, weights, _operand(bank), limit, shared_row, add=add)


class SwiGLUExpert(nn.Module):
    """A shared expert held apart from the routed bank (when it differs in format or width)."""

    def __init__(self, kept: KeptFormats, p: str, hidden: int, inter: int):
        super().__init__()
        self.w1 = kept.linear(p + "w1", hidden, inter)
        self.w2 = kept.linear(p + "w2", inter, hidden)
        self.w3 = kept.linear(p + "w3", hidden, inter)

    def linears(self) -> tuple[Weight, Weight, Weight]:
        return tuple(
            m if not isinstance(m, nn.Linear) else m.weight for m in (self.w1, self.w2, self.w3)
        )


class Gate(nn.Module):
    def __init__(self, cfg: DSV4Config, hash_moe: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(cfg.n_routed_experts, cfg.hidden_size))
        if hash_moe:
            self.register_buffer(
                "tid2eid", torch.zeros(cfg.vocab_size, cfg.n_experts_per_tok, dtype=torch.long)
            )
        else:
            self.bias = nn.Parameter(torch.zeros(cfg.n_routed_experts, dtype=torch.float32))


class MoE(nn.Module):
    """One layer's ``ffn``: ``gate``, routed ``experts`` (a bank) and the shared expert, held as
    routed-bank row :attr:`shared_row` when it matches the routed experts, else as a one-row
    bank of its own (``shared``: dense / FP8 next to FP4 routed experts, or wider), else as
    linears (``shared_experts``: NVFP4 on load). :mod:`sglang_dsv4.ops.moe` runs it."""

    def __init__(self, cfg: DSV4Config, spec: LayerSpec, kept: KeptFormats, p: str):
        super().__init__()
        self.hash_moe = spec.hash_moe
        self.gate = Gate(cfg, spec.hash_moe)
        d, inter, n_exp = cfg.hidden_size, cfg.moe_inter_dim, cfg.n_routed_experts
        fmt = kept.kept(p + "experts.0.w1.weight")
        self.fp4 = fmt in (Fmt.MXFP4, Fmt.NVFP4)
        n_shared = cfg.n_shared_experts
        shared_fmt = kept.kept(p + "shared_experts.w1.weight") if n_shared else None
        fold = n_shared == 1 and not self.fp4 and shared_fmt is fmt
        self.shared_row = n_exp if fold else None
        if self.fp4:
            self.experts = FP4Experts(n_exp, d, inter, fmt)
        else:
            self.experts = StackedExperts(n_exp, d, inter, fmt, shared=fold)
        self.shared = self.shared_experts = None
        if n_shared and not fold:
            width = inter * n_shared
            if shared_fmt in (None, Fmt.FP8):
                self.shared = StackedExperts(0, d, width, shared_fmt, shared=True)
            else:
                self.shared_experts = SwiGLUExpert(kept, p + "shared_experts.", d, width)

    def _slot(self, rest: str) -> tuple[nn.Module, int, str] | None:
        """(bank, row, projection) holding checkpoint tensor ``ffn.{rest}``; None: not banked."""
        m = _NAME.match(rest)
        if m is None:
            return None
        if m[1] is not None:
            return self.experts, int(m[1]), m[2]
        if self.shared_row is not None:
            return self.experts, self.shared_row, m[2]
        return None if self.shared is None else (self.shared, 0, m[2])

    def store(self, rest: str, stored: StoredWeight) -> bool:
        """Place checkpoint tensor ``layers.{i}.ffn.{rest}`` into a bank; False: not a bank
        tensor (a parameter of its own)."""
        if (slot := self._slot(rest)) is None:
            return False
        bank, row, proj = slot
        bank.store(row, proj, stored)
        return True

    def kept_banks(self) -> list[str]:
        """The quantized banks (``"fp8 expert bank"`` ...), for the load log."""
        banks = (self.experts, self.shared)
        return [f"{b.fmt.value} expert bank" for b in banks if b is not None and b.fmt]

    def released(self, prefix: str) -> dict[str, torch.Tensor]:
        """Released name -> bank view of every expert the dense / FP8 banks hold
        (``{prefix}experts.{e}.w1.weight`` ...; FP4 banks keep their own buffer names)."""
        out = {} if self.fp4 else self.experts.released(prefix, self.shared_row)
        return out | ({} if self.shared is None else self.shared.released(prefix, 0))

    def shared_linears(self) -> tuple[Weight, Weight, Weight] | None:
        """The shared expert's (w1, w2, w3) for the reference math, wherever it is held."""
        if self.shared_row is not None:
            return self.experts.linears(self.shared_row)
        if self.shared is not None:
            return self.shared.linears(0)
        return None if self.shared_experts is None else self.shared_experts.linears()

    def ref_weights(self, prefix: str) -> dict[str, Weight]:
        """Released name -> weight of the experts held in dense / FP8 banks, for RefDSV4."""
        out = {}
        for e in range(0 if self.fp4 else self.experts.n_experts):
            ws = zip(PROJECTIONS, self.experts.linears(e), strict=True)
            out |= {f"{prefix}experts.{e}.{k}.weight": w for k, w in ws}
        if self.shared_row is not None or self.shared is not None:
            ws = zip(PROJECTIONS, self.shared_linears(), strict=True)
            out |= {f"{prefix}shared_experts.{k}.weight": w for k, w in ws}
        return out
